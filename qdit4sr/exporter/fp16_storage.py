"""Floating-point weights stored as fp16 where that is lossless, widened to float32 by a Cast in the graph.

`quantize_` (storage_dtype "float16") rounds branches, biases, weight scales and the unquantized layers to
fp16 values while the torch model keeps computing in float32. The export then stores every float32
constant whose values are all exactly representable in fp16 as an fp16 initializer plus a Cast to
float32: half the bytes, the same numbers. Tensors that are not exact (the Hadamard factors 1/sqrt(m),
activation scales) stay float32, so the rule can never change a result.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

MIN_BYTES = 1024  # below this the Cast node costs more than the bytes saved


def fp16_exact(values: np.ndarray) -> bool:
    """True when a float32 array round-trips through fp16 unchanged (finite, in range, no lost bits)."""
    if values.dtype != np.float32:
        return False
    with np.errstate(over="ignore"):
        half = values.astype(np.float16)
    return bool(np.isfinite(half).all() and np.array_equal(half.astype(np.float32), values))


def compact(values: np.ndarray) -> np.ndarray:
    """values as fp16 when that is lossless and large enough to matter, else unchanged."""
    if values.nbytes >= MIN_BYTES and fp16_exact(values):
        return values.astype(np.float16)
    return values


def compact_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every large, fp16-exact float32 constant of `model` becomes an fp16 constant feeding a Cast."""
    graph = gs.import_onnx(model)
    for tensor in list(graph.tensors().values()):
        if not isinstance(tensor, gs.Constant) or tensor.dtype != np.float32:
            continue
        values = np.asarray(tensor.values)
        half = compact(values)
        if half.dtype != np.float16:
            continue
        stored = gs.Constant(f"{tensor.name}.fp16", half)
        widened = gs.Variable(f"{tensor.name}.fp32", dtype=np.float32, shape=list(values.shape))
        graph.nodes.append(gs.Node("Cast", f"{tensor.name}/Cast", {"to": onnx.TensorProto.FLOAT},
                                   inputs=[stored], outputs=[widened]))
        for consumer in list(tensor.outputs):
            if consumer.op == "Cast" and consumer.outputs[0] is widened:
                continue
            for i, t in enumerate(consumer.inputs):
                if t is tensor:
                    consumer.inputs[i] = widened
    graph.cleanup().toposort()
    return gs.export_onnx(graph, do_type_check=False)
