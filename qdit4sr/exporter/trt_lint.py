"""Static checks that an exported ONNX graph only uses what TensorRT 10/11 can build.

TensorRT rejects some valid ONNX quantization patterns (INT4 activations, asymmetric zero points,
computed scales, ...) only when the engine is built, which needs a GPU and TensorRT. These rules catch
them on the ONNX file alone:

    opset             default-domain opset >= 21 (INT4 and blocked Q/DQ)
    int4-weight-only  INT4 only as the constant input of DequantizeLinear
    int4-block        INT4 weights blocked (block_size 64 or 128) along one of the last two axes
    block-int4-only   block quantization (block_size > 0) only for INT4 weights; INT8 per channel or tensor
    weight-dtype      weights quantized to INT8, INT4 or FP8 E4M3 only
    act-int8-only     activations quantized to INT8 (or FP8 E4M3) only
    constant-scale    constant scales and zero points; per-tensor (scalar) activation scales
    zero-point        zero points all zero (symmetric quantization only)
    plugin-attributes custom nodes are qdit4sr plugins that follow the plugin contract
    static-shape      static graph inputs except the batch axis; constant plugin weights (an initializer,
                      or a Cast of one for weights stored in fp16)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..plugins import contract

MIN_OPSET = 21
INT4_BLOCK_SIZES = (64, 128)
ACTIVATION_DTYPES = (TensorProto.INT8, TensorProto.FLOAT8E4M3FN)
WEIGHT_DTYPES = (TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN)
_DEFAULT_DOMAINS = ("", "ai.onnx")
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")

Shape = tuple[int | None, ...]


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str  # node name, or tensor / graph name for graph-level issues
    message: str


class ModelLoadError(ValueError):
    """The file is missing or is not an ONNX model."""


@dataclass(frozen=True)
class _Constant:
    """An initializer or Constant-node output: shape and dtype always, values when stored inline."""

    dims: tuple[int, ...]
    dtype: int
    tensor: TensorProto | None

    def values(self) -> np.ndarray | None:
        if self.tensor is None or self.tensor.data_location == TensorProto.EXTERNAL:
            return None  # external data is not loaded: the linter only needs shapes and dtypes
        return numpy_helper.to_array(self.tensor)


@dataclass
class _Graph:
    """Index of the top-level graph that the rules query."""

    model: onnx.ModelProto
    constants: dict[str, _Constant]
    types: dict[str, int]  # elem types of non-constant tensors, from declarations and shape inference
    shapes: dict[str, Shape]
    producers: dict[str, onnx.NodeProto]
    nodes: list[tuple[str, onnx.NodeProto]]  # (display name, node)
    local_functions: set[tuple[str, str]] = field(default_factory=set)

    @property
    def graph(self) -> onnx.GraphProto:
        return self.model.graph

    @property
    def name(self) -> str:
        return self.graph.name or "model"

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def dtype(self, name: str) -> int | None:
        if name in self.constants:
            return self.constants[name].dtype
        return self.types.get(name)

    def shape(self, name: str) -> Shape | None:
        if name in self.constants:
            return self.constants[name].dims
        return self.shapes.get(name)

    def is_weight(self, name: str) -> bool:
        """A constant, or a QuantizeLinear of a constant (quantization of float weights)."""
        producer = self.producers.get(name)
        return self.is_constant(name) or (producer is not None and _is_qdq(producer, "QuantizeLinear")
                                          and self.is_constant(producer.input[0]))

    def is_stored_weight(self, name: str) -> bool:
        """A constant, or a Cast of a constant (weights stored in fp16 and widened in the graph)."""
        producer = self.producers.get(name)
        return self.is_constant(name) or (producer is not None and producer.op_type == "Cast"
                                          and producer.domain in _DEFAULT_DOMAINS and self.is_constant(producer.input[0]))

    def qdq_nodes(self) -> Iterator[tuple[str, onnx.NodeProto]]:
        return ((name, node) for name, node in self.nodes if _is_qdq(node))


# ----------------------------------------------------------------------------- loading and indexing

def load_model(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """The model itself, or the file read without its external data (only shapes and dtypes are needed)."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types on garbage input
        detail = " ".join(str(exc).split())[:200]
        raise ModelLoadError(f"{path}: not an ONNX model ({type(exc).__name__}: {detail})") from exc
    # Arbitrary bytes sometimes decode as a protobuf message with only unknown fields.
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise ModelLoadError(f"{path}: not an ONNX model (no graph)")
    return proto


def _index(model: onnx.ModelProto) -> _Graph:
    inferred = _infer(model)
    graph = model.graph
    inputs = {vi.name for vi in graph.input}
    # An initializer that is also a graph input is only a default value: the caller may override it.
    constants = {t.name: _Constant(tuple(t.dims), t.data_type, t) for t in graph.initializer if t.name not in inputs}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output:
            constant = _constant_node_value(node)
            if constant is not None:
                constants[node.output[0]] = constant
    types, shapes = _value_types(inferred.graph)
    return _Graph(model=model, constants=constants, types=types, shapes=shapes,
                  producers={out: node for node in graph.node for out in node.output},
                  nodes=[(node.name or f"{node.op_type}_{i}", node) for i, node in enumerate(graph.node)],
                  local_functions={(f.domain, f.name) for f in model.functions})


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference gives the dtypes between Q and DQ nodes; the rules still work without it."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is best effort on graphs the linter is about to criticise anyway
        return model


def _constant_node_value(node: onnx.NodeProto) -> _Constant | None:
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if attr.name == "value":
            return _Constant(tuple(value.dims), value.data_type, value)
        if attr.name == "sparse_value":
            return _Constant(tuple(value.dims), value.values.data_type, None)
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            dtype = TensorProto.FLOAT if attr.name.startswith("value_float") else TensorProto.INT64
            array = np.asarray(value, dtype=onnx.helper.tensor_dtype_to_np_dtype(dtype))
            return _Constant(array.shape, dtype, numpy_helper.from_array(array))
    return None


def _value_types(graph: onnx.GraphProto) -> tuple[dict[str, int], dict[str, Shape]]:
    types: dict[str, int] = {}
    shapes: dict[str, Shape] = {}
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if not vi.type.HasField("tensor_type"):
            continue
        tensor_type = vi.type.tensor_type
        if tensor_type.elem_type:
            types[vi.name] = tensor_type.elem_type
        if tensor_type.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
    return types, shapes


def _is_qdq(node: onnx.NodeProto, op_type: str | None = None) -> bool:
    return node.domain in _DEFAULT_DOMAINS and node.op_type in ((op_type,) if op_type else _QDQ_OPS)


def _attr(node: onnx.NodeProto, name: str, default: int | None = None) -> int | None:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _optional_input(node: onnx.NodeProto, index: int) -> str | None:
    return node.input[index] if len(node.input) > index and node.input[index] else None


def _dtype_name(dtype: int | None) -> str:
    return "unknown" if dtype is None else TensorProto.DataType.Name(dtype)


def _quantized_dtype(g: _Graph, node: onnx.NodeProto) -> int | None:
    """Element type on the quantized side of a Q or DQ node (None when it cannot be told)."""
    zero_point = _optional_input(node, 2)
    if zero_point is not None and g.dtype(zero_point) is not None:
        return g.dtype(zero_point)
    if node.op_type == "QuantizeLinear":
        # ONNX's default when there is neither a zero point nor output_dtype is UINT8.
        return _attr(node, "output_dtype", 0) or TensorProto.UINT8
    return g.dtype(node.input[0])


# ----------------------------------------------------------------------------- rules

def _check_opset(g: _Graph) -> Iterator[Violation]:
    versions = [o.version for o in g.model.opset_import if o.domain in _DEFAULT_DOMAINS]
    version = max(versions, default=None)
    if version is None or version < MIN_OPSET:
        yield Violation("opset", g.name, f"default-domain opset is {version}; TensorRT needs opset >= {MIN_OPSET} "
                                         f"for INT4 and blocked Q/DQ: export with opset_version={MIN_OPSET} or later")


def _check_int4_weight_only(g: _Graph) -> Iterator[Violation]:
    fix = "INT4 is weight-only in TensorRT: keep INT4 for constant weights feeding DequantizeLinear"
    for vi in (*g.graph.input, *g.graph.output):
        if g.dtype(vi.name) == TensorProto.INT4:
            yield Violation("int4-weight-only", vi.name, f"graph input/output {vi.name} is INT4; {fix}")
    for name, node in g.nodes:
        problem = _int4_misuse(g, node)
        if problem:
            yield Violation("int4-weight-only", name, f"{problem}; {fix} (activations use an INT8 container)")


def _int4_misuse(g: _Graph, node: onnx.NodeProto) -> str | None:
    if _is_qdq(node, "QuantizeLinear") and _quantized_dtype(g, node) == TensorProto.INT4:
        return "QuantizeLinear produces INT4"
    if _is_qdq(node, "DequantizeLinear"):
        if not g.is_constant(node.input[0]) and _quantized_dtype(g, node) == TensorProto.INT4:
            return f"DequantizeLinear reads INT4 from the non-constant tensor {node.input[0]}"
        return None
    if node.domain in _DEFAULT_DOMAINS and node.op_type == "Cast" and _attr(node, "to") == TensorProto.INT4:
        return "Cast produces INT4"
    int4_inputs = [i for i in node.input if g.is_constant(i) and g.dtype(i) == TensorProto.INT4]
    if int4_inputs:
        return f"{node.op_type} consumes the INT4 constant {int4_inputs[0]}"
    return None


def _check_int4_block(g: _Graph) -> Iterator[Violation]:
    for name, node in g.qdq_nodes():
        weight = node.input[0]
        if node.op_type == "DequantizeLinear" and g.is_constant(weight) and g.dtype(weight) == TensorProto.INT4:
            for problem in _int4_block_problems(g, node):
                yield Violation("int4-block", name, problem)


def _int4_block_problems(g: _Graph, node: onnx.NodeProto) -> list[str]:
    dims = g.constants[node.input[0]].dims
    rank = len(dims)
    block = _attr(node, "block_size", 0)
    axis = _attr(node, "axis", 1)
    axis = axis + rank if axis < 0 else axis
    sizes = " or ".join(map(str, INT4_BLOCK_SIZES))
    if block == 0:
        scale_dims = g.shape(node.input[1])
        kind = "per-tensor" if scale_dims is not None and math.prod(d or 0 for d in scale_dims) == 1 else "per-channel"
        return [f"INT4 weight {node.input[0]} is quantized {kind}; TensorRT runs INT4 only block-wise: "
                f"set block_size {sizes} along the input-feature axis"]
    problems = []
    if block not in INT4_BLOCK_SIZES:
        problems.append(f"INT4 block_size is {block}; TensorRT supports {sizes}: re-quantize with one of them")
    if rank not in (2, 3):
        problems.append(f"INT4 weight {node.input[0]} has rank {rank}; TensorRT blocks only 2-D or 3-D weights")
    elif axis not in (rank - 2, rank - 1):
        problems.append(f"INT4 blocks run along axis {axis}; use one of the last two axes ({rank - 2} or {rank - 1})")
    scale_dims = g.shape(node.input[1])
    if block > 0 and 0 <= axis < rank and scale_dims is not None:
        expected = tuple(math.ceil(d / block) if i == axis else d for i, d in enumerate(dims))
        if tuple(scale_dims) != expected:
            problems.append(f"scale {node.input[1]} has shape {list(scale_dims)}, blocked layout of {list(dims)} "
                            f"with block_size {block} on axis {axis} needs {list(expected)}")
    return problems


def _check_block_int4_only(g: _Graph) -> Iterator[Violation]:
    for name, node in g.qdq_nodes():
        dtype = _quantized_dtype(g, node)
        if _attr(node, "block_size", 0) > 0 and dtype not in (TensorProto.INT4, None):
            yield Violation("block-int4-only", name,
                            f"{node.op_type} of {node.input[0]} is blocked (block_size {_attr(node, 'block_size')}) "
                            f"with {_dtype_name(dtype)} codes; TensorRT documents block quantization for INT4 "
                            f"weights only: quantize wider layers per output channel (wide_group_size=None)")


def _check_weight_dtype(g: _Graph) -> Iterator[Violation]:
    allowed = ", ".join(_dtype_name(d) for d in WEIGHT_DTYPES)
    for name, node in g.qdq_nodes():
        dtype = _quantized_dtype(g, node)
        if g.is_weight(node.input[0]) and node.op_type == "DequantizeLinear" and dtype not in (*WEIGHT_DTYPES, None):
            yield Violation("weight-dtype", name, f"weight {node.input[0]} is {_dtype_name(dtype)}; TensorRT "
                                                  f"dequantizes weights only from {allowed}: re-quantize it")


def _check_act_int8_only(g: _Graph) -> Iterator[Violation]:
    for name, node in g.qdq_nodes():
        if g.is_weight(node.input[0]):
            continue
        dtype = _quantized_dtype(g, node)
        # INT4 activations are reported by the more specific int4-weight-only rule.
        if dtype is None or dtype in ACTIVATION_DTYPES or dtype == TensorProto.INT4:
            continue
        yield Violation("act-int8-only", name,
                        f"activation {node.op_type} uses {_dtype_name(dtype)}; TensorRT quantizes activations only "
                        f"to INT8 (or FP8 E4M3): use an INT8 zero point, narrowing bits with the scale and a clamp")


def _check_constant_scale(g: _Graph) -> Iterator[Violation]:
    for name, node in g.qdq_nodes():
        for role, tensor in (("scale", node.input[1]), ("zero point", _optional_input(node, 2))):
            if tensor is not None and not g.is_constant(tensor):
                yield Violation("constant-scale", name, f"{role} {tensor} is not a constant; TensorRT needs Q/DQ "
                                                        f"{role}s known at build time: store it as an initializer")
        scale = node.input[1]
        if not g.is_weight(node.input[0]) and g.is_constant(scale) and g.constants[scale].dims != ():
            yield Violation("constant-scale", name,
                            f"activation scale {scale} has shape {list(g.constants[scale].dims)}; TensorRT quantizes "
                            f"activations per tensor: use a scalar (0-D) scale")


def _check_zero_point(g: _Graph) -> Iterator[Violation]:
    for name, node in g.qdq_nodes():
        zero_point = _optional_input(node, 2)
        values = g.constants[zero_point].values() if zero_point in g.constants else None
        if values is not None and np.any(values.astype(np.float32) != 0):
            yield Violation("zero-point", name,
                            f"zero point {zero_point} is not all zeros; TensorRT supports only symmetric "
                            f"quantization: re-quantize symmetrically with zero zero points")


def _check_plugins(g: _Graph) -> Iterator[Violation]:
    uses_domain = False
    for name, node in g.nodes:
        if node.domain in _DEFAULT_DOMAINS or (node.domain, node.op_type) in g.local_functions:
            continue
        if node.domain != contract.DOMAIN:
            yield Violation("plugin-attributes", name,
                            f"{node.domain}::{node.op_type} is neither an ONNX op nor a {contract.DOMAIN} plugin, "
                            f"so TensorRT cannot run it: rewrite it with standard ops")
            continue
        uses_domain = True
        shapes = {i: g.shape(i) for i in node.input if g.shape(i) is not None}
        for problem in contract.check_plugin_node(node, shapes):
            yield Violation("plugin-attributes", name, f"{node.op_type}: {problem}; fix the exporter to follow "
                                                       f"the plugin contract")
    if uses_domain and not any(o.domain == contract.DOMAIN for o in g.model.opset_import):
        yield Violation("plugin-attributes", g.name, f"the model uses {contract.DOMAIN} ops without importing the "
                                                     f"domain: add opset_import {contract.DOMAIN} version "
                                                     f"{contract.DOMAIN_VERSION}")


def _check_static_shapes(g: _Graph) -> Iterator[Violation]:
    initializers = {t.name for t in g.graph.initializer}
    for vi in g.graph.input:
        if vi.name not in initializers:
            problem = _input_shape_problem(vi)
            if problem:
                yield Violation("static-shape", vi.name, problem)
    for name, node in g.nodes:
        op = contract.PLUGIN_OPS.get(node.op_type) if node.domain == contract.DOMAIN else None
        for i in op.constant_inputs if op else ():
            tensor = _optional_input(node, i)
            if tensor is not None and not g.is_stored_weight(tensor):
                yield Violation("static-shape", name, f"weight input {op.inputs[i].name} ({tensor}) is not a "
                                                      f"constant; the plugin bakes weights in at build time: store "
                                                      f"it as an initializer (or a Cast of one)")


def _input_shape_problem(vi: onnx.ValueInfoProto) -> str | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return f"input {vi.name} has no known rank; declare its shape (only the batch axis may be dynamic)"
    dims = vi.type.tensor_type.shape.dim
    dynamic = [i for i, d in enumerate(dims) if i > 0 and not (d.HasField("dim_value") and d.dim_value > 0)]
    if dynamic:
        names = ", ".join(f"{i} ({dims[i].dim_param or '?'})" for i in dynamic)
        return f"input {vi.name} has dynamic axes {names}; only the leading batch axis may be dynamic: export static"
    return None


RULES: dict[str, Callable[[_Graph], Iterable[Violation]]] = {
    "opset": _check_opset,
    "int4-weight-only": _check_int4_weight_only,
    "int4-block": _check_int4_block,
    "block-int4-only": _check_block_int4_only,
    "weight-dtype": _check_weight_dtype,
    "act-int8-only": _check_act_int8_only,
    "constant-scale": _check_constant_scale,
    "zero-point": _check_zero_point,
    "plugin-attributes": _check_plugins,
    "static-shape": _check_static_shapes,
}


# ----------------------------------------------------------------------------- API

def lint_model(model: onnx.ModelProto | str | Path) -> list[Violation]:
    """Every TensorRT rule violation of the model, grouped by rule in the order of ``RULES``."""
    g = _index(load_model(model))
    return [v for check in RULES.values() for v in check(g)]


def format_violations(violations: Sequence[Violation]) -> str:
    """One line per violation: ``rule: node: message``."""
    return "\n".join(f"{v.rule}: {v.node}: {' '.join(v.message.split())}" for v in violations)
