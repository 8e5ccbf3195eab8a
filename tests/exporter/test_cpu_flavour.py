"""The cpu flavour: each graph computes the cpu reference model (the torch fake-quant model with the cpu
residues) to float32 rounding, stays within the stated bound of the portable model, and onnxruntime
really runs its quantized layers as fused integer matmuls."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qdit4sr.artifacts.flavour import Flavour
from qdit4sr.artifacts.graph_io import INPUT_NAMES
from qdit4sr.calibration.api import quantized_layers
from qdit4sr.calibration.cpu_weights import (
    CPU_EXACT_CONFIG,
    MAX_CODE,
    cpu_quant_linear,
    cpu_reference_,
    cpu_weight,
    requantize_per_channel,
)
from qdit4sr.calibration.hadamard import apply_hadamard, hadamard_factors, hadamard_matrix
from qdit4sr.calibration.plan import LayerPlan
from qdit4sr.calibration.qlinear import NO_ACT_QUANT, segment_scope
from qdit4sr.calibration.quantizer import fake_quantize_activation
from qdit4sr.engines.ort_options import session_options
from qdit4sr.exporter.cpu_flavour import (
    SplitHadamardFactors,
    cpu_weight_dq,
    float_matmuls_on_dequantized,
    optimized_model,
    optimized_op_types,
    rewrite_layers,
    split_factor_matrices,
    split_sizes,
)
from qdit4sr.exporter.external_data import WEIGHTS_FILE, WeightStore
from qdit4sr.exporter.graph_rewrite import prepare_layer, rewrite_segment
from qdit4sr.exporter.onnx_export import export_segments
from qdit4sr.exporter.placeholder import PLACEHOLDER_DOMAIN, PLACEHOLDER_OP
from tests.exporter.test_graph_rewrite import LAYER_CASES, LAYER_RTOL, _quant_layer, _tie_free_input
from tests.exporter.test_onnx_export import (
    MODEL_RTOL,
    MODEL_TIE_RTOL,
    TIE_MARGIN,
    _graph_with_code_outputs,
    _torch_codes,
)
from tests.helpers.micro import MICRO_CONFIG, micro_inputs
from tests.helpers.micro_export import TILE, TOKENS, quantized_micro, single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def _session(path: Path, flavour: str = "cpu") -> ort.InferenceSession:
    """A session with the runtime's settings for the flavour (cpu: fused, level ALL; portable: BASIC)."""
    return ort.InferenceSession(str(path), session_options(flavour, 1, log_severity_level=3),
                                providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- Hadamard

@pytest.mark.parametrize("n", [2, 12, 64, 96, 128, 160, 448, 512, 1536, 2048, 6144])
def test_split_hadamard_is_the_same_matrix_with_the_cheapest_split(n):
    left, right = split_factor_matrices(n)
    assert torch.allclose(torch.kron(left, right), hadamard_matrix(n), atol=1e-14, rtol=0)
    l_size, b = split_sizes(n)
    assert l_size * b == n and left.shape == (l_size, l_size) and right.shape == (b, b)
    m, p = hadamard_factors(n)
    costs = {(n // c + c, c) for c in (2 ** i for i in range(p.bit_length())) if p % c == 0}
    assert (l_size + b, b) == min(costs)  # brute force over every power-of-two split
    if n >= 512:
        assert l_size + b < 0.6 * (m + p)  # fewer flops per element than the portable form (m + p)


# ----------------------------------------------------------------------------- one layer

CPU_LAYER_CASES = {
    **LAYER_CASES,
    # 8-bit codes are re-expressed onto +-63 (full-range int8 can saturate without VNNI)
    "w8perchannel_a8": dict(shape=(64, 128), input_rank=3, w_bits=8, group=None, act_bits=(8,), scales=(0.02,),
                            hadamard=True, rank=4),
}


def _fused(path: Path) -> int:
    return sum(optimized_op_types(path)[op] for op in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul"))


@pytest.mark.parametrize("case", sorted(CPU_LAYER_CASES))
def test_one_layer_matches_the_cpu_reference_and_the_bound(case, tmp_path):
    c = dict(CPU_LAYER_CASES[case])
    out_f, in_f = c.pop("shape")
    rank = c.pop("input_rank")
    layer = _quant_layer(out_f, in_f, **c)
    weight = cpu_weight(layer)
    reference = cpu_quant_linear(layer, weight)
    assert weight.exact or not (c["group"] is None and c["w_bits"] <= 7)
    lead = (3, 5)[: rank - 1]
    for k in range(len(layer.act_bits)):
        path = _single_layer_graph_cpu(layer, weight, rank, tmp_path / case, k)
        x = _tie_free_input(layer, k, lead, seed=k)
        with torch.no_grad(), segment_scope(k):
            ref, portable = reference(x).numpy(), layer(x).numpy()
        got = _session(path).run(None, {"x": x.numpy()})[0]
        scale = float(np.abs(ref).max())
        assert np.abs(got - ref).max() <= LAYER_RTOL * scale, (case, k)
        # against the portable model: |dy_n| <= sum_k |x_q[k]| * bound_n (re-expressed weights only)
        bits, s = layer.act_bits[k], layer.act_scales[k]
        x_h = apply_hadamard(x.double()) if layer.hadamard else x.double()
        x_q = x_h if bits >= NO_ACT_QUANT else fake_quantize_activation(x_h, bits, s)
        bound = x_q.abs().sum(-1, keepdim=True).numpy() * weight.bound().double().numpy()
        diff = np.abs(got.astype(np.float64) - portable)
        assert (diff <= bound + LAYER_RTOL * scale).all(), (case, k)
        if c["group"] is not None and c["w_bits"] == 4:  # re-expressed (not merely rounded): measurably apart
            assert diff.max() > 10 * LAYER_RTOL * scale
        assert _fused(path) == (0 if bits >= NO_ACT_QUANT else 1), (case, k)


def _single_layer_graph_cpu(layer, weight, rank, folder, segment) -> Path:
    """The cpu rewrite of a graph holding nothing but one placeholder (as test_onnx_export does for portable)."""
    dims = ["batch", 5][: rank - 1] + [layer.in_features]
    graph = helper.make_graph(
        [helper.make_node(PLACEHOLDER_OP, ["x"], ["y"], domain=PLACEHOLDER_DOMAIN, layer="layer")], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    base = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                   helper.make_opsetid(PLACEHOLDER_DOMAIN, 1)])
    folder.mkdir(parents=True, exist_ok=True)
    with WeightStore(folder / WEIGHTS_FILE, threshold_bytes=256) as store:
        plan = LayerPlan("layer", layer.in_features, layer.out_features, layer.weight_bits, 1.0,
                         list(layer.act_bits), list(layer.act_scales), 0 if layer.up is None else layer.up.shape[1],
                         None if layer.block_shape is None else list(layer.block_shape))
        spec = prepare_layer(store, plan, layer, rank)
        spec.weight[Flavour.CPU] = cpu_weight_dq(store, "layer", layer)
        model = rewrite_segment(base, {"layer": spec}, segment, "cpu", 21, SplitHadamardFactors(store),
                                rewrite_layers=rewrite_layers)
    path = folder / f"cpu_{segment}.onnx"
    onnx.save(model, path)
    model = onnx.load(path, load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    codes = numpy_helper.to_array(_load(inits["layer.qweight_cpu"], folder))
    assert codes.dtype == np.int8 and np.abs(codes).max() <= MAX_CODE
    assert np.array_equal(codes, weight.codes.numpy().T)
    assert inits["layer.weight_scale_cpu"].data_type == TensorProto.FLOAT
    ops = [n.op_type for n in model.graph.node]
    assert "Cast" not in [n.op_type for n in model.graph.node if n.output[0].startswith("layer/DequantizeLinear")]
    assert ops.count("DequantizeLinear") == (1 if layer.act_bits[segment] >= NO_ACT_QUANT else 2)
    return path


def _load(proto: TensorProto, folder: Path) -> TensorProto:
    copy = TensorProto()
    copy.CopyFrom(proto)
    onnx.external_data_helper.load_external_data_for_tensor(copy, str(folder))
    copy.data_location = TensorProto.DEFAULT
    return copy


# ----------------------------------------------------------------------------- whole transformer

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """W4A4 H-SVD (VaSMP gives two layers wider weights, two segments) and W4A6 per-channel RTN, cpu +
    portable graphs each: {case: (quantized, cpu reference model, exports, folder)}."""
    import copy

    cases = {
        "w4a4_hsvd": dict(preset="qdit4sr", precision="w4a4", rank=8, num_segments=2,
                          boost=("transformer_blocks.1.ff.net.2", "transformer_blocks.0.attn.to_out.0")),
        "w4a6_per_channel": dict(preset="qdit4sr", precision="w4a6", rank=8, **CPU_EXACT_CONFIG),
    }
    out = {}
    for name, kwargs in cases.items():
        q = quantized_micro(kwargs.pop("preset"), kwargs.pop("precision"), **kwargs)
        folder = tmp_path_factory.mktemp(name) / "export"
        with single_thread():
            exports = export_segments(q.model, q.plan, folder, TILE, TOKENS, flavour=("portable", "cpu"),
                                      progress=False)
        reference = copy.deepcopy(q.model)
        weights = cpu_reference_(reference)
        out[name] = (q, reference, weights, exports, folder)
    return out


def _compare(q, reference, path: Path, segment: int, batch: int, dead: list[str]) -> dict:
    """The cpu graph (fused, level ALL) against the cpu reference model; codes read at level BASIC.

    As for the portable graphs, the first activation-code disagreement must sit at a rounding tie; with
    none the outputs agree to MODEL_RTOL, otherwise to MODEL_TIE_RTOL.
    """
    inputs = micro_inputs(MICRO_CONFIG, batch=batch, size=TILE, tokens=TOKENS, seed=3)
    ref, torch_codes = _torch_codes(reference, inputs, segment)
    feeds = {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)}
    probe = _graph_with_code_outputs(path)
    try:
        session = _session(probe, "portable")
    finally:
        probe.unlink()
    names = [o.name for o in session.get_outputs()]
    results = dict(zip(names, session.run(None, feeds)))
    codes = {layer: value for name, value in results.items() if name != "velocity"
             for layer in name.split("/")[0].split("+")}  # a merged group's quantizer serves all its layers
    assert set(codes) == set(torch_codes) - set(dead)
    mismatches, first = 0, None
    for layer, (expected, ratio) in torch_codes.items():
        if layer in dead:
            continue
        differ = codes[layer] != expected
        mismatches += int(differ.sum())
        if differ.any() and first is None:
            first = layer
            assert (np.abs(ratio - np.floor(ratio) - 0.5)[differ] < TIE_MARGIN).all(), layer
    got = _session(path).run(["velocity"], feeds)[0]
    scale = float(np.abs(ref).max())
    rel = float(np.abs(got - ref).max()) / scale
    assert rel <= (MODEL_RTOL if mismatches == 0 else MODEL_TIE_RTOL), (rel, mismatches)
    return {"rel_err": rel, "code_mismatches": mismatches}


@pytest.mark.parametrize("case", ["w4a4_hsvd", "w4a6_per_channel"])
def test_cpu_graphs_match_the_cpu_reference_model(exported, case):
    q, reference, weights, exports, _ = exported[case]
    for seg in exports:
        for batch in (2, 1):
            _compare(q, reference, seg.graphs["cpu"], seg.index, batch, seg.dead_layers)


def test_per_channel_quantization_makes_the_cpu_graph_exact_to_the_portable_one(exported):
    """Option 2: quantized per channel (float32 scales, <= 7 bits) every residue is kept as it is, so the
    cpu graph computes the portable model; group-wise W4A4 is re-expressed and measurably differs."""
    q, reference, weights, exports, _ = exported["w4a6_per_channel"]
    assert weights and all(w.exact for w in weights.values())
    for name, layer in quantized_layers(q.model).items():  # the reference (a copy) keeps every residue
        assert torch.equal(reference.get_submodule(name).qweight, layer.qweight)
    inputs = micro_inputs(MICRO_CONFIG, batch=2, size=TILE, tokens=TOKENS, seed=3)
    feeds = {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)}
    cpu = _session(exports[0].graphs["cpu"]).run(None, feeds)[0]
    portable = _session(exports[0].graphs["portable"], "portable").run(None, feeds)[0]
    assert np.abs(cpu - portable).max() <= MODEL_TIE_RTOL * np.abs(portable).max()
    q4, reference4, weights4, _, _ = exported["w4a4_hsvd"]
    assert not any(w.exact for n, w in weights4.items() if q4.model.get_submodule(n).weight_bits <= 4)
    with torch.no_grad(), segment_scope(0):
        a, b = q4.model(*inputs).numpy(), reference4(*inputs).numpy()
    assert np.abs(a - b).max() > 100 * MODEL_RTOL * np.abs(a).max()


@pytest.mark.parametrize("case", ["w4a4_hsvd", "w4a6_per_channel"])
def test_onnxruntime_fuses_every_quantized_layer(exported, case):
    """The optimised graph (onnxruntime's own dump) runs every live quantized layer in an integer matmul:
    one per activation quantizer (layers sharing one are merged), none left reading a dequantized weight."""
    q, _, _, exports, _ = exported[case]
    softmax_sites = {site.name for site in q.plan.softmax}
    for seg in exports:
        quantized = {lp.name for lp in q.plan.layers
                     if lp.name not in seg.dead_layers and lp.act_bits[seg.index] < NO_ACT_QUANT}
        graph = onnx.load(seg.graphs["cpu"], load_external_data=False).graph
        quantizers = [n.name.split("/")[0] for n in graph.node if n.op_type == "QuantizeLinear"
                      and n.name.split("/")[0] not in softmax_sites]
        assert sorted(layer for prefix in quantizers for layer in prefix.split("+")) == sorted(quantized)
        assert any("+" in prefix for prefix in quantizers)  # q/k/v and friends share one quantizer
        optimized = optimized_model(seg.graphs["cpu"])
        ops = Counter(n.op_type for n in optimized.graph.node)
        assert ops["MatMulIntegerToFloat"] + ops["DynamicQuantizeMatMul"] == len(quantizers) > 0
        assert float_matmuls_on_dequantized(optimized) == []
        portable = optimized_model(seg.graphs["portable"], "portable")
        # the check can fail: the portable graph runs as written, every layer on a dequantized weight
        assert len(float_matmuls_on_dequantized(portable)) == len([lp for lp in q.plan.layers
                                                                   if lp.name not in seg.dead_layers])


def test_cpu_graphs_share_the_weights_file_and_pass_the_checker(exported):
    _, _, _, exports, folder = exported["w4a4_hsvd"]
    for seg in exports:
        assert set(seg.graphs) == {"portable", "cpu"}
        onnx.checker.check_model(str(seg.graphs["cpu"]), full_check=True)
        model = onnx.load(seg.graphs["cpu"], load_external_data=False)
        assert all(n.domain == "" for n in model.graph.node)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["weights.bin"] + [p.name for seg in exports for p in seg.graphs.values()])


# ----------------------------------------------------------------------------- CPUs without VNNI

PROBE = Path(__file__).with_name("integer_matmul_probe.py")


def _probe(tmp_path: Path, act_bits: int, emulate: bool) -> dict:
    """Errors of the fused integer matmul on cpu-flavour codes (|code| <= 63) and on full-range INT8 codes."""
    import json
    import shutil
    import subprocess
    import sys

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen)
    w[0], w[1] = 1.0, -1.0  # rows whose codes all sit at the end of the range
    q = 2 ** (act_bits - 1) - 1
    act = torch.randint(-q, q + 1, (32, 256), generator=gen)
    act[0], act[1] = q, -q  # the largest u8 activations (255 at 8 bits) against those rows
    ours = requantize_per_channel(w, MAX_CODE)
    full = requantize_per_channel(w, 127)
    np.savez(tmp_path / "codes.npz", act_codes=act.numpy(), act_scale=np.float32(0.01), scales=ours.scale.numpy(),
             codes_cpu=ours.codes.numpy().T, codes_full_range=full.codes.numpy().T)
    command = [sys.executable, str(PROBE), str(tmp_path / "codes.npz")]
    if emulate:
        command = [shutil.which("qemu-x86_64"), "-cpu", "Haswell"] + command
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("act_bits", [4, 8])
def test_integer_matmul_is_exact_here(tmp_path, act_bits):
    errors = _probe(tmp_path, act_bits, emulate=False)
    assert errors["cpu"] < 1e-6


@pytest.mark.slow
@pytest.mark.skipif(not __import__("shutil").which("qemu-x86_64"),
                    reason="qemu-x86_64 (apt package qemu-user) is not installed: no CPU without VNNI to emulate")
@pytest.mark.parametrize("act_bits", [4, 8])
def test_integer_matmul_is_exact_without_vnni(tmp_path, act_bits):
    """Under an emulated Haswell (AVX2, no VNNI) onnxruntime takes its u8 x s8 kernel whose pair sums
    saturate in int16: the cpu flavour's codes (|code| <= 63) stay exact, full-range INT8 codes do not."""
    errors = _probe(tmp_path, act_bits, emulate=True)
    assert errors["cpu"] < 1e-6
    assert errors["full_range"] > 0.1  # the check can fail: the saturating kernel really ran


def test_a_cpu_only_export_stores_only_the_cpu_codes(tmp_path):
    q = quantized_micro("rtn", "w4a4")
    sizes = {}
    with single_thread():
        for flavours in (("cpu",), ("portable", "cpu")):
            export = export_segments(q.model, q.plan, tmp_path / "+".join(flavours), TILE, TOKENS, flavour=flavours,
                                     progress=False)[0]
            sizes[flavours] = export.weights.stat().st_size
            names = {t.name for t in onnx.load(export.graphs["cpu"], load_external_data=False).graph.initializer}
            assert any(n.endswith(".qweight_cpu") for n in names) and not any(n.endswith(".qweight") for n in names)
    int4_codes = sum(lp.in_features * lp.out_features for lp in q.plan.layers) // 2
    assert sizes["portable", "cpu"] - sizes["cpu",] >= int4_codes  # the portable INT4 codes (and scales) only
