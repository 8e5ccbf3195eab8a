"""fp16 storage of float weights: only lossless conversions, and graphs that compute the same numbers."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdit4sr.exporter.fp16_storage import MIN_BYTES, compact, compact_initializers, fp16_exact


@pytest.mark.parametrize("values, exact", [
    (np.array([0.5, -2.0, 1024.0, 0.0], np.float32), True),
    (np.array([1e-7], np.float32), False),            # below fp16's range: would flush or lose bits
    (np.array([2.0 ** -24], np.float32), True),      # the smallest fp16 subnormal is exact
    (np.array([70000.0], np.float32), False),          # overflows to inf
    (np.array([1.0 + 2.0 ** -11], np.float32), False),  # one bit more than fp16's mantissa
    (np.array([np.nan], np.float32), False),
    (np.array([0.5], np.float64), False),              # only float32 is converted
])
def test_fp16_exact(values, exact):
    assert fp16_exact(values) == exact


def test_compact_converts_only_large_exact_arrays():
    exact = np.random.default_rng(0).standard_normal(MIN_BYTES).astype(np.float16).astype(np.float32)
    assert compact(exact).dtype == np.float16 and np.array_equal(compact(exact).astype(np.float32), exact)
    assert compact(exact[:4]).dtype == np.float32                    # small: a Cast would cost more
    inexact = exact.copy()
    inexact[7] += 2.0 ** -20
    assert compact(inexact).dtype == np.float32


def _model(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"]),
             helper.make_node("Relu", ["w"], ["w_relu"]), helper.make_node("ReduceSum", ["w_relu"], ["w_sum"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32]),
                               helper.make_tensor_value_info("w_sum", TensorProto.FLOAT, [])],
                              initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_compact_initializers_keeps_results_bit_exact():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((64, 32)).astype(np.float16).astype(np.float32)  # fp16-exact, two consumers
    bias = rng.standard_normal(32).astype(np.float32)                            # small and not exact
    model = _model(weight, bias)
    compacted = compact_initializers(model)
    onnx.checker.check_model(compacted, full_check=True)
    inits = {t.name: t.data_type for t in compacted.graph.initializer}
    assert inits == {"w.fp16": TensorProto.FLOAT16, "b": TensorProto.FLOAT}
    assert sum(n.op_type == "Cast" for n in compacted.graph.node) == 1            # one Cast shared by both users
    x = rng.standard_normal((2, 64)).astype(np.float32)
    for got, ref in zip(_run(compacted, x), _run(model, x)):
        assert np.array_equal(got, ref)


def test_compact_initializers_leaves_inexact_weights_alone():
    rng = np.random.default_rng(2)
    model = _model(rng.standard_normal((64, 32)).astype(np.float32), rng.standard_normal(32).astype(np.float32))
    compacted = compact_initializers(model)
    assert {t.data_type for t in compacted.graph.initializer} == {TensorProto.FLOAT}
    assert not any(n.op_type == "Cast" for n in compacted.graph.node)
