"""TensorRT lint rules on small hand-built graphs: one clean graph, then one planted violation per case."""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdit4sr.exporter.trt_lint import Violation, format_violations, lint_model
from qdit4sr.plugins import contract

B, T, K, N = "batch", 4, 128, 64
RANK, S_O, S_I = 8, 16, 32
P, Q = N // S_O, K // S_I
GRAPH_NAME = "tiny_qlinear"

_rng = np.random.default_rng(0)


def _floats(name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array(_rng.standard_normal(shape).astype(np.float32) * 0.1, name)


def _int4(name: str, *shape: int) -> TensorProto:
    values = _rng.integers(-8, 8, size=shape)
    return helper.make_tensor(name, TensorProto.INT4, shape, values.flatten().tolist())


def _zeros(name: str, dtype: int, *shape: int) -> TensorProto:
    return helper.make_tensor(name, dtype, shape, [0] * int(np.prod(shape, dtype=np.int64)))


def clean_model() -> onnx.ModelProto:
    """Every construct the exporter may emit, each in a form TensorRT accepts.

    x -> Q/DQ (INT8, scalar Constant scale) -> MatMul with an INT4 [K, N] weight blocked by 64 on K
                                            -> MatMul with an INT4 [N, K] weight blocked by 128 on K (transposed)
      -> MatMul with a per-channel INT8 weight with a zero zero point
    x -> LowRankBranch, x -> BlockRank1Branch (sigma stored fp16 and widened by a Cast); everything is summed.
    The INT4 [N, K] weight has an fp16 scale: its DQ outputs fp16, then a Cast to float32.
    """
    inits = [
        _zeros("act_zp", TensorProto.INT8),
        _int4("w4", K, N), _floats("w4_scale", K // 64, N),
        _int4("w4t", N, K), numpy_helper.from_array(_rng.random((N, K // 128)).astype(np.float16), "w4t_scale"),
        helper.make_tensor("w8", TensorProto.INT8, [N, N], _rng.integers(-127, 128, N * N).tolist()),
        _floats("w8_scale", N), _zeros("w8_zp", TensorProto.INT8, N),
        _floats("lr_down", RANK, K), _floats("lr_up", N, RANK),
        numpy_helper.from_array(_rng.random((P, Q)).astype(np.float16), "br_sigma_fp16"),
        _floats("br_u", P, Q, S_O), _floats("br_v", P, Q, S_I),
    ]
    nodes = [
        helper.make_node("Constant", [], ["act_scale"], name="act_scale_const",
                         value=helper.make_tensor("v", TensorProto.FLOAT, [], [0.05])),
        helper.make_node("QuantizeLinear", ["x", "act_scale", "act_zp"], ["x_q"], name="q_act"),
        helper.make_node("DequantizeLinear", ["x_q", "act_scale", "act_zp"], ["x_dq"], name="dq_act"),
        helper.make_node("DequantizeLinear", ["w4", "w4_scale"], ["w4_f"], name="dq_w4", axis=0, block_size=64),
        helper.make_node("MatMul", ["x_dq", "w4_f"], ["y1"], name="mm_w4"),
        helper.make_node("DequantizeLinear", ["w4t", "w4t_scale"], ["w4t_h"], name="dq_w4t", axis=1, block_size=128),
        helper.make_node("Cast", ["w4t_h"], ["w4t_f"], name="cast_w4t", to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["w4t_f"], ["w4t_ft"], name="t_w4t", perm=[1, 0]),
        helper.make_node("Cast", ["br_sigma_fp16"], ["br_sigma"], name="cast_sigma", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x_dq", "w4t_ft"], ["y1t"], name="mm_w4t"),
        helper.make_node("DequantizeLinear", ["w8", "w8_scale", "w8_zp"], ["w8_f"], name="dq_w8", axis=0),
        helper.make_node("MatMul", ["y1", "w8_f"], ["y2"], name="mm_w8"),
        contract.make_plugin_node("LowRankBranch", ["x", "lr_down", "lr_up"], ["y_lr"], "lowrank",
                                  rank=RANK, in_features=K, out_features=N),
        contract.make_plugin_node("BlockRank1Branch", ["x", "br_sigma", "br_u", "br_v"], ["y_br"], "blockrank1",
                                  block_out=S_O, block_in=S_I, in_features=K, out_features=N),
        helper.make_node("Sum", ["y2", "y1t", "y_lr", "y_br"], ["y"], name="sum"),
    ]
    graph = helper.make_graph(
        nodes, GRAPH_NAME,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, T, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, T, N])],
        initializer=inits,
        value_info=[helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, T, N]) for n in ("y_lr", "y_br")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), contract.domain_opset()])
    model.ir_version = 10
    return model


# ----------------------------------------------------------------------------- graph editing helpers

def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    _del_attr(node, name)
    node.attribute.append(helper.make_attribute(name, value))


def _del_attr(node: onnx.NodeProto, name: str) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)


def _replace_init(model: onnx.ModelProto, tensor: TensorProto) -> None:
    inits = model.graph.initializer
    index = next(i for i, t in enumerate(inits) if t.name == tensor.name)
    inits[index].CopyFrom(tensor)


def _low_opset(m):
    m.opset_import[0].version = 19


def _int4_activation(m):
    _replace_init(m, _zeros("act_zp", TensorProto.INT4))


def _per_channel_int4(m):
    dq = _node(m, "dq_w4")
    _del_attr(dq, "block_size")
    _set_attr(dq, "axis", 1)
    _replace_init(m, _floats("w4_scale", N))


def _block_32(m):
    _set_attr(_node(m, "dq_w4"), "block_size", 32)
    _replace_init(m, _floats("w4_scale", K // 32, N))


def _uint8_activation(m):
    _replace_init(m, _zeros("act_zp", TensorProto.UINT8))


def _scale_from_input(m):
    m.graph.input.append(helper.make_tensor_value_info("runtime_scale", TensorProto.FLOAT, []))
    _node(m, "q_act").input[1] = "runtime_scale"


def _per_channel_activation(m):
    _set_attr(_node(m, "act_scale_const"), "value", _floats("v", K))
    _replace_init(m, _zeros("act_zp", TensorProto.INT8, K))
    for name in ("q_act", "dq_act"):
        _set_attr(_node(m, name), "axis", -1)


def _nonzero_zero_point(m):
    _replace_init(m, helper.make_tensor("w8_zp", TensorProto.INT8, [N], [0] * (N - 1) + [3]))


def _missing_namespace(m):
    _del_attr(_node(m, "lowrank"), "plugin_namespace")


def _rank_mismatch(m):
    _set_attr(_node(m, "lowrank"), "rank", RANK // 2)


def _unknown_custom_op(m):
    m.graph.node.append(helper.make_node("FancyGelu", ["y2"], ["y_fancy"], name="fancy", domain="com.example"))
    m.opset_import.append(helper.make_opsetid("com.example", 1))


def _dynamic_feature_dim(m):
    dim = m.graph.input[0].type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_param = "tokens"


def _int4_graph_input(m):
    m.graph.input.append(helper.make_tensor_value_info("packed", TensorProto.INT4, [4, 4]))


def _quantize_without_zero_point(m):
    # ONNX then quantizes to UINT8, which TensorRT cannot run on activations.
    for name in ("q_act", "dq_act"):
        del _node(m, name).input[2]


def _plugin_weight_from_input(m):
    kept = [t for t in m.graph.initializer if t.name != "lr_down"]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    m.graph.input.append(helper.make_tensor_value_info("lr_down", TensorProto.FLOAT, [RANK, K]))


def _plugin_weight_cast_from_input(m):
    kept = [t for t in m.graph.initializer if t.name != "br_sigma_fp16"]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    m.graph.input.append(helper.make_tensor_value_info("br_sigma_fp16", TensorProto.FLOAT16, [P, Q]))


def _blocked_int8_weight(m):
    _replace_init(m, helper.make_tensor("w8", TensorProto.INT8, [N, N], _rng.integers(-127, 128, N * N).tolist()))
    _replace_init(m, _floats("w8_scale", N // 32, N))
    _replace_init(m, _zeros("w8_zp", TensorProto.INT8, N // 32, N))
    _set_attr(_node(m, "dq_w8"), "block_size", 32)


def _block_out_mismatch(m):
    _set_attr(_node(m, "blockrank1"), "block_out", S_O // 2)


VIOLATIONS: dict[str, tuple[Callable[[onnx.ModelProto], None], str, str]] = {
    "low-opset": (_low_opset, "opset", GRAPH_NAME),
    "int4-activation-quantize": (_int4_activation, "int4-weight-only", "q_act"),
    "per-channel-int4": (_per_channel_int4, "int4-block", "dq_w4"),
    "int4-block-32": (_block_32, "int4-block", "dq_w4"),
    "uint8-activation": (_uint8_activation, "act-int8-only", "q_act"),
    "scale-from-graph-input": (_scale_from_input, "constant-scale", "q_act"),
    "non-scalar-activation-scale": (_per_channel_activation, "constant-scale", "dq_act"),
    "nonzero-zero-point": (_nonzero_zero_point, "zero-point", "dq_w8"),
    "plugin-missing-namespace": (_missing_namespace, "plugin-attributes", "lowrank"),
    "plugin-rank-mismatch": (_rank_mismatch, "plugin-attributes", "lowrank"),
    "unknown-custom-op": (_unknown_custom_op, "plugin-attributes", "fancy"),
    "dynamic-non-batch-dim": (_dynamic_feature_dim, "static-shape", "x"),
    "int4-graph-input": (_int4_graph_input, "int4-weight-only", "packed"),
    "quantize-default-uint8": (_quantize_without_zero_point, "act-int8-only", "q_act"),
    "plugin-weight-not-constant": (_plugin_weight_from_input, "static-shape", "lowrank"),
    "plugin-weight-cast-of-input": (_plugin_weight_cast_from_input, "static-shape", "blockrank1"),
    "blocked-int8-weight": (_blocked_int8_weight, "block-int4-only", "dq_w8"),
    "plugin-block-out-mismatch": (_block_out_mismatch, "plugin-attributes", "blockrank1"),
}


def planted(case: str) -> onnx.ModelProto:
    model = clean_model()
    VIOLATIONS[case][0](model)
    return model


# ----------------------------------------------------------------------------- the linter

def test_clean_model_is_valid_onnx_and_lint_free():
    model = clean_model()
    onnx.checker.check_model(model, full_check=True)
    assert lint_model(model) == []


def test_fp8_activations_are_allowed():
    model = clean_model()
    _replace_init(model, _zeros("act_zp", TensorProto.FLOAT8E4M3FN))
    assert lint_model(model) == []


@pytest.mark.parametrize("case", list(VIOLATIONS))
def test_planted_violation_is_reported_alone(case):
    _, rule, node = VIOLATIONS[case]
    violations = lint_model(planted(case))
    assert {v.rule for v in violations} == {rule}, format_violations(violations)
    assert node in {v.node for v in violations}, format_violations(violations)


def test_messages_name_the_problem_and_the_fix():
    (low,) = lint_model(planted("low-opset"))
    assert "19" in low.message and ">= 21" in low.message
    messages = {v.node: v.message for v in lint_model(planted("uint8-activation"))}
    assert "UINT8" in messages["q_act"] and "INT8" in messages["q_act"] and "FP8 E4M3" in messages["q_act"]
    (rank,) = lint_model(planted("plugin-rank-mismatch"))
    assert "rank=4" in rank.message and "down.shape[0] = 8" in rank.message
    (block,) = [v for v in lint_model(planted("int4-block-32")) if "block_size is 32" in v.message]
    assert "64 or 128" in block.message


def test_int4_activation_flags_both_quantize_and_dequantize():
    violations = lint_model(planted("int4-activation-quantize"))
    assert {(v.rule, v.node) for v in violations} == {("int4-weight-only", "q_act"), ("int4-weight-only", "dq_act")}


def test_int4_scale_layout_must_match_the_blocks():
    model = clean_model()
    _replace_init(model, _floats("w4_scale", 1, N))
    (violation,) = lint_model(model)
    assert (violation.rule, violation.node) == ("int4-block", "dq_w4") and "[2, 64]" in violation.message


def test_weights_dequantized_from_uint8_are_flagged():
    model = clean_model()
    _replace_init(model, _zeros("w8_zp", TensorProto.UINT8, N))
    _replace_init(model, helper.make_tensor("w8", TensorProto.UINT8, [N, N], [1] * (N * N)))
    assert [(v.rule, v.node) for v in lint_model(model)] == [("weight-dtype", "dq_w8")]


def test_lint_does_not_modify_the_model():
    model = planted("uint8-activation")
    before = model.SerializeToString()
    lint_model(model)
    assert model.SerializeToString() == before


def test_lints_a_file_without_reading_its_external_data(tmp_path):
    path = tmp_path / "model.onnx"
    model = planted("per-channel-int4")
    onnx.save_model(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    (tmp_path / "weights.bin").unlink()  # shapes and dtypes are enough
    assert [(v.rule, v.node) for v in lint_model(path)] == [("int4-block", "dq_w4")]
    assert [(v.rule, v.node) for v in lint_model(str(path))] == [("int4-block", "dq_w4")]


def test_format_violations_one_line_each():
    text = format_violations([Violation("opset", "g", "too old;\nupgrade"), Violation("zero-point", "n", "x")])
    assert text.splitlines() == ["opset: g: too old; upgrade", "zero-point: n: x"]
