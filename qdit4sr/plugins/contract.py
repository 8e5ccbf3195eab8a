"""Contract between the ONNX exporter and the TensorRT plugins for the full-precision side branches.

The exporter writes the side branches of a quantized linear layer as custom nodes in the ``qdit4sr``
domain; TensorRT's ONNX parser hands each such node to the plugin creator registered under the node's
op type, ``plugin_version`` and ``plugin_namespace`` attributes, passing every attribute as a plugin
field. Both sides read the op descriptions below, so that a rename or a new attribute cannot drift.

    LowRankBranch    y = (x @ down^T) @ up^T                    x [..., K], down [R, K], up [N, R]
    BlockRank1Branch y[..., p*s_o + o] = sum_q sigma[p, q] u[p, q, o] (v[p, q] . x[..., q*s_i:(q+1)*s_i])
                                                                sigma [P, Q], u [P, Q, s_o], v [P, Q, s_i]
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Literal, Mapping, Sequence

import onnx

DOMAIN = "qdit4sr"
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "qdit4sr"
PLUGIN_VERSION = "1"
# TensorRT's ONNX parser treats a plugin node carrying aot=1 as an ahead-of-time compiled Python plugin.
TRT_FLAVOUR_AOT_ATTRIBUTE = "aot"

AttrKind = Literal["int", "string"]
_ONNX_ATTR_TYPE: dict[str, int] = {"int": onnx.AttributeProto.INT, "string": onnx.AttributeProto.STRING}


@dataclass(frozen=True)
class PluginTensor:
    """One input or output of a plugin op.

    ``dims`` names each axis; ``"..."`` stands for any number of leading axes (the activation's batch and
    token axes), so ``rank`` is None for activations. Axis names shared with attributes (see
    ``PluginAttribute.dim``) or with ``PluginOp.products`` tie attribute values to weight shapes.
    """

    name: str
    dims: tuple[str, ...]
    constant: bool  # weights: must be initializers so the plugin can bake them in at build time

    @property
    def rank(self) -> int | None:
        return None if "..." in self.dims else len(self.dims)


@dataclass(frozen=True)
class PluginAttribute:
    """One node attribute, passed to the plugin creator as a plugin field of the same name."""

    name: str
    kind: AttrKind
    required: bool = True
    dim: str | None = None  # axis name whose size this attribute must equal
    choices: tuple[int | str, ...] | None = None  # the only accepted values, when restricted

    @property
    def onnx_type(self) -> int:
        return _ONNX_ATTR_TYPE[self.kind]


@dataclass(frozen=True)
class PluginOp:
    """A custom op of the ``qdit4sr`` domain and the TensorRT plugin that implements it."""

    name: str
    inputs: tuple[PluginTensor, ...]
    outputs: tuple[PluginTensor, ...]
    attributes: tuple[PluginAttribute, ...]
    # Axis-size relations beyond plain equality: (axis, factors) means size(axis) == prod(size(factors)).
    products: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def attribute(self, name: str) -> PluginAttribute | None:
        return next((a for a in self.attributes if a.name == name), None)

    @property
    def constant_inputs(self) -> tuple[int, ...]:
        """Positions of the weight inputs."""
        return tuple(i for i, t in enumerate(self.inputs) if t.constant)


def _common_attributes() -> tuple[PluginAttribute, ...]:
    return (
        PluginAttribute("in_features", "int", dim="K"),
        PluginAttribute("out_features", "int", dim="N"),
        PluginAttribute("plugin_namespace", "string", choices=(PLUGIN_NAMESPACE,)),
        PluginAttribute("plugin_version", "string", choices=(PLUGIN_VERSION,)),
        PluginAttribute(TRT_FLAVOUR_AOT_ATTRIBUTE, "int", required=False, choices=(0, 1)),
    )


LOW_RANK_BRANCH = PluginOp(
    name="LowRankBranch",
    inputs=(PluginTensor("x", ("...", "K"), constant=False),
            PluginTensor("down", ("R", "K"), constant=True),
            PluginTensor("up", ("N", "R"), constant=True)),
    outputs=(PluginTensor("y", ("...", "N"), constant=False),),
    attributes=(PluginAttribute("rank", "int", dim="R"),) + _common_attributes(),
)

BLOCK_RANK1_BRANCH = PluginOp(
    name="BlockRank1Branch",
    inputs=(PluginTensor("x", ("...", "K"), constant=False),
            PluginTensor("sigma", ("P", "Q"), constant=True),
            PluginTensor("u", ("P", "Q", "s_o"), constant=True),
            PluginTensor("v", ("P", "Q", "s_i"), constant=True)),
    outputs=(PluginTensor("y", ("...", "N"), constant=False),),
    attributes=(PluginAttribute("block_out", "int", dim="s_o"),
                PluginAttribute("block_in", "int", dim="s_i")) + _common_attributes(),
    # Output blocks tile the output features, input blocks tile the input features.
    products=(("N", ("P", "s_o")), ("K", ("Q", "s_i"))),
)

PLUGIN_OPS: dict[str, PluginOp] = {op.name: op for op in (LOW_RANK_BRANCH, BLOCK_RANK1_BRANCH)}


def domain_opset() -> onnx.OperatorSetIdProto:
    """The opset_import entry a model with plugin nodes needs."""
    return onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION)


def plugin_attributes(op_name: str, **values: int | str) -> dict[str, int | str]:
    """Attributes for a plugin node: the given values plus the fixed namespace and version."""
    if op_name not in PLUGIN_OPS:
        raise KeyError(f"unknown plugin op {op_name!r}; known: {sorted(PLUGIN_OPS)}")
    return {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION, **values}


def make_plugin_node(op_name: str, inputs: Sequence[str], outputs: Sequence[str], name: str,
                     **values: int | str) -> onnx.NodeProto:
    """A plugin node in the ``qdit4sr`` domain with the namespace and version filled in."""
    return onnx.helper.make_node(op_name, list(inputs), list(outputs), name=name, domain=DOMAIN,
                                 **plugin_attributes(op_name, **values))


def check_plugin_node(node: onnx.NodeProto,
                      shapes: Mapping[str, Sequence[int | None]] | None = None) -> list[str]:
    """Problems of one plugin node against the contract; empty when it conforms.

    ``shapes`` maps tensor names to known shapes (typically the node's constant weight inputs); when a
    shape is given, attribute values are checked against it.
    """
    op = PLUGIN_OPS.get(node.op_type)
    if node.domain != DOMAIN:
        return [f"domain is {node.domain!r}, plugin ops live in {DOMAIN!r}"]
    if op is None:
        return [f"unknown plugin op {node.op_type!r}; known: {', '.join(sorted(PLUGIN_OPS))}"]
    problems = _check_arity(op, node)
    values, attr_problems = _check_attributes(op, node)
    problems += attr_problems
    if shapes is not None:
        problems += _check_shapes(op, node, values, shapes)
    return problems


def _check_arity(op: PluginOp, node: onnx.NodeProto) -> list[str]:
    problems = []
    if len(node.input) != len(op.inputs) or any(not name for name in node.input):
        expected = ", ".join(t.name for t in op.inputs)
        problems.append(f"expects {len(op.inputs)} inputs ({expected}), got {len(node.input)}")
    if len(node.output) != len(op.outputs):
        problems.append(f"expects {len(op.outputs)} output(s), got {len(node.output)}")
    return problems


def _check_attributes(op: PluginOp, node: onnx.NodeProto) -> tuple[dict[str, int | str], list[str]]:
    """Well-typed attribute values found on the node, and the problems with the rest."""
    given = {a.name: a for a in node.attribute}
    values: dict[str, int | str] = {}
    problems = [f"attribute {name!r} is not part of the {op.name} contract" for name in given
                if op.attribute(name) is None]
    for spec in op.attributes:
        attr = given.get(spec.name)
        if attr is None:
            if spec.required:
                problems.append(f"missing {spec.kind} attribute {spec.name!r}")
            continue
        if attr.type != spec.onnx_type:
            problems.append(f"attribute {spec.name!r} must be {spec.kind}, "
                            f"got {onnx.AttributeProto.AttributeType.Name(attr.type)}")
            continue
        value = onnx.helper.get_attribute_value(attr)
        value = value.decode() if isinstance(value, bytes) else value
        problem = _check_value(spec, value)
        if problem:
            problems.append(problem)
        else:
            values[spec.name] = value
    return values, problems


def _check_value(spec: PluginAttribute, value: int | str) -> str | None:
    if spec.choices is not None and value not in spec.choices:
        return f"attribute {spec.name!r} is {value!r}, must be one of {list(spec.choices)}"
    if spec.dim is not None and (not isinstance(value, int) or value <= 0):
        return f"attribute {spec.name!r} is {value!r}, must be a positive size"
    return None


def _check_shapes(op: PluginOp, node: onnx.NodeProto, values: Mapping[str, int | str],
                  shapes: Mapping[str, Sequence[int | None]]) -> list[str]:
    """Bind axis names to sizes from the known input shapes, then compare attributes and products."""
    sizes: dict[str, tuple[int, str]] = {}  # axis name -> (size, where it was read)
    problems: list[str] = []
    for spec, name in zip(op.inputs, node.input):
        shape = shapes.get(name)
        if shape is None:
            continue
        problems += _bind_axes(spec, name, list(shape), sizes)
    for spec in op.attributes:
        if spec.dim in sizes and spec.name in values and values[spec.name] != sizes[spec.dim][0]:
            size, where = sizes[spec.dim]
            problems.append(f"attribute {spec.name}={values[spec.name]} does not match {where} = {size}")
    # Sizes read from shapes win over attributes: a disagreement between the two is reported above.
    bound = {**{spec.dim: values[spec.name] for spec in op.attributes if spec.dim and spec.name in values},
             **{axis: s for axis, (s, _) in sizes.items()}}
    for axis, factors in op.products:
        if axis in bound and all(f in bound for f in factors) and bound[axis] != prod(bound[f] for f in factors):
            problems.append(f"{axis}={bound[axis]} must equal {' * '.join(factors)} = "
                            f"{' * '.join(str(bound[f]) for f in factors)}")
    return problems


def _bind_axes(spec: PluginTensor, name: str, shape: list[int | None],
               sizes: dict[str, tuple[int, str]]) -> list[str]:
    if spec.rank is not None and len(shape) != spec.rank:
        return [f"input {spec.name} ({name}) must have rank {spec.rank}, has shape {shape}"]
    # Activations name only their trailing axes, so they are indexed from the right.
    named = spec.dims if spec.rank is not None else spec.dims[spec.dims.index("...") + 1:]
    if len(shape) < len(named):
        return [f"input {spec.name} ({name}) needs at least {len(named)} axes, has shape {shape}"]
    offset = 0 if spec.rank is not None else len(shape) - len(named)
    problems = []
    for i, axis in enumerate(named):
        size = shape[offset + i]
        if size is None:
            continue
        where = f"{spec.name}.shape[{i if spec.rank is not None else i - len(named)}]"
        if axis in sizes and sizes[axis][0] != size:
            problems.append(f"{where} = {size} disagrees with {sizes[axis][1]} = {sizes[axis][0]}")
        else:
            sizes.setdefault(axis, (size, where))
    return problems
