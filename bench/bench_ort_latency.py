"""onnxruntime CPU latency of one transformer call (one tile, batch 1): the quantized portable and cpu graphs
vs the fp32 export of the same model, measured in the same run.

Models: the tiny config (TINY_CONFIG) and a medium one (8 blocks, hidden 512), random weights. Quantized
with synthetic activation statistics (they set scales, not cost):

    W4A4 Q-DiT4SR         `qdit4sr` preset: Hadamard, H-SVD rank 32, INT4 group-64 weights, A4 (the cpu
                          graph re-expresses the group-64 grid per channel, option 1)
    W4A4 Q-DiT4SR per-ch  the same, quantized per output channel with <= 7 bits (CPU_EXACT_CONFIG: the cpu graph
                          is exact, option 2)
    W8A8 RTN              `rtn` preset, per-channel INT8 weights, A8 (the cpu graph re-expresses the codes to +-63)

fp32: the unquantized model exported by the same TorchScript exporter. Every graph runs with the session
settings its runtime uses: fp32 and cpu at ORT_ENABLE_ALL (the cpu flavour with
qdq_matmulnbits_accuracy_level 0, see qdit4sr/engines/ort_options.py), portable at ORT_ENABLE_BASIC.
The calls are interleaved (one call of each graph per round, --runs rounds after 2 warm-ups) so that load
from other processes hits every graph alike; the table gives medians and fp32 median / graph median.

    python bench/bench_ort_latency.py [--runs 9] [--threads 1 2] [--configs tiny medium]

Both configs use a 32-latent tile (256 + 256 image tokens): a 64 tile makes one fp32 call of the medium model
take seconds on two cores, and the ratios are what this bench is about.
"""
from __future__ import annotations

import argparse
import copy
import io
import os
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
from qdit4sr.calibration.cpu_weights import CPU_EXACT_CONFIG  # noqa: E402
from qdit4sr.calibration.layers import example_inputs, used_linears  # noqa: E402
from qdit4sr.calibration.plan import QDiT4SRConfig  # noqa: E402
from qdit4sr.calibration.qsoftmax import attention_cores  # noqa: E402
from qdit4sr.calibration.stats import ActivationStats, CalibrationConfig  # noqa: E402
from qdit4sr.engines.ort_options import session_options  # noqa: E402
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
    "W4A4 Q-DiT4SR": lambda: QDiT4SRConfig.preset("qdit4sr", "w4a4", num_segments=1),
    "W4A4 Q-DiT4SR per-ch": lambda: QDiT4SRConfig.preset("qdit4sr", "w4a4", num_segments=1, **CPU_EXACT_CONFIG),
    "W8A8 RTN": lambda: QDiT4SRConfig.preset("rtn", "w8a8"),
}
FLAVOURS = ("portable", "cpu")


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


def session(path: Path, flavour: str, threads: int) -> ort.InferenceSession:
    if flavour == "fp32":
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
    else:
        options = session_options(flavour, threads, log_severity_level=3)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_medians(sessions: dict, feeds: dict, runs: int) -> dict[str, float]:
    """Median ms per session; one call of each per round, so drifting load hits all of them alike."""
    for s in sessions.values():
        for _ in range(2):
            s.run(None, feeds)
    times: dict = {key: [] for key in sessions}
    for _ in range(runs):
        for key, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds)
            times[key].append(1e3 * (time.perf_counter() - t))
    return {key: statistics.median(v) for key, v in times.items()}


def export_graphs(name: str, work: Path) -> tuple[dict, dict, str]:
    """{(variant, flavour) or ("fp32", "fp32"): graph path}, the feeds, and the parameter count."""
    config, tile, tokens = CONFIGS[name]
    base = random_model(config)
    params = sum(p.numel() for p in base.parameters())
    graphs = {("fp32", "fp32"): work / f"{name}_fp32.onnx"}
    export_fp32(base, graphs["fp32", "fp32"], tile, tokens)
    layers = list(used_linears(base, example_inputs(base)))
    for label, make in VARIANTS.items():
        model = copy.deepcopy(base)
        stats = synthetic_stats(layers).with_logit_range(list(attention_cores(model)), 8.0)
        plan = quantize_(model, make(), stats, progress=False)
        out = work / f"{name}_{label.replace(' ', '_')}"
        export = export_segments(model, plan, out, tile, tokens, flavour=FLAVOURS, progress=False)[0]
        for flavour in FLAVOURS:
            graphs[label, flavour] = export.graphs[flavour]
    x = graph_inputs(base.config, tile, tokens, batch=1)
    return graphs, {n: t.numpy() for n, t in zip(INPUT_NAMES, x)}, f"{params / 1e6:.1f}M"


def bench_config(name: str, runs: int, threads: list[int], work: Path) -> list[tuple]:
    graphs, feeds, params = export_graphs(name, work)
    rows = []
    for n in threads:
        sessions = {key: session(path, key[1], n) for key, path in graphs.items()}
        medians = interleaved_medians(sessions, feeds, runs)
        ref = medians["fp32", "fp32"]
        rows += [(name, params, n, variant, flavour, ms, ref / ms) for (variant, flavour), ms in medians.items()]
        del sessions
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="onnxruntime intra-op threads")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(1)  # quantization only; the timed part is onnxruntime's
    work = Path(tempfile.mkdtemp(prefix="qdit4sr-latency-"))
    load = os.getloadavg()[0]
    try:
        rows = [row for name in args.configs for row in bench_config(name, args.runs, args.threads, work)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nonnxruntime {ort.__version__} CPU ({os.cpu_count()} cores), batch 1, median of {args.runs} interleaved "
          f"runs; 1-minute load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(f"{'config':8s} {'params':>7s} {'thr':>3s}  {'graph':22s} {'flavour':9s} {'median ms':>10s} "
          f"{'fp32/this':>10s}")
    for name, params, n, variant, flavour, ms, ratio in rows:
        print(f"{name:8s} {params:>7s} {n:>3d}  {variant:22s} {flavour:9s} {ms:10.2f} {ratio:9.2f}x")


if __name__ == "__main__":
    main()
