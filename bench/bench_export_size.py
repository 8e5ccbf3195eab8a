"""On-disk size of the W4A4 Q-DiT4SR export of the full-size DiT4SR transformer, against fp16 (and fp32) weights,
per graph flavour (portable, trt, cpu: the weights each flavour's graphs reference in the shared weights.bin).

What is measured and what is extrapolated (printed with the table):

* measured: a DiT4SR transformer at full width (DIT4SR_CONFIG: hidden 1536, joint dim 4096, ...) with three
  blocks, one of each kind the full model has: a dual-attention block (the full model has 13), a joint block
  (10) and the context-pre-only last block (1). Random weights, the real method (`qdit4sr` preset: Hadamard,
  H-SVD rank 32 with the block-shape search, VaSMP weight bits, VaTMP segments), exported by
  `export_segments` for a 64-latent tile and 333 text tokens. The activation statistics are synthetic
  (log-normal per layer and step): they only decide activation bits and segment boundaries, not sizes.
* extrapolated: the bytes in weights.bin are attributed to tensors by name; each block kind's bytes are
  multiplied by its count in the full model, the shared tensors counted once. Graph files grow with the
  number of blocks, so their size is scaled by 24/3 (an upper bound: their non-block part is scaled too).
* reference: the full model's parameter count (built on the meta device, no memory), at 2 bytes/param.

A 4-bit code is 4x smaller than fp16 by itself; group scales (fp16 per 64 weights: 0.25 bit/param) and the
full-precision branches (stored as fp16) come on top, so the ratio against fp16 stays below 4x. Against fp32
weights the same export is twice the ratio: the paper's 5.8x corresponds to that comparison.

    python bench/bench_export_size.py [--out DIR] [--threads 1] [--keep]
Not a test: it takes minutes (the H-SVD block search on full-width matrices) and ~3 GB of memory.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdit4sr.calibration.api import quantize_  # noqa: E402
from qdit4sr.calibration.layers import example_inputs, used_linears  # noqa: E402
from qdit4sr.calibration.plan import QDiT4SRConfig  # noqa: E402
from qdit4sr.calibration.qsoftmax import attention_cores  # noqa: E402
from qdit4sr.calibration.stats import ActivationStats, CalibrationConfig  # noqa: E402
from qdit4sr.exporter.external_data import WEIGHTS_FILE  # noqa: E402
from qdit4sr.exporter.onnx_export import export_segments  # noqa: E402
from qdit4sr.models.config import DIT4SR_CONFIG  # noqa: E402
from qdit4sr.models.transformer import DiT4SRTransformer2DModel  # noqa: E402

TILE_LATENT = 64     # DiT4SR's 64-latent tiles
TEXT_TOKENS = 333    # CLIP-L + CLIP-G + T5-XXL
NUM_STEPS = 40
MEASURED_KINDS = {0: "dual", 1: "joint", 2: "last"}   # block index in the 3-block model -> kind


def full_model_counts() -> tuple[int, dict[str, int], dict[str, int]]:
    """Parameters of the full DiT4SR: total, per block kind (one block), and the number of blocks per kind."""
    with torch.device("meta"):
        full = DiT4SRTransformer2DModel(**DIT4SR_CONFIG)
    total = sum(p.numel() for p in full.parameters())
    dual = set(DIT4SR_CONFIG["dual_attention_layers"])
    n = DIT4SR_CONFIG["num_layers"]
    kinds = ["last" if i == n - 1 else "dual" if i in dual else "joint" for i in range(n)]
    per_kind = {}
    for i, kind in enumerate(kinds):
        per_kind.setdefault(kind, sum(p.numel() for p in full.transformer_blocks[i].parameters()))
    counts = {k: kinds.count(k) for k in ("dual", "joint", "last")}
    return total, per_kind, counts


def measured_model(seed: int = 0) -> DiT4SRTransformer2DModel:
    config = {**DIT4SR_CONFIG, "num_layers": 3, "dual_attention_layers": [0]}
    model = DiT4SRTransformer2DModel(**config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # SD3-like scale; qk-norm gains at 1
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02 + (1.0 if "norm_" in name and "weight" in name else 0.0))
    return model


def synthetic_stats(layers: list[str], seed: int = 0) -> ActivationStats:
    """Log-normal second moments per layer with a smooth drift over the steps (so VaTMP finds segments)."""
    rng = np.random.default_rng(seed)
    base = np.exp(rng.normal(0.0, 1.5, size=(len(layers), 1)))
    drift = np.exp(np.outer(rng.normal(0.0, 0.8, size=len(layers)), np.linspace(-1, 1, NUM_STEPS)))
    v = base * drift
    timesteps = list(np.linspace(1000.0, 1000.0 / NUM_STEPS, NUM_STEPS))
    return ActivationStats(layers, timesteps, v, 4.0 * np.sqrt(v), CalibrationConfig(num_images=0))


def _category(name: str, dtype: int) -> str:
    kind = onnx.helper.tensor_dtype_to_np_dtype(dtype).name if dtype not in (onnx.TensorProto.INT4,) else "int4"
    if name.endswith(".qweight"):
        return "residue codes (INT4/INT8)"
    if name.endswith(".qweight_cpu"):
        return "cpu flavour residue codes (INT8)"
    if name.endswith(".weight_scale_cpu"):
        return "cpu flavour weight scales (float32)"
    if ".weight_scale" in name:
        return f"weight scales ({kind})"
    if any(k in name for k in (".lowrank_", ".block_sigma", ".block_u", ".block_v")):
        return f"H-SVD branches ({kind})"
    if name.startswith("hadamard_"):
        return f"Hadamard factors ({kind})"
    return f"other ({kind}: bias, embeddings, norms, conv)"


def attribute(folder: Path, graphs: list[Path]) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Unique bytes of weights.bin per owner (block kind or 'shared') and per (owner, category)."""
    seen: dict[tuple[str, str], tuple[str, str]] = {}
    for path in graphs:
        for t in onnx.load(path, load_external_data=False).graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            where = (info["offset"], info["length"])
            if where not in seen:
                owner = "shared"
                if t.name.startswith("transformer_blocks."):
                    owner = MEASURED_KINDS[int(t.name.split(".")[1])]
                seen[where] = (owner, _category(t.name, t.data_type))
    per_owner: dict[str, int] = defaultdict(int)
    per_cat: dict[tuple[str, str], int] = defaultdict(int)
    for (_, length), (owner, cat) in seen.items():
        per_owner[owner] += int(length)
        per_cat[owner, cat] += int(length)
    return dict(per_owner), dict(per_cat)


def gb(n: float) -> str:
    return f"{n / 1e9:8.3f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="export folder (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 avoids OpenMP contention on small shared machines)")
    parser.add_argument("--keep", action="store_true", help="keep the exported folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    total_params, block_params, block_counts = full_model_counts()
    t0 = time.time()
    model = measured_model()
    layers = list(used_linears(model, example_inputs(model)))
    stats = synthetic_stats(layers).with_logit_range(list(attention_cores(model)), 8.0)
    plan = quantize_(model, QDiT4SRConfig.preset("qdit4sr", "w4a4"), stats)
    t_quant = time.time() - t0
    tmp = Path(tempfile.mkdtemp(prefix="qdit4sr-size-")) if args.out is None else None
    out = args.out or tmp / "export"
    try:
        exports = export_segments(model, plan, out, TILE_LATENT, TEXT_TOKENS, flavour=("portable", "trt", "cpu"))
        t_export = time.time() - t0 - t_quant
        graphs = [p for e in exports for p in e.graphs.values()]
        by_flavour = {fl: [e.graphs[fl] for e in exports] for fl in ("portable", "trt", "cpu")}
        weights = (out / WEIGHTS_FILE).stat().st_size
        graph_bytes = {fl: sum(p.stat().st_size for p in paths) for fl, paths in by_flavour.items()}
        portable_graph_bytes = graph_bytes["portable"]
        per_owner, per_cat = attribute(out, graphs)
        scale = {"shared": 1, **block_counts}
        graph_scale = DIT4SR_CONFIG["num_layers"] / 3

        def extrapolated(owner_bytes: dict[str, int]) -> float:
            return sum(owner_bytes.get(k, 0) * s for k, s in scale.items())

        ext_all = extrapolated(per_owner)
        # The bytes of weights.bin each flavour's graphs reference (the file holds their union).
        used = {fl: attribute(out, paths)[0] for fl, paths in by_flavour.items()}
        used["portable+trt"] = attribute(out, by_flavour["portable"] + by_flavour["trt"])[0]
        ext_weights = extrapolated(used["portable"])
        ext_total = ext_weights + portable_graph_bytes * graph_scale
        ext_cpu = extrapolated(used["cpu"]) + graph_bytes["cpu"] * graph_scale
        fp16, fp32 = 2 * total_params, 4 * total_params
        bits = plan.weight_bits()

        print(f"\nQ-DiT4SR W4A4 export size (full width, {len(plan.segments)} segments, tile {TILE_LATENT}, "
              f"{TEXT_TOKENS} text tokens); quantize {t_quant:.0f} s, export {t_export:.0f} s")
        print(f"weight bits per layer (VaSMP): {dict(zip(*np.unique(bits, return_counts=True)))}, "
              f"mean {plan.mean_weight_bits():.2f}; activation bits mean {plan.mean_act_bits():.2f}")
        print(f"full model: {total_params / 1e9:.3f} B params; per block {block_params}; blocks {block_counts}\n")
        measured = {fl: sum(b for b in used[fl].values()) for fl in used}
        rows = [
            ("weights.bin, portable + trt + cpu", weights, ext_all, "measured / per-block x 13,10,1"),
            ("  of which portable + trt use", measured["portable+trt"], extrapolated(used["portable+trt"]),
             "the default export before the cpu flavour"),
            ("  of which the portable graphs use", measured["portable"], ext_weights, ""),
            ("  of which the cpu graphs use", measured["cpu"], extrapolated(used["cpu"]), ""),
            ("graphs, portable (all segments)", portable_graph_bytes, portable_graph_bytes * graph_scale,
             "x 24/3 (upper bound)"),
            *((f"graphs, {fl} (all segments)", graph_bytes[fl], graph_bytes[fl] * graph_scale, "x 24/3 (upper bound)")
              for fl in ("trt", "cpu")),
            ("export, portable flavour", measured["portable"] + portable_graph_bytes, ext_total,
             "its weights + portable graphs"),
            ("export, cpu flavour alone", measured["cpu"] + graph_bytes["cpu"], ext_cpu, "its weights + cpu graphs"),
        ]
        print(f"{'':38s} {'measured (3 blocks)':>20s} {'full model (24)':>16s}   how")
        for label, measured, full, how in rows:
            print(f"{label:38s} {gb(measured):>20s} {gb(full):>16s}   {how}")
        print(f"{'fp16 transformer (2 B/param)':38s} {'':>20s} {gb(fp16):>16s}   all {total_params / 1e9:.3f} B params")
        print(f"{'fp32 transformer (4 B/param)':38s} {'':>20s} {gb(fp32):>16s}")
        print(f"\n{'ratio fp16 / export':38s} {fp16 / ext_total:>37.2f}x   (4-bit codes alone: at most 4x)")
        print(f"{'ratio fp32 / export':38s} {fp32 / ext_total:>37.2f}x   (the paper reports 5.8x)")
        print(f"{'ratio fp16 / cpu flavour alone':38s} {fp16 / ext_cpu:>37.2f}x   (one INT8 byte per quantized weight)")

        print("\nfull-model bytes by kind (extrapolated) and bits per quantized-layer parameter")
        q_params = sum(block_counts[k] * sum(l.in_features * l.out_features for l in plan.layers
                                             if MEASURED_KINDS[int(l.name.split('.')[1])] == k)
                       for k in block_counts)
        cats = sorted({c for _, c in per_cat})
        for cat in cats:
            b = sum(per_cat.get((k, cat), 0) * s for k, s in scale.items())
            print(f"  {cat:52s} {gb(b)}  {8 * b / q_params:5.2f} bit/param")
        print(f"  (quantized layers hold {q_params / 1e9:.3f} B of the {total_params / 1e9:.3f} B params)")
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif args.keep or args.out:
            print(f"\nexport kept in {out}")


if __name__ == "__main__":
    main()
