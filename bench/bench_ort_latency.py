"""onnxruntime CPU latency of one transformer call (one tile, batch 1): quantized portable graphs vs the fp32
export of the same model, measured in the same run.

Models: the tiny config (TINY_CONFIG) and a medium one (8 blocks, hidden 512), random weights. Quantized
with synthetic activation statistics (they set scales, not cost): W4A4 `qdit4sr` (Hadamard, H-SVD rank 32,
INT4 block-64 weights, A4 Q/DQ), W8A8 `rtn` with block-64 INT8 weights, and W8A8 `rtn` per-channel (the
only INT8 weight layout onnxruntime fuses into integer matmuls). fp32: the unquantized model exported by
the same TorchScript exporter. Each graph is timed at ORT_ENABLE_BASIC (the runtime's default: exact) and
ORT_ENABLE_ALL (fusions), median of --runs calls after 2 warm-ups; ratios are against fp32 at the same level.

    python bench/bench_ort_latency.py [--runs 7] [--threads 1]

Both configs use a 32-latent tile (256 + 256 image tokens): a 64 tile makes one fp32 call of the medium model
take seconds on two cores, and the ratios are what this bench is about. One onnxruntime thread by default:
on a shared two-core machine it gives steadier medians than two.
"""
from __future__ import annotations

import argparse
import copy
import io
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdit4sr.artifacts.graph_io import BATCH_AXIS, INPUT_NAMES, OUTPUT_NAME  # noqa: E402
from qdit4sr.calibration.api import quantize_  # noqa: E402
from qdit4sr.calibration.layers import example_inputs, used_linears  # noqa: E402
from qdit4sr.calibration.plan import QDiT4SRConfig  # noqa: E402
from qdit4sr.calibration.qsoftmax import attention_cores  # noqa: E402
from qdit4sr.calibration.stats import ActivationStats, CalibrationConfig  # noqa: E402
from qdit4sr.exporter.onnx_export import export_segments  # noqa: E402
from qdit4sr.exporter.placeholder import example_inputs as graph_inputs  # noqa: E402
from qdit4sr.models.config import TINY_CONFIG  # noqa: E402
from qdit4sr.models.transformer import DiT4SRTransformer2DModel  # noqa: E402

CONFIGS = {
    "tiny": (TINY_CONFIG, 32, 16),   # config, tile latent, text tokens
    "medium": ({**TINY_CONFIG, "num_layers": 8, "attention_head_dim": 64, "num_attention_heads": 8,
                "caption_projection_dim": 512, "joint_attention_dim": 256, "pooled_projection_dim": 256,
                "dual_attention_layers": [0, 1, 2, 3], "pos_embed_max_size": 64}, 32, 32),
}
VARIANTS = {
    "W4A4 qdit4sr": lambda: QDiT4SRConfig.preset("qdit4sr", "w4a4", num_segments=1),
    "W8A8 rtn g64": lambda: QDiT4SRConfig.preset("rtn", "w8a8"),
    "W8A8 rtn per-channel": lambda: QDiT4SRConfig.preset("rtn", "w8a8", group_size=None),
}
LEVELS = ("ORT_ENABLE_BASIC", "ORT_ENABLE_ALL")


def random_model(config: dict, seed: int = 0) -> DiT4SRTransformer2DModel:
    model = DiT4SRTransformer2DModel(**config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if "norm_" in name and "weight" in name else 0.0))
    return model


def synthetic_stats(layers: list[str], steps: int = 4) -> ActivationStats:
    rng = np.random.default_rng(0)
    v = np.exp(rng.normal(0.0, 1.0, size=(len(layers), 1))) * np.ones((1, steps))
    return ActivationStats(layers, list(np.linspace(1000.0, 250.0, steps)), v, 4 * np.sqrt(v),
                           CalibrationConfig(num_images=0))


def export_fp32(model, path: Path, tile: int, tokens: int) -> None:
    dynamic = {name: {0: BATCH_AXIS} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, graph_inputs(model.config, tile, tokens), buffer, dynamo=False, opset_version=20,
                          input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], dynamic_axes=dynamic)
    path.write_bytes(buffer.getvalue())


def median_ms(path: Path, feeds: dict, level: str, runs: int, threads: int) -> float:
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(2):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, feeds)
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def bench_config(name: str, runs: int, threads: int, work: Path) -> list[tuple]:
    config, tile, tokens = CONFIGS[name]
    base = random_model(config)
    params = sum(p.numel() for p in base.parameters())
    fp32_path = work / f"{name}_fp32.onnx"
    export_fp32(base, fp32_path, tile, tokens)
    graphs = {"fp32": fp32_path}
    layers = list(used_linears(base, example_inputs(base)))
    for label, make in VARIANTS.items():
        model = copy.deepcopy(base)
        stats = synthetic_stats(layers).with_logit_range(list(attention_cores(model)), 8.0)
        plan = quantize_(model, make(), stats, progress=False)
        out = work / f"{name}_{label.replace(' ', '_')}"
        graphs[label] = export_segments(model, plan, out, tile, tokens, progress=False)[0].graphs["portable"]
    x = graph_inputs(base.config, tile, tokens, batch=1)
    feeds = {n: t.numpy() for n, t in zip(INPUT_NAMES, x)}
    rows = []
    for level in LEVELS:
        ref = median_ms(graphs["fp32"], feeds, level, runs, threads)
        for label, path in graphs.items():
            ms = ref if label == "fp32" else median_ms(path, feeds, level, runs, threads)
            rows.append((name, f"{params / 1e6:.1f}M", tile, label, level.replace("ORT_ENABLE_", ""), ms, ref / ms))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(1)  # quantization only; the timed part is onnxruntime's
    work = Path(tempfile.mkdtemp(prefix="qdit4sr-latency-"))
    try:
        rows = [row for name in args.configs for row in bench_config(name, args.runs, args.threads, work)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nonnxruntime {ort.__version__} CPU, {args.threads} threads, batch 1, median of {args.runs} runs")
    print(f"{'config':8s} {'params':>7s} {'tile':>4s}  {'graph':22s} {'opt':6s} {'median ms':>10s} {'fp32/this':>10s}")
    for name, params, tile, label, level, ms, ratio in rows:
        print(f"{name:8s} {params:>7s} {tile:>4d}  {label:22s} {level:6s} {ms:10.2f} {ratio:9.2f}x")


if __name__ == "__main__":
    main()
