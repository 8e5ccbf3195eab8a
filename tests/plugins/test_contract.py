"""The op contract between the exporter's plugin nodes and the TensorRT plugins: the op descriptions, the
nodes it builds, and every kind of non-conforming node check_plugin_node reports."""
import onnx
import pytest
from onnx import helper

from qdit4sr.plugins import contract

K, N, RANK, S_O, S_I = 128, 64, 8, 16, 32
P, Q = N // S_O, K // S_I
LOW_SHAPES = {"x": (None, 4, K), "down": (RANK, K), "up": (N, RANK)}
BLOCK_SHAPES = {"sigma": (P, Q), "u": (P, Q, S_O), "v": (P, Q, S_I)}


def _low(**overrides) -> onnx.NodeProto:
    values = {"rank": RANK, "in_features": K, "out_features": N, **overrides}
    node = contract.make_plugin_node("LowRankBranch", ["x", "down", "up"], ["y"], "low",
                                     **{k: v for k, v in values.items() if v is not None})
    for name in [k for k, v in overrides.items() if v is None]:
        attrs = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(attrs)
    return node


def _block(**overrides) -> onnx.NodeProto:
    values = {"block_out": S_O, "block_in": S_I, "in_features": K, "out_features": N, **overrides}
    return contract.make_plugin_node("BlockRank1Branch", ["x", "sigma", "u", "v"], ["y"], "block", **values)


def test_ops_describe_the_branches():
    low, block = contract.PLUGIN_OPS["LowRankBranch"], contract.PLUGIN_OPS["BlockRank1Branch"]
    assert [(t.name, t.rank) for t in low.inputs] == [("x", None), ("down", 2), ("up", 2)]
    assert [(t.name, t.rank) for t in block.inputs] == [("x", None), ("sigma", 2), ("u", 3), ("v", 3)]
    assert low.constant_inputs == (1, 2) and block.constant_inputs == (1, 2, 3)
    assert {a.name for a in block.attributes} >= {"block_out", "block_in", "in_features", "out_features",
                                                  "plugin_namespace", "plugin_version"}
    assert not low.attribute(contract.TRT_FLAVOUR_AOT_ATTRIBUTE).required
    assert low.attribute("nope") is None


def test_built_nodes_carry_domain_namespace_and_version():
    node = _low(aot=1)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == contract.DOMAIN and node.op_type == "LowRankBranch"
    assert attrs["plugin_namespace"] == contract.PLUGIN_NAMESPACE.encode()
    assert attrs["plugin_version"] == contract.PLUGIN_VERSION.encode() and attrs["aot"] == 1
    opset = contract.domain_opset()
    assert (opset.domain, opset.version) == (contract.DOMAIN, contract.DOMAIN_VERSION)
    with pytest.raises(KeyError, match="unknown plugin op"):
        contract.plugin_attributes("Conv")


def test_conforming_nodes_have_no_problems():
    assert contract.check_plugin_node(_low(), LOW_SHAPES) == []
    assert contract.check_plugin_node(_low(aot=1)) == []  # no shapes: attributes only
    assert contract.check_plugin_node(_block(), BLOCK_SHAPES) == []


@pytest.mark.parametrize("overrides, fragment", [
    ({"rank": "8"}, "'rank' must be int"),
    ({"plugin_version": "2"}, "'plugin_version' is '2'"),
    ({"plugin_namespace": None}, "missing string attribute 'plugin_namespace'"),
    ({"extra": 1}, "'extra' is not part of"),
    ({"aot": 2}, "'aot' is 2"),
    ({"in_features": 96}, "in_features=96"),
    ({"out_features": 0}, "positive size"),
])
def test_each_problem_is_reported_alone(overrides, fragment):
    problems = contract.check_plugin_node(_low(**overrides), LOW_SHAPES)
    assert len(problems) == 1 and fragment in problems[0], problems


def test_domain_op_arity_and_shapes():
    node = _low()
    node.domain = "other"
    assert contract.check_plugin_node(node) == ["domain is 'other', plugin ops live in 'qdit4sr'"]
    node = _low()
    node.op_type = "Conv"
    assert "unknown plugin op 'Conv'" in contract.check_plugin_node(node)[0]
    node = _low()
    del node.input[2]
    assert any("expects 3 inputs" in p for p in contract.check_plugin_node(node))
    assert any("rank 2" in p for p in contract.check_plugin_node(_low(), {**LOW_SHAPES, "up": (N, RANK, 1)}))
    assert any("disagrees" in p for p in contract.check_plugin_node(_low(), {**LOW_SHAPES, "x": (2, K + 1)}))


def test_block_products():
    (problem,) = contract.check_plugin_node(_block(out_features=N + S_O), BLOCK_SHAPES)
    assert f"N={N + S_O} must equal P * s_o = {P} * {S_O}" in problem
