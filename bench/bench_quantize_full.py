"""Time and peak memory of Hadamard + H-SVD + VaSMP + residue quantization over every linear layer of the
full-size DiT4SR transformer (random weights), on this machine's CPU.

    python bench/bench_quantize_full.py [--layers N] [--threads 2]

Goal: under 10 minutes on 2 cores, peak memory under 1.5x the fp32 model. `--layers` builds fewer blocks
(same width) for a quick run; the table then also shows the per-block extrapolation to 24 blocks. The last
rows time the block-shape search alone on both layer shapes (median of 3): the exhaustive search over every
feasible shape with full SVDs, as a baseline, against the library's search over the finest feasible shapes.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout as well

from qdit4sr.calibration.api import quantize_  # noqa: E402
from qdit4sr.calibration.hsvd import (DEFAULT_BLOCK_CANDIDATES, _blocks, choose_block_shape,  # noqa: E402
                                      feasible_block_shapes)
from qdit4sr.calibration.layers import example_inputs, used_linears  # noqa: E402
from qdit4sr.calibration.plan import QDiT4SRConfig  # noqa: E402
from qdit4sr.calibration.qsoftmax import attention_cores  # noqa: E402
from qdit4sr.calibration.stats import ActivationStats, CalibrationConfig  # noqa: E402
from qdit4sr.models.config import DIT4SR_CONFIG  # noqa: E402
from qdit4sr.models.transformer import DiT4SRTransformer2DModel  # noqa: E402


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def layer_names(config: dict) -> list[str]:
    """Names of the linears a forward uses, traced on a narrow replica with the same block structure."""
    narrow = {**config, "num_attention_heads": 1, "attention_head_dim": 8, "caption_projection_dim": 8,
              "joint_attention_dim": 8, "pooled_projection_dim": 8, "pos_embed_max_size": 8}
    model = DiT4SRTransformer2DModel(**narrow)
    return list(used_linears(model, example_inputs(model)))


def random_model(config: dict, seed: int) -> DiT4SRTransformer2DModel:
    with torch.device("meta"):
        model = DiT4SRTransformer2DModel(**config)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def exhaustive_block_search(residual: torch.Tensor, rank: int) -> tuple[int, int] | None:
    """The baseline: every feasible candidate scored by a full batched SVD of its blocks."""
    r64 = residual.double()
    total, best, best_err = r64.square().sum().item(), None, float("inf")
    for shape in feasible_block_shapes(*residual.shape, rank, DEFAULT_BLOCK_CANDIDATES, 1.0):
        top = torch.linalg.svdvals(_blocks(r64, *shape))[..., 0]
        err = total - top.square().sum().item()
        if err < best_err:
            best, best_err = shape, err
    return best


def block_search_rows(threads: int, rank: int = 32, repeats: int = 3) -> list[tuple[str, str]]:
    """Median time of the block-shape search on the two full-size layer shapes: baseline vs the library."""
    rows = []
    gen = torch.Generator().manual_seed(1)
    for out, in_ in ((1536, 1536), (6144, 1536)):
        w = torch.randn(out, in_, generator=gen) * 0.02
        times = {}
        for label, fn in (("exhaustive SVD", lambda: exhaustive_block_search(w, rank)),
                          ("finest shapes, Gram", lambda: choose_block_shape(w, rank, DEFAULT_BLOCK_CANDIDATES, 1.0))):
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                shape = fn()
                runs.append(time.perf_counter() - t0)
            times[label] = (statistics.median(runs), shape)
        (base, base_shape), (new, new_shape) = times.values()
        rows.append((f"block search {out}x{in_}: exhaustive / finest", f"{base:.2f} s / {new:.2f} s = {base / new:.1f}x"
                     f" (same shape: {base_shape == new_shape}, {new_shape})"))
    return rows


@click.command()
@click.option("--layers", "num_layers", type=int, default=24, show_default=True, help="Transformer blocks to build.")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--precision", default="w4a4", show_default=True)
def main(num_layers: int, threads: int, precision: str) -> None:
    torch.set_num_threads(threads)
    config = {**DIT4SR_CONFIG, "num_layers": num_layers,
              "dual_attention_layers": [i for i in DIT4SR_CONFIG["dual_attention_layers"] if i < num_layers]}
    names = layer_names(config)
    t0 = time.perf_counter()
    model = random_model(config, seed=0)
    build_s = time.perf_counter() - t0
    # Parameters plus buffers: the positional-embedding table alone is 0.84 GiB at any depth.
    fp32_bytes = sum(t.numel() * 4 for t in (*model.parameters(), *model.buffers()))
    rss_before = peak_rss_bytes()
    # Activation statistics only set activation scales; constant ones keep the weight path realistic.
    stats = ActivationStats(names, [1000.0], np.ones((len(names), 1)), np.full((len(names), 1), 4.0),
                            CalibrationConfig(num_images=0)).with_logit_range(list(attention_cores(model)), 8.0)
    qconfig = QDiT4SRConfig.from_precision(precision, temporal_act_bits=False)
    t0 = time.perf_counter()
    plan = quantize_(model, qconfig, stats, progress=True)
    quant_s = time.perf_counter() - t0
    peak = peak_rss_bytes()
    rows = [("blocks built", f"{num_layers}"), ("linear layers", f"{len(names)}"),
            ("fp32 model (parameters + buffers)", f"{fp32_bytes / 2**30:.2f} GiB"),
            ("build time", f"{build_s:.1f} s"),
            ("H-SVD + VaSMP + quantize time", f"{quant_s:.1f} s"),
            ("peak RSS", f"{peak / 2**30:.2f} GiB"), ("peak RSS / fp32 model", f"{peak / fp32_bytes:.2f}x"),
            ("RSS after build / fp32 model", f"{rss_before / fp32_bytes:.2f}x"),
            ("mean weight bits (VaSMP)", f"{plan.mean_weight_bits():.3f}")]
    if num_layers != 24:
        rows.append(("time extrapolated to 24 blocks", f"{quant_s * 24 / num_layers:.0f} s"))
    rows += block_search_rows(threads)
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}} | value")
    print(f"{'-' * width}-|------")
    for k, v in rows:
        print(f"{k:<{width}} | {v}")


if __name__ == "__main__":
    main()
