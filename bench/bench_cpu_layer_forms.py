"""onnxruntime CPU latency of one quantized linear layer in each ONNX form, at DiT4SR's three layer shapes,
against the fp32 MatMul of the same shape measured in the same run.

    python bench/bench_cpu_layer_forms.py [--tokens 1024] [--runs 7] [--threads 1]

Forms (one layer: Hadamard, A4 activation Q/DQ, W4 residue, rank-32 branch, bias; built by the exporter's
own rewrite from a one-placeholder graph, except MatMulNBits):

    portable          the portable flavour (runtime level BASIC): INT4 group-64 DQ with fp16 scales + Cast
    cpu               the cpu flavour (runtime level ALL): per-channel INT8 DQ with float32 scales, fused by
                      onnxruntime into MatMulIntegerToFloat, split Hadamard
    act Q/DQ + NBits  the activation Q/DQ followed by com.microsoft MatMulNBits (4-bit, block 64,
                      accuracy_level 0, float32 scales): the exact group-64 matmul onnxruntime offers
    Hadamard: portable / split   the rotation alone, in the portable form (H_m (x) H_p) and the cpu form

Calls are interleaved across forms (one call of each per round) and the medians compared; the load
average is printed with the table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdit4sr.artifacts.flavour import Flavour  # noqa: E402
from qdit4sr.calibration.hadamard import hadamard_factor_matrices, hadamard_factors, rotate_weight  # noqa: E402
from qdit4sr.calibration.plan import LayerPlan  # noqa: E402
from qdit4sr.calibration.qlinear import QuantLinear  # noqa: E402
from qdit4sr.calibration.quantizer import WeightQuantConfig, quantize_weight  # noqa: E402
from qdit4sr.engines.ort_options import session_options  # noqa: E402
from qdit4sr.exporter.cpu_flavour import (SplitHadamardFactors, cpu_weight_dq, rewrite_layers,  # noqa: E402
                                          split_factor_matrices, split_sizes)
from qdit4sr.exporter.external_data import WEIGHTS_FILE, WeightStore  # noqa: E402
from qdit4sr.exporter.graph_rewrite import HadamardFactors, prepare_layer, rewrite_segment  # noqa: E402
from qdit4sr.exporter.placeholder import PLACEHOLDER_DOMAIN, PLACEHOLDER_OP  # noqa: E402

SHAPES = ((1536, 1536), (1536, 6144), (6144, 1536))   # (K, N): attention/out, ff up, ff down
RANK, GROUP, ACT_BITS, ACT_SCALE = 32, 64, 4, 0.25


def quant_layer(k: int, n: int) -> QuantLinear:
    gen = torch.Generator().manual_seed(0)
    w = rotate_weight(torch.randn(n, k, generator=gen) * 0.02)
    residual = quantize_weight(w, WeightQuantConfig(bits=4, group_size=GROUP, scale_dtype=torch.float16))
    half = lambda t: t.half().float()  # noqa: E731  (fp16 storage, as quantize_ stores it)
    return QuantLinear(residual, half(torch.randn(n, generator=gen) * 0.1), hadamard=True, act_bits=[ACT_BITS],
                       act_scales=[ACT_SCALE], segment_of_step=[0],
                       down=half(torch.randn(RANK, k, generator=gen) * 0.02),
                       up=half(torch.randn(n, RANK, generator=gen) * 0.02))


def layer_graph(layer: QuantLinear, folder: Path, flavour: Flavour, tokens: int) -> Path:
    graph = helper.make_graph(
        [helper.make_node(PLACEHOLDER_OP, ["x"], ["y"], domain=PLACEHOLDER_DOMAIN, layer="layer")], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, layer.in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    base = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                   helper.make_opsetid(PLACEHOLDER_DOMAIN, 1)])
    folder.mkdir(parents=True, exist_ok=True)
    plan = LayerPlan("layer", layer.in_features, layer.out_features, 4, 1.0, [ACT_BITS], [ACT_SCALE], RANK)
    with WeightStore(folder / WEIGHTS_FILE) as store:
        spec = prepare_layer(store, plan, layer, 3)
        if flavour == Flavour.CPU:
            spec.weight[Flavour.CPU] = cpu_weight_dq(store, "layer", layer)
            model = rewrite_segment(base, {"layer": spec}, 0, flavour, 21, SplitHadamardFactors(store),
                                    rewrite_layers=rewrite_layers)
        else:
            model = rewrite_segment(base, {"layer": spec}, 0, flavour, 21, HadamardFactors(store))
    path = folder / f"{flavour}.onnx"
    onnx.save(model, path)
    return path


def _model(nodes, inits, k, tokens, domains=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 21)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def fp32_matmul(k: int, n: int, tokens: int) -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")], k, tokens)


def nbits_matmul(layer: QuantLinear, tokens: int) -> onnx.ModelProto:
    """Activation Q/DQ + MatMulNBits on the layer's own INT4 group-64 codes (unsigned, zero point 8)."""
    k, n = layer.in_features, layer.out_features
    codes = layer.qweight.numpy().astype(np.int16) + 8                       # [N, K] in 1..15
    u = codes.astype(np.uint8).reshape(n, k // GROUP, GROUP)
    packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)           # first code in the low nibble
    inits = [numpy_helper.from_array(packed, "b"),
             numpy_helper.from_array(layer.weight_scales.float().numpy().reshape(-1), "scales"),
             numpy_helper.from_array(np.array(ACT_SCALE, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["xq"]),
             helper.make_node("MatMulNBits", ["xq", "b", "scales"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                              block_size=GROUP, accuracy_level=0)]
    return _model(nodes, inits, k, tokens, ("com.microsoft",))


def hadamard_only(k: int, tokens: int, split: bool) -> onnx.ModelProto:
    """x H in the portable form (factors m x p) or the cpu form (split_sizes)."""
    m, p = split_sizes(k) if split else hadamard_factors(k)
    left, right = split_factor_matrices(k, torch.float32) if split else hadamard_factor_matrices(k, torch.float32)
    inits = [numpy_helper.from_array(np.array([0, 0, m, p], np.int64), "s1"),
             numpy_helper.from_array(np.array([0, 0, k], np.int64), "s2"),
             numpy_helper.from_array(right.numpy(), "r"), numpy_helper.from_array(left.T.contiguous().numpy(), "l")]
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["a"]), helper.make_node("MatMul", ["a", "r"], ["b"]),
             helper.make_node("MatMul", ["l", "b"], ["c"]), helper.make_node("Reshape", ["c", "s2"], ["y"])]
    return _model(nodes, inits, k, tokens)


def make_session(model, flavour: str, threads: int) -> ort.InferenceSession:
    """A session with `flavour`'s runtime settings (fp32 and the Hadamard alone take the cpu ones: level ALL)."""
    options = session_options(flavour, threads, log_severity_level=3)
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def bench_shape(k: int, n: int, tokens: int, runs: int, threads: int, work: Path) -> list[tuple]:
    layer = quant_layer(k, n)
    forms = {  # label -> (model or path, the session settings of the flavour that runs it)
        "fp32 MatMul": (fp32_matmul(k, n, tokens), "cpu"),
        "portable": (layer_graph(layer, work / f"{k}x{n}", Flavour.PORTABLE, tokens), "portable"),
        "cpu": (layer_graph(layer, work / f"{k}x{n}", Flavour.CPU, tokens), "cpu"),
        "act Q/DQ + NBits": (nbits_matmul(layer, tokens), "cpu"),
        "Hadamard: portable": (hadamard_only(k, tokens, split=False), "cpu"),
        "Hadamard: split": (hadamard_only(k, tokens, split=True), "cpu"),
    }
    sessions = {label: make_session(model, settings, threads) for label, (model, settings) in forms.items()}
    x = {"x": np.random.default_rng(1).standard_normal((1, tokens, k)).astype(np.float32)}
    for s in sessions.values():
        s.run(None, x)
    times = {label: [] for label in sessions}
    for _ in range(runs):
        for label, s in sessions.items():
            t = time.perf_counter()
            s.run(None, x)
            times[label].append(1e3 * (time.perf_counter() - t))
    medians = {label: statistics.median(v) for label, v in times.items()}
    ref = medians["fp32 MatMul"]
    return [(f"{k}x{n}", label, ms, ref / ms) for label, ms in medians.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="qdit4sr-forms-") as tmp:
        rows = [row for k, n in SHAPES for row in bench_shape(k, n, args.tokens, args.runs, args.threads, Path(tmp))]
    print(f"\nonnxruntime {ort.__version__} CPU, {args.threads} thread(s), M = {args.tokens} tokens, median of "
          f"{args.runs} interleaved runs; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(f"{'K x N':10s} {'form':20s} {'median ms':>10s} {'fp32/this':>10s}")
    for shape, label, ms, ratio in rows:
        print(f"{shape:10s} {label:20s} {ms:10.2f} {ratio:9.2f}x")


if __name__ == "__main__":
    main()
