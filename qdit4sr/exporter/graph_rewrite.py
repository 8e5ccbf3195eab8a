"""Rewrite each QuantLinear placeholder into the ops the deployed graph runs (onnx-graphsurgeon).

Per placeholder with input x [..., K] and output y [..., N] (r = rank of x):

    Hadamard        Reshape(x, [0]*(r-1) + [m, p]) -> MatMul(., B) -> MatMul(A^T, .) -> Reshape back to [.., K]
                    (x H with H = kron(A, B), exactly `apply_hadamard`; factors of size 1 are skipped)
    act. quant      Clip(x_H, -qmax_b*s, qmax_b*s) -> QuantizeLinear(s, int8 0) -> DequantizeLinear(s, int8 0)
                    (none when the segment's bits are 16)
    residue         DequantizeLinear(codes [K, N], scale) [-> Reshape, see below] -> MatMul(x_q, W) -> Add(bias)
    branches        portable: LowRankBranch as MatMul(MatMul(x_H, down^T), up^T); BlockRank1Branch as
                    Reshape [L, Q, s_i] -> Transpose [Q, L, s_i] -> MatMul(v^T [Q, s_i, P]) -> Transpose [P, L, Q]
                    -> Mul(sigma) -> MatMul(u [P, Q, s_o]) -> Transpose [L, P, s_o] -> Reshape [L, N]
                    (L = the leading axes);  trt: the qdit4sr plugin nodes of `contract`
    output          Add(residue, Add(low rank, block rank-1))

Per softmax placeholder (an attention core's scaled logits, when the plan quantizes the softmax input):

    Clip(logits, -qmax_b*s, qmax_b*s) -> QuantizeLinear(s, int8 0) -> DequantizeLinear(s, int8 0) -> Softmax(axis -1)

with b = 8 and the segment's static scale s, the same Q/DQ form as the layer activations.

Activations use an INT8 container for every width b <= 8: TensorRT runs integer activations only as
INT8, so the b-bit range lives in the static scale s and the Clip to +-qmax_b * s in front of the
QuantizeLinear (clipping first makes round(clip(x)/s) == clamp(round(x/s), -qmax_b, qmax_b), the
fake-quant formula, without a narrower integer type).

Weights are really quantized: codes of layers with <= 4 bits are INT4 initializers, wider ones INT8
(codes stay in the layer's +-qmax range either way), dequantized block-wise with block = group size
along K (scale [K/G, N]) or per output channel (scale [N]) when the layer has no groups. TensorRT
runs INT4 weights only block-wise with blocks of 64 or 128, so the trt flavour writes a per-channel
INT4 weight as blocks of 64 (or 128) that repeat the channel's scale: the same numbers, a layout it
accepts. onnxruntime (seen with 1.32) fuses an activation Q/DQ + INT8 weight DQ + MatMul into
MatMulIntegerToFloat at ORT_ENABLE_EXTENDED and above without honouring block_size, and then fails at
run time; so the portable flavour writes a blocked INT8 weight as [K/G, G, N] dequantized along axis 1
(scale [K/G, 1, N]) followed by a Reshape to [K, N]: the same bytes and numbers, a pattern that fusion
leaves alone. Weight tensors are laid out as the contract expects (down [R, K], up [N, R], sigma [P, Q],
u [P, Q, s_o], v [P, Q, s_i]) in both flavours, so one copy in the external-data file serves both;
the portable flavour transposes them with Transpose nodes on the constants (onnxruntime folds them
when the session is created).

The cpu flavour (cpu_flavour.py) is this rewrite with per-channel INT8 weights, a cheaper split of the
Hadamard and layers that share an input merged; it passes its own `rewrite_layers`.

Float weights (branches, biases) that are exactly fp16 values, which `quantize_` makes them with the
default storage_dtype "float16", are stored as fp16 and widened by one Cast each; fp16 weight scales
feed the DequantizeLinear directly (its output is then fp16, as the torch model rounds it) followed by
a Cast to float32. Activations and the arithmetic stay float32 in both flavours.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx import TensorProto
from onnx_graphsurgeon.ir.tensor import LazyValues

from ..artifacts.flavour import Flavour
from ..calibration.hadamard import hadamard_factor_matrices, hadamard_factors
from ..calibration.plan import LayerPlan, SoftmaxPlan
from ..calibration.qlinear import NO_ACT_QUANT, QuantLinear
from ..calibration.quantizer import pack_int, qmax
from ..plugins import contract
from .external_data import WeightStore
from .fp16_storage import compact
from .placeholder import PLACEHOLDER_DOMAIN, PLACEHOLDER_OP, SOFTMAX_PLACEHOLDER_OP

TRT_INT4_BLOCKS = (64, 128)
IR_VERSION = 10  # the IR version that introduced opset 21 (INT4); every current runtime reads it


# ----------------------------------------------------------------------------- prepared layers

@dataclass
class WeightDQ:
    """A quantized weight and how to dequantize it."""

    codes: TensorProto          # [K, N] INT4 or INT8 ([K/G, G, N] when `reshape` is set)
    scale: TensorProto          # [K/G, N] (blocked), [N] (per axis) or [K/G, 1, N]
    axis: int
    block_size: int             # 0 = per-axis
    reshape: tuple[int, int] | None = None  # Reshape the dequantized weight to [K, N]


@dataclass
class LayerSpec:
    """Everything the graph needs of one QuantLinear, weights already in the store (shared by segments)."""

    name: str
    in_features: int
    out_features: int
    input_rank: int
    hadamard: bool
    weight_bits: int
    weight: dict[Flavour, WeightDQ]             # per flavour (equal objects unless the layouts differ)
    bias: TensorProto | None
    act_bits: list[int]
    act_scales: list[float]
    down: TensorProto | None = None
    up: TensorProto | None = None
    sigma: TensorProto | None = None
    block_u: TensorProto | None = None
    block_v: TensorProto | None = None
    block_shape: tuple[int, int] | None = None

    @property
    def rank(self) -> int:
        return 0 if self.down is None else self.down.dims[0]


def _int_codes(store: WeightStore, name: str, codes: np.ndarray, bits: int) -> TensorProto:
    """Codes [K, N] as INT4 (packed two per byte, first in the low nibble) or INT8."""
    if bits <= 4:
        raw = pack_int(torch.from_numpy(np.ascontiguousarray(codes)), 4).numpy().tobytes()
        return store.tensor(name, TensorProto.INT4, codes.shape, raw)
    return store.array(name, codes.astype(np.int8))


def _weight_dq(store: WeightStore, layer: QuantLinear, name: str) -> dict[Flavour, WeightDQ]:
    codes = layer.qweight.numpy().T.copy()                       # [K, N]
    scales = layer.weight_scales.numpy()                         # [N, n_groups], float32 or float16
    bits = layer.weight_bits
    codes_proto = _int_codes(store, f"{name}.qweight", codes, bits)
    k = layer.in_features
    if layer.group_size is not None:
        g, n = layer.group_size, layer.out_features
        dq = WeightDQ(codes_proto, store.array(f"{name}.weight_scale", scales.T.copy()), 0, g)
        if bits <= 4:
            return {Flavour.PORTABLE: dq, Flavour.TRT: dq}
        # Same bytes as the 2-D tensors, so the store keeps one copy for both flavours.
        codes_3d = store.array(f"{name}.qweight", codes.reshape(k // g, g, n).astype(np.int8))
        scale_3d = store.array(f"{name}.weight_scale", scales.T.reshape(k // g, 1, n).copy())
        return {Flavour.PORTABLE: WeightDQ(codes_3d, scale_3d, 1, g, (k, n)), Flavour.TRT: dq}
    per_axis = WeightDQ(codes_proto, store.array(f"{name}.weight_scale", scales[:, 0].copy()), 1, 0)
    block = next((b for b in TRT_INT4_BLOCKS if k % b == 0), None)
    if bits > 4 or block is None:
        return {Flavour.PORTABLE: per_axis, Flavour.TRT: per_axis}
    repeated = np.repeat(scales[:, :1].T, k // block, axis=0)    # [K/block, N], one channel scale per block
    blocked = WeightDQ(codes_proto, store.array(f"{name}.weight_scale_blocked", repeated), 0, block)
    return {Flavour.PORTABLE: per_axis, Flavour.TRT: blocked}


def prepare_layer(store: WeightStore, plan: LayerPlan, layer: QuantLinear, input_rank: int,
                  flavours: Iterable[Flavour] = (Flavour.PORTABLE, Flavour.TRT)) -> LayerSpec:
    """Write one layer's tensors into the store and describe it for the rewrite: sizes, bits, scales and
    branch shapes from the plan, the tensors (codes, scales, bias, branches) from the module. The
    portable/trt codes are written only when one of those flavours is asked for (the cpu flavour's
    own codes come from cpu_flavour.cpu_weight_dq)."""
    name = plan.name
    wanted = bool({Flavour.PORTABLE, Flavour.TRT} & set(flavours))

    def arr(suffix: str, t) -> TensorProto | None:
        return None if t is None else store.array(f"{name}.{suffix}", compact(t.detach().float().numpy()))

    return LayerSpec(
        name=name, in_features=plan.in_features, out_features=plan.out_features, input_rank=input_rank,
        hadamard=layer.hadamard, weight_bits=plan.weight_bits,
        weight=_weight_dq(store, layer, name) if wanted else {},
        bias=arr("bias", layer.bias), act_bits=list(plan.act_bits), act_scales=list(plan.act_scales),
        down=arr("lowrank_down", layer.down), up=arr("lowrank_up", layer.up), sigma=arr("block_sigma", layer.block_sigma),
        block_u=arr("block_u", layer.block_u), block_v=arr("block_v", layer.block_v),
        block_shape=None if plan.block_shape is None else tuple(plan.block_shape))


@dataclass
class HadamardFactors:
    """Orthonormal factors per input size, stored once and shared by every layer and graph."""

    store: WeightStore
    cache: dict[int, tuple[TensorProto | None, TensorProto | None]] = field(default_factory=dict)

    def sizes(self, n: int) -> tuple[int, int]:
        """(m, p): the last axis is reshaped to [m, p]; A acts on m, B on p."""
        return hadamard_factors(n)

    def get(self, n: int) -> tuple[TensorProto | None, TensorProto | None]:
        """(A^T [m, m] or None, B [p, p] or None) for size n; None where the factor has size 1."""
        if n not in self.cache:
            m, p = hadamard_factors(n)
            a, b = hadamard_factor_matrices(n, dtype=torch.float32)
            a_t = self.store.array(f"hadamard_{n}.A_T", a.T.contiguous().numpy()) if m > 1 else None
            b_p = self.store.array(f"hadamard_{n}.B", b.numpy()) if p > 1 else None
            self.cache[n] = (a_t, b_p)
        return self.cache[n]


# ----------------------------------------------------------------------------- graph building

class _Builder:
    """Adds nodes for one graph; constants are shared by name within the graph."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.constants: dict[str, gs.Tensor] = {}  # constants, and the Casts that widen fp16 ones
        self.count = 0

    def const(self, value: TensorProto | np.ndarray, name: str | None = None) -> gs.Constant:
        if isinstance(value, TensorProto):
            name = value.name
            if name not in self.constants:
                self.constants[name] = gs.Constant(name, LazyValues(value))
        else:
            name = name or f"const_{value.dtype}_{'_'.join(map(str, np.ravel(value).tolist()))}"
            if name not in self.constants:
                self.constants[name] = gs.Constant(name, np.asarray(value))
        return self.constants[name]

    def weight(self, value: TensorProto) -> gs.Tensor:
        """A stored float weight as float32: the constant itself, or one shared Cast of its fp16 copy."""
        if value.data_type != TensorProto.FLOAT16:
            return self.const(value)
        key = f"{value.name}.fp32"
        if key not in self.constants:
            self.constants[key] = self.op(value.name, "Cast", [self.const(value)], {"to": TensorProto.FLOAT})
        return self.constants[key]

    def shape(self, dims: list[int]) -> gs.Constant:
        return self.const(np.array(dims, dtype=np.int64), "shape_" + "_".join(map(str, dims)))

    def op(self, prefix: str, op: str, inputs: list, attrs: dict | None = None, *, out: gs.Variable | None = None,
           dtype=np.float32, shape=None, domain: str | None = None) -> gs.Variable:
        self.count += 1
        label = f"{prefix}/{op}_{self.count}"
        out = out or gs.Variable(f"{label}_out", dtype=dtype, shape=shape)
        node = gs.Node(op=op, name=label, attrs=attrs or {}, inputs=inputs, outputs=[out], domain=domain)
        self.graph.nodes.append(node)
        return out


def _hadamard(b: _Builder, spec: LayerSpec, x: gs.Variable, factors: HadamardFactors) -> gs.Variable:
    k, lead = spec.in_features, [0] * (spec.input_rank - 1)
    m, p = factors.sizes(k)
    a_t, b_p = factors.get(k)
    if a_t is None and b_p is None:
        return x
    h = b.op(spec.name, "Reshape", [x, b.shape(lead + [m, p])])
    if b_p is not None:
        h = b.op(spec.name, "MatMul", [h, b.const(b_p)])
    if a_t is not None:
        h = b.op(spec.name, "MatMul", [b.const(a_t), h])
    return b.op(spec.name, "Reshape", [h, b.shape(lead + [k])])


def _static_qdq(b: _Builder, prefix: str, x: gs.Variable, bits: int, scale: float) -> gs.Variable:
    """b-bit fake quantization with a static scale inside an INT8 Q/DQ pair (identity for 16 bits)."""
    if bits >= NO_ACT_QUANT:
        return x
    scale = np.float32(scale)
    limit = np.float32(qmax(bits)) * scale
    s = b.const(np.array(scale, dtype=np.float32), f"{prefix}.act_scale")
    zero = b.const(np.array(0, dtype=np.int8), "int8_zero")
    lo = b.const(np.array(-limit, dtype=np.float32), f"{prefix}.act_min")
    hi = b.const(np.array(limit, dtype=np.float32), f"{prefix}.act_max")
    clipped = b.op(prefix, "Clip", [x, lo, hi])
    q = b.op(prefix, "QuantizeLinear", [clipped, s, zero], dtype=np.int8)
    return b.op(prefix, "DequantizeLinear", [q, s, zero])


def _act_quant(b: _Builder, spec: LayerSpec, x: gs.Variable, segment: int) -> gs.Variable:
    return _static_qdq(b, spec.name, x, spec.act_bits[segment], spec.act_scales[segment])


def _rewrite_softmax(b: _Builder, node: gs.Node, spec: SoftmaxPlan, segment: int) -> None:
    x, y = node.inputs[0], node.outputs[0]
    node.inputs.clear()
    node.outputs.clear()
    logits = _static_qdq(b, spec.name, x, spec.bits, spec.scales[segment])
    b.op(spec.name, "Softmax", [logits], {"axis": -1}, out=y)


def _residue(b: _Builder, spec: LayerSpec, x_q: gs.Variable, flavour: Flavour) -> gs.Variable:
    w = spec.weight[flavour]
    attrs = {"axis": w.axis} | ({"block_size": w.block_size} if w.block_size else {})
    half = w.scale.data_type == TensorProto.FLOAT16
    weight = b.op(spec.name, "DequantizeLinear", [b.const(w.codes), b.const(w.scale)], attrs,
                  dtype=np.float16 if half else np.float32)
    if half:  # fp16 scales give an fp16 weight; the layer computes in fp32
        weight = b.op(spec.name, "Cast", [weight], {"to": TensorProto.FLOAT})
    if w.reshape is not None:
        weight = b.op(spec.name, "Reshape", [weight, b.shape(list(w.reshape))])
    y = b.op(spec.name, "MatMul", [x_q, weight])
    return y if spec.bias is None else b.op(spec.name, "Add", [y, b.weight(spec.bias)])


def _branches_portable(b: _Builder, spec: LayerSpec, x_h: gs.Variable, out_shape) -> gs.Variable | None:
    out = None
    if spec.down is not None:
        down_t = b.op(spec.name, "Transpose", [b.weight(spec.down)], {"perm": [1, 0]})
        up_t = b.op(spec.name, "Transpose", [b.weight(spec.up)], {"perm": [1, 0]})
        out = b.op(spec.name, "MatMul", [b.op(spec.name, "MatMul", [x_h, down_t]), up_t])
    if spec.sigma is not None:
        local = _block_rank1_portable(b, spec, x_h)
        out = local if out is None else b.op(spec.name, "Add", [out, local])
    return out


def _block_rank1_portable(b: _Builder, spec: LayerSpec, x_h: gs.Variable) -> gs.Variable:
    """Block rank-1 branch with the block index as the batch axis of two batched MatMuls.

    With L the n = r-1 leading axes of x ([B, T] or [B]): [Q, L, s_i] @ v^T [Q, s_i, P] gives t as
    [Q, L, P]; [P, L, Q] * sigma @ u [P, Q, s_o] gives [P, L, s_o]. Each MatMul then multiplies token
    rows by a block matrix; putting the tokens in the batch instead (M = 1 GEMMs) is ~5x slower.
    """
    s_o, s_i = spec.block_shape
    p, q = spec.sigma.dims
    n = spec.input_rank - 1
    ones = [1] * (n - 1)
    v_t = b.op(spec.name, "Transpose", [b.weight(spec.block_v)], {"perm": [1, 2, 0]})           # [Q, s_i, P]
    v_t = b.op(spec.name, "Reshape", [v_t, b.shape([q] + ones + [s_i, p])])
    sigma = b.op(spec.name, "Reshape", [b.weight(spec.sigma), b.shape([p] + [1] * n + [q])])    # [P, 1.., Q]
    u = b.op(spec.name, "Reshape", [b.weight(spec.block_u), b.shape([p] + ones + [q, s_o])])   # [P, 1.., Q, s_o]
    xr = b.op(spec.name, "Reshape", [x_h, b.shape([0] * n + [q, s_i])])                        # [L, Q, s_i]
    xr = b.op(spec.name, "Transpose", [xr], {"perm": [n] + list(range(n)) + [n + 1]})          # [Q, L, s_i]
    t = b.op(spec.name, "MatMul", [xr, v_t])                                                   # [Q, L, P]
    t = b.op(spec.name, "Transpose", [t], {"perm": [n + 1] + list(range(1, n + 1)) + [0]})     # [P, L, Q]
    t = b.op(spec.name, "Mul", [t, sigma])
    local = b.op(spec.name, "MatMul", [t, u])                                                  # [P, L, s_o]
    local = b.op(spec.name, "Transpose", [local], {"perm": list(range(1, n + 1)) + [0, n + 1]})  # [L, P, s_o]
    return b.op(spec.name, "Reshape", [local, b.shape([0] * n + [p * s_o])])


def _branches_trt(b: _Builder, spec: LayerSpec, x_h: gs.Variable, out_shape) -> gs.Variable | None:
    out = None
    common = dict(in_features=spec.in_features, out_features=spec.out_features, aot=1)
    if spec.down is not None:
        attrs = contract.plugin_attributes("LowRankBranch", rank=spec.rank, **common)
        out = b.op(spec.name, "LowRankBranch", [x_h, b.weight(spec.down), b.weight(spec.up)], attrs,
                   shape=out_shape, domain=contract.DOMAIN)
    if spec.sigma is not None:
        s_o, s_i = spec.block_shape
        attrs = contract.plugin_attributes("BlockRank1Branch", block_out=s_o, block_in=s_i, **common)
        local = b.op(spec.name, "BlockRank1Branch",
                     [x_h, b.weight(spec.sigma), b.weight(spec.block_u), b.weight(spec.block_v)], attrs,
                     shape=out_shape, domain=contract.DOMAIN)
        out = local if out is None else b.op(spec.name, "Add", [out, local])
    return out


# How each flavour writes the full-precision side branches (everything else is the same in every flavour).
_BRANCHES = {Flavour.PORTABLE: _branches_portable, Flavour.TRT: _branches_trt}


def _rewrite_node(b: _Builder, node: gs.Node, spec: LayerSpec, segment: int, flavour: Flavour,
                  factors: HadamardFactors) -> None:
    x, y = node.inputs[0], node.outputs[0]
    node.inputs.clear()
    node.outputs.clear()
    out_shape = None if x.shape is None else list(x.shape[:-1]) + [spec.out_features]
    x_h = _hadamard(b, spec, x, factors) if spec.hadamard else x
    x_q = _act_quant(b, spec, x_h, segment)
    main = _residue(b, spec, x_q, flavour)
    side = _BRANCHES[flavour](b, spec, x_h, out_shape)
    if side is None:
        b.op(spec.name, "Identity", [main], out=y)
    else:
        b.op(spec.name, "Add", [main, side], out=y)


# Rewrites every layer placeholder of a graph at once: (builder, [(node, spec)], segment, factors).
LayerRewrite = Callable[["_Builder", list[tuple[gs.Node, LayerSpec]], int, HadamardFactors], None]


def _attr(node: gs.Node, key: str) -> str:
    value = node.attrs[key]
    return value.decode() if isinstance(value, bytes) else value


def rewrite_segment(base: onnx.ModelProto, specs: dict[str, LayerSpec], segment: int, flavour: Flavour | str,
                    opset: int, factors: HadamardFactors, softmax_specs: dict[str, SoftmaxPlan] | None = None,
                    rewrite_layers: LayerRewrite | None = None) -> onnx.ModelProto:
    """The deployable graph of one timestep segment: every placeholder replaced, lifted to `opset`.

    `rewrite_layers` replaces the per-layer rewrite above for all layer placeholders together: the cpu
    flavour's (cpu_flavour.rewrite_layers), which merges layers that share an input.
    """
    flavour = Flavour.parse(flavour)
    if (flavour == Flavour.CPU) != (rewrite_layers is not None):
        raise ValueError("the cpu flavour is rewritten by cpu_flavour.rewrite_layers, and only it")
    softmax_specs = softmax_specs or {}
    graph = gs.import_onnx(base)
    b = _Builder(graph)
    found, found_softmax = set(), set()
    placed = []
    for node in list(graph.nodes):
        if node.domain != PLACEHOLDER_DOMAIN:
            continue
        if node.op == SOFTMAX_PLACEHOLDER_OP:
            site = _attr(node, "site")
            if site not in softmax_specs:
                raise ValueError(f"softmax placeholder for {site!r} has no softmax spec")
            found_softmax.add(site)
            _rewrite_softmax(b, node, softmax_specs[site], segment)
            continue
        if node.op != PLACEHOLDER_OP:
            raise ValueError(f"unknown placeholder op {node.op!r}")
        name = _attr(node, "layer")
        if name not in specs:
            raise ValueError(f"placeholder for {name!r} has no prepared layer")
        found.add(name)
        if rewrite_layers is None:
            _rewrite_node(b, node, specs[name], segment, flavour, factors)
        else:
            placed.append((node, specs[name]))
    if rewrite_layers is not None:
        rewrite_layers(b, placed, segment, factors)
    missing = sorted(set(specs) - found) + sorted(set(softmax_specs) - found_softmax)
    if missing:
        raise ValueError(f"{len(missing)} quantized layers or softmaxes have no node in the traced graph, "
                         f"e.g. {missing[:3]}")
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    graph.opset = opset
    graph.import_domains = [onnx.helper.make_opsetid("", opset)]
    if flavour == Flavour.TRT:
        graph.import_domains.append(contract.domain_opset())
    graph.name = f"qdit4sr_segment_{segment}_{flavour}"
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = IR_VERSION
    model.producer_name = "qdit4sr"
    del model.graph.value_info[:]  # stale shapes from the traced graph; inferred afresh below
    return onnx.shape_inference.infer_shapes(model, strict_mode=flavour != Flavour.TRT, data_prop=True)
