"""The rewrite of placeholders into deployable ops, on graphs holding one placeholder: each flavour computes
what QuantLinear computes, the trt flavour follows the plugin contract, the weight layouts per flavour, the
softmax-input Q/DQ, and the rewrite's refusals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qdit4sr.artifacts.flavour import Flavour
from qdit4sr.calibration.hadamard import apply_hadamard, apply_hadamard_transpose, rotate_weight
from qdit4sr.calibration.plan import LayerPlan, SoftmaxPlan
from qdit4sr.calibration.qlinear import NO_ACT_QUANT, QuantLinear, segment_scope
from qdit4sr.calibration.quantizer import WeightQuantConfig, qmax, quantize_weight
from qdit4sr.exporter.external_data import WEIGHTS_FILE, WeightStore
from qdit4sr.exporter.graph_rewrite import HadamardFactors, prepare_layer, rewrite_segment
from qdit4sr.exporter.placeholder import PLACEHOLDER_DOMAIN, PLACEHOLDER_OP, SOFTMAX_PLACEHOLDER_OP
from qdit4sr.exporter.trt_lint import lint_model
from qdit4sr.plugins import contract
from tests.helpers.micro_export import ort_session

# Float32 ops in another order: ~1e-7 relative per op. Per layer (inputs kept away from rounding ties)
# the graph must agree to 1e-5 of the output's scale.
LAYER_RTOL = 1e-5


def _quant_layer(out_f, in_f, *, w_bits, group, act_bits, scales, hadamard, rank=0, blocks=None, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.1
    residual = quantize_weight(rotate_weight(w) if hadamard else w, WeightQuantConfig(bits=w_bits, group_size=group))
    branches = {}
    if rank:
        branches.update(down=torch.randn(rank, in_f, generator=gen) * 0.1, up=torch.randn(out_f, rank, generator=gen) * 0.1)
    if blocks:
        s_o, s_i = blocks
        p, q = out_f // s_o, in_f // s_i
        branches.update(block_sigma=torch.rand(p, q, generator=gen) + 0.5, block_u=torch.randn(p, q, s_o, generator=gen) * 0.2,
                        block_v=torch.randn(p, q, s_i, generator=gen) * 0.2)
    b = torch.randn(out_f, generator=gen) if bias else None
    return QuantLinear(residual, b, hadamard=hadamard, act_bits=list(act_bits), act_scales=list(scales),
                       segment_of_step=list(range(len(act_bits))), **branches)


def _tie_free_input(layer: QuantLinear, segment: int, lead: tuple[int, ...], seed: int) -> torch.Tensor:
    """x whose rotated values sit at least 0.1 step away from every rounding tie of the segment's quantizer."""
    gen = torch.Generator().manual_seed(seed)
    bits, s = layer.act_bits[segment], layer.act_scales[segment]
    if bits >= NO_ACT_QUANT:
        x_h = torch.randn(*lead, layer.in_features, generator=gen, dtype=torch.float64)
    else:
        q = qmax(bits)
        codes = torch.randint(-q - 2, q + 3, (*lead, layer.in_features), generator=gen)  # some beyond the clip
        x_h = (codes + (torch.rand(codes.shape, generator=gen, dtype=torch.float64) - 0.5) * 0.8) * s
    return (apply_hadamard_transpose(x_h) if layer.hadamard else x_h).float()


def _single_layer_graph(layer: QuantLinear, rank: int, folder: Path, segment: int, flavour: str) -> Path:
    """The rewrite of a graph holding nothing but one placeholder."""
    name = "layer"
    dims = ["batch", 5][: rank - 1] + [layer.in_features]
    graph = helper.make_graph(
        [helper.make_node(PLACEHOLDER_OP, ["x"], ["y"], domain=PLACEHOLDER_DOMAIN, layer=name)], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    base = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(PLACEHOLDER_DOMAIN, 1)])
    folder.mkdir(parents=True, exist_ok=True)
    with WeightStore(folder / WEIGHTS_FILE, threshold_bytes=256) as store:
        plan = LayerPlan(name, layer.in_features, layer.out_features, layer.weight_bits, 1.0, list(layer.act_bits),
                         list(layer.act_scales), 0 if layer.up is None else layer.up.shape[1],
                         None if layer.block_shape is None else list(layer.block_shape))
        spec = prepare_layer(store, plan, layer, rank)
        model = rewrite_segment(base, {name: spec}, segment, flavour, 21, HadamardFactors(store))
    path = folder / f"{flavour}_{segment}.onnx"
    onnx.save(model, path)
    return path


LAYER_CASES = {
    # INT4 groups of 64, A4 then A6, Hadamard 2^7, low-rank and block rank-1 branches, rank-3 input
    "w4g64_a4a6_hsvd": dict(shape=(96, 128), input_rank=3, w_bits=4, group=64, act_bits=(4, 6), scales=(0.3, 0.05),
                            hadamard=True, rank=8, blocks=(32, 32)),
    # INT8 container for 6-bit per-channel codes, A8, Paley x Sylvester Hadamard (96 = 12 * 8), rank-2 input
    "w6perchannel_a8_svd_paley": dict(shape=(64, 96), input_rank=2, w_bits=6, group=None, act_bits=(8,),
                                      scales=(0.02,), hadamard=True, rank=4),
    # 3-bit codes in INT4, no rotation, A16 (no Q/DQ) then A2, blocks only, no bias
    "w3_a16a2_blocks_nobias": dict(shape=(48, 64), input_rank=3, w_bits=3, group=64, act_bits=(16, 2),
                                   scales=(1.0, 0.4), hadamard=False, blocks=(16, 16), bias=False),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_one_layer_matches_quantlinear(case, tmp_path):
    c = dict(LAYER_CASES[case])
    out_f, in_f = c.pop("shape")
    rank = c.pop("input_rank")
    layer = _quant_layer(out_f, in_f, **c)
    lead = (3, 5)[: rank - 1]
    for k in range(len(layer.act_bits)):
        path = _single_layer_graph(layer, rank, tmp_path / case, k, "portable")
        x = _tie_free_input(layer, k, lead, seed=k)
        with torch.no_grad(), segment_scope(k):
            ref = layer(x).numpy()
        got = ort_session(path).run(None, {"x": x.numpy()})[0]
        scale = float(np.abs(ref).max())
        assert got.shape == ref.shape
        err = float(np.abs(got - ref).max())
        assert err <= LAYER_RTOL * scale, (case, k, err / scale)
        # The check can fail: another segment's settings (or a missing branch) are far outside the tolerance.
        with torch.no_grad(), segment_scope(len(layer.act_bits) - 1 - k):
            other = layer(x).numpy()
        if len(layer.act_bits) > 1:
            assert np.abs(other - ref).max() > 100 * LAYER_RTOL * scale
        assert np.abs(got - (ref - layer.branch(apply_hadamard(x) if layer.hadamard else x).numpy())).max() \
            > 100 * LAYER_RTOL * scale


def test_one_layer_trt_flavour_uses_the_plugin_contract(tmp_path):
    c = dict(LAYER_CASES["w4g64_a4a6_hsvd"])
    out_f, in_f = c.pop("shape")
    rank = c.pop("input_rank")
    path = _single_layer_graph(_quant_layer(out_f, in_f, **c), rank, tmp_path, 0, "trt")
    assert lint_model(path) == []
    model = onnx.load(path, load_external_data=False)
    plugins = {n.op_type: n for n in model.graph.node if n.domain == contract.DOMAIN}
    assert set(plugins) == {"LowRankBranch", "BlockRank1Branch"}
    attrs = {a.name: helper.get_attribute_value(a) for a in plugins["BlockRank1Branch"].attribute}
    assert attrs["block_out"] == 32 and attrs["block_in"] == 32 and attrs["aot"] == 1
    assert attrs["in_features"] == in_f and attrs["out_features"] == out_f
    assert any(o.domain == contract.DOMAIN for o in model.opset_import)


# ----------------------------------------------------------------------------- weight layouts and refusals

def _spec(layer: QuantLinear, store: WeightStore, name: str = "layer", rank: int = 3):
    plan = LayerPlan(name, layer.in_features, layer.out_features, layer.weight_bits, 1.0, list(layer.act_bits),
                     list(layer.act_scales))
    return prepare_layer(store, plan, layer, rank)


def test_weight_layouts_per_flavour(tmp_path):
    """Blocked INT8: [K/G, G, N] for portable (fusion-proof), [K, N] blocked for trt; per-channel INT4 for trt:
    blocks of 64 repeating the channel scale; the codes are stored once for both flavours."""
    with WeightStore(tmp_path / WEIGHTS_FILE, threshold_bytes=1 << 30) as store:
        int8_blocked = _spec(_quant_layer(32, 128, w_bits=6, group=64, act_bits=(8,), scales=(0.1,), hadamard=False),
                             store, "a")
        int4_channel = _spec(_quant_layer(32, 128, w_bits=4, group=None, act_bits=(8,), scales=(0.1,), hadamard=False),
                             store, "b")
    portable, trt = int8_blocked.weight[Flavour.PORTABLE], int8_blocked.weight[Flavour.TRT]
    assert list(portable.codes.dims) == [2, 64, 32] and portable.axis == 1 and portable.reshape == (128, 32)
    assert list(trt.codes.dims) == [128, 32] and (trt.axis, trt.block_size) == (0, 64) and trt.reshape is None
    assert portable.codes.raw_data == trt.codes.raw_data
    portable, trt = int4_channel.weight[Flavour.PORTABLE], int4_channel.weight[Flavour.TRT]
    assert (portable.axis, portable.block_size, list(portable.scale.dims)) == (1, 0, [32])
    assert (trt.axis, trt.block_size, list(trt.scale.dims)) == (0, 64, [2, 32]) and trt.codes is portable.codes
    scales = numpy_helper.to_array(trt.scale)
    assert np.array_equal(scales[0], scales[1]) and np.array_equal(scales[0], numpy_helper.to_array(portable.scale))


def test_spec_takes_bits_and_scales_from_the_plan(tmp_path):
    layer = _quant_layer(32, 64, w_bits=4, group=64, act_bits=(8, 8), scales=(0.1, 0.2), hadamard=False)
    plan = LayerPlan("layer", 64, 32, 4, 1.0, [6, 5], [0.3, 0.4])
    with WeightStore(tmp_path / WEIGHTS_FILE) as store:
        spec = prepare_layer(store, plan, layer, 2)
    assert (spec.act_bits, spec.act_scales, spec.weight_bits) == ([6, 5], [0.3, 0.4], 4)


def _base(nodes, inputs, dims=("batch", 8)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(dims))
                                           for n in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                   helper.make_opsetid(PLACEHOLDER_DOMAIN, 1)])


def test_softmax_placeholder_becomes_static_int8_qdq_then_softmax(tmp_path):
    base = _base([helper.make_node(SOFTMAX_PLACEHOLDER_OP, ["x"], ["y"], domain=PLACEHOLDER_DOMAIN, site="core")],
                 ["x"])
    site = SoftmaxPlan("core", 8, [0.05, 0.1])
    with WeightStore(tmp_path / WEIGHTS_FILE) as store:
        model = rewrite_segment(base, {}, 1, "portable", 21, HadamardFactors(store), {"core": site})
    assert [n.op_type for n in model.graph.node] == ["Clip", "QuantizeLinear", "DequantizeLinear", "Softmax"]
    onnx.save(model, tmp_path / "softmax.onnx")
    x = np.random.default_rng(0).normal(scale=3.0, size=(2, 8)).astype(np.float32)
    got = ort_session(tmp_path / "softmax.onnx").run(None, {"x": x})[0]
    s = np.float32(0.1)
    ref = torch.from_numpy(np.clip(np.round(x / s), -127, 127) * s).softmax(-1).numpy()
    assert np.abs(got - ref).max() < 1e-6


def test_rewrite_refusals(tmp_path):
    layer_node = helper.make_node(PLACEHOLDER_OP, ["x"], ["y"], domain=PLACEHOLDER_DOMAIN, layer="layer")
    layer = _quant_layer(16, 8, w_bits=4, group=None, act_bits=(8,), scales=(0.1,), hadamard=False)
    with WeightStore(tmp_path / WEIGHTS_FILE) as store:
        factors = HadamardFactors(store)
        spec = _spec(layer, store, rank=2)
        with pytest.raises(ValueError, match="flavour must be one of"):
            rewrite_segment(_base([layer_node], ["x"]), {"layer": spec}, 0, "tensorrt", 21, factors)
        with pytest.raises(ValueError, match="has no prepared layer"):
            rewrite_segment(_base([layer_node], ["x"]), {}, 0, "portable", 21, factors)
        with pytest.raises(ValueError, match="no node in the traced graph"):
            rewrite_segment(_base([helper.make_node("Identity", ["x"], ["y"])], ["x"]), {"layer": spec}, 0,
                            "portable", 21, factors)
        with pytest.raises(ValueError, match="has no softmax spec"):
            rewrite_segment(_base([helper.make_node(SOFTMAX_PLACEHOLDER_OP, ["x"], ["y"], domain=PLACEHOLDER_DOMAIN,
                                                    site="core")], ["x"]), {}, 0, "portable", 21, factors)
        with pytest.raises(ValueError, match="unknown placeholder op"):
            rewrite_segment(_base([helper.make_node("Other", ["x"], ["y"], domain=PLACEHOLDER_DOMAIN)], ["x"]), {}, 0,
                            "portable", 21, factors)
