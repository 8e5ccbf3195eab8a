"""The `cpu` graph flavour: the portable graph in the form onnxruntime runs as integer matmuls.

It is the portable rewrite (graph_rewrite.py) with three changes:

    residue   every quantized weight as per-output-channel INT8 codes [K, N] with float32 scales [N]
              (DequantizeLinear axis 1, no Cast), |code| <= 63; see calibration/cpu_weights.py for
              when that is exact and the half-step bound when it is re-expressed. onnxruntime (level
              EXTENDED and above) fuses activation Q/DQ + weight DQ + MatMul into MatMulIntegerToFloat,
              whose integer sums are exact: the graph computes the cpu reference model to float32 rounding.
    Hadamard  H = kron(L, R): R the Sylvester factor of size b (a power of two) on the last axis, L the
              rest (the Paley factor times the remaining Sylvester factor) as a batched MatMul, with b
              chosen to minimise L + b. The same matrix as H_m (x) H_p (Sylvester matrices factor
              exactly, H_ab = H_a (x) H_b) at a fraction of the flops (K = 512: 32 + 16 per element
              instead of 512; 1536: 48 + 32 instead of 12 + 128; 6144: 96 + 64 instead of 12 + 512).
    sharing   layers that read one tensor through the same activation quantizer (q/k/v, the AdaLN
              linears of every block) share one Hadamard, one Q/DQ and one integer MatMul over their
              weights side by side (`rewrite_layers` says why this is needed, not only faster).

Branches stay float32 MatMuls as in the portable flavour (their fp16 constants and Casts are folded by
onnxruntime when the session is created). The INT8 codes are their own tensors in the shared weights
file: one byte per quantized weight on top of the INT4/INT8 codes of the other flavours (codes that
are byte-identical, e.g. INT8 per-channel layers kept exactly, are stored once). Building them from the
INT4 codes inside the graph instead (ops that onnxruntime constant-folds) costs ~100 ns per weight at
every session start, minutes for the full model, so they are stored.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx import TensorProto
from onnx_graphsurgeon.ir.tensor import LazyValues

from ..artifacts.flavour import Flavour
from ..calibration.cpu_weights import MAX_CODE, cpu_weight
from ..calibration.hadamard import _paley_matrix, _sylvester_matrix, hadamard_factors
from ..calibration.qlinear import QuantLinear
from ..engines.ort_options import session_options
from .external_data import WeightStore
from .graph_rewrite import LayerSpec, WeightDQ, _branches_portable, _Builder, _hadamard, _residue, _static_qdq

FUSED_OPS = ("MatMulIntegerToFloat", "DynamicQuantizeMatMul")  # onnxruntime's integer matmul kernels


# ----------------------------------------------------------------------------- Hadamard

def split_sizes(n: int) -> tuple[int, int]:
    """(L, b) with n = L * b, b a power of two dividing n's Sylvester part, L + b smallest (smaller b on
    ties: measured a little faster, e.g. 512 = 32 x 16 rather than 16 x 32)."""
    m, p = hadamard_factors(n)
    best = None
    b = 1
    while b <= p:
        cost = (n // b + b, b)
        if best is None or cost < best[0]:
            best = (cost, (n // b, b))
        b *= 2
    return best[1]


def split_factor_matrices(n: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal (L [l, l], R [b, b]) with kron(L, R) = hadamard_matrix(n)."""
    m, p = hadamard_factors(n)
    l_size, b = split_sizes(n)
    a = l_size // m
    paley = _paley_matrix(m) if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    left = torch.kron(paley, _sylvester_matrix(a)) / np.sqrt(l_size)
    right = _sylvester_matrix(b) / np.sqrt(b)
    return left.to(dtype), right.to(dtype)


@dataclass
class SplitHadamardFactors:
    """The cpu flavour's Hadamard factors per input size (same interface as graph_rewrite.HadamardFactors)."""

    store: WeightStore
    cache: dict[int, tuple[TensorProto | None, TensorProto | None]] = field(default_factory=dict)

    def sizes(self, n: int) -> tuple[int, int]:
        return split_sizes(n)

    def get(self, n: int) -> tuple[TensorProto | None, TensorProto | None]:
        if n not in self.cache:
            l_size, b = split_sizes(n)
            left, right = split_factor_matrices(n, torch.float32)
            l_t = self.store.array(f"hadamard_{n}.cpu_L_T", left.T.contiguous().numpy()) if l_size > 1 else None
            r = self.store.array(f"hadamard_{n}.cpu_R", right.numpy()) if b > 1 else None
            self.cache[n] = (l_t, r)
        return self.cache[n]


# ----------------------------------------------------------------------------- weights

def cpu_weight_dq(store: WeightStore, name: str, layer: QuantLinear, max_code: int = MAX_CODE) -> WeightDQ:
    """The layer's residue as INT8 codes [K, N] and float32 scales [N], dequantized per output channel."""
    weight = cpu_weight(layer, max_code)
    codes = store.array(f"{name}.qweight_cpu", weight.codes.numpy().T.astype(np.int8))
    scale = store.array(f"{name}.weight_scale_cpu", weight.scale.numpy().astype(np.float32))
    return WeightDQ(codes, scale, axis=1, block_size=0)


# ----------------------------------------------------------------------------- graph

_NONDETERMINISTIC = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout")
_SMALL_CONSTANT = 16  # elements; larger constants are told apart by name (their bytes may be external)


def _tensor_key(t: gs.Tensor):
    if isinstance(t, gs.Constant) and not isinstance(t._values, LazyValues) and t.values.size <= _SMALL_CONSTANT:
        return ("value", str(t.values.dtype), t.values.shape, t.values.tobytes())
    return ("tensor", id(t))


def _is_identity(node: gs.Node) -> bool:
    """Identity, or a Cast to the type its input already has (DiT4SR's AdaLN casts emb to its own dtype)."""
    if node.op == "Identity":
        return True
    if node.op != "Cast" or node.inputs[0].dtype is None:
        return False
    return onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]) == np.dtype(node.inputs[0].dtype)


def _infer_dtypes(graph: gs.Graph) -> None:
    """Fill in the element types the traced graph leaves unknown (ONNX shape inference, names matched)."""
    inferred = onnx.shape_inference.infer_shapes(gs.export_onnx(graph, do_type_check=False))
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Variable) and tensor.dtype is None and types.get(name):
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(types[name])


def _replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def merge_common_subexpressions(graph: gs.Graph) -> int:
    """Merge nodes that compute the same thing from the same inputs (as onnxruntime's CSE pass does);
    returns how many were merged. E.g. DiT4SR's last block computes silu(temb) a second time for its
    context norm, so its AdaLN layers would otherwise read an equal tensor that is not the same one."""
    graph.toposort()
    _infer_dtypes(graph)
    seen: dict[tuple, gs.Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if _is_identity(node) and node.outputs[0] not in graph.outputs:  # onnxruntime removes these first
            _replace_uses(node.outputs[0], node.inputs[0])
            node.outputs.clear()
            node.inputs.clear()
            merged += 1
            continue
        if node.op in _NONDETERMINISTIC or not node.outputs or any(o in graph.outputs for o in node.outputs):
            continue
        key = (node.domain, node.op, repr(sorted(node.attrs.items())), tuple(_tensor_key(t) for t in node.inputs),
               len(node.outputs))
        first = seen.setdefault(key, node)
        if first is node:
            continue
        for mine, theirs in zip(node.outputs, first.outputs):
            _replace_uses(mine, theirs)
        node.outputs.clear()
        node.inputs.clear()
        merged += 1
    graph.cleanup(remove_unused_graph_inputs=False)
    return merged


def _group_key(node: gs.Node, spec: LayerSpec, segment: int) -> tuple:
    """Layers with equal keys read the same tensor through the same Hadamard and activation quantizer."""
    return (id(node.inputs[0]), spec.hadamard, spec.in_features, spec.input_rank, spec.act_bits[segment],
            float(np.float32(spec.act_scales[segment])))


def rewrite_layers(b: _Builder, placed: list[tuple[gs.Node, LayerSpec]], segment: int, factors) -> None:
    """The cpu rewrite of every layer placeholder (graph_rewrite.rewrite_segment's `rewrite_layers`).

    Layers that read one tensor with one activation quantizer (q/k/v, the AdaLN pairs) share one
    Hadamard, one Q/DQ and one integer MatMul whose weights are concatenated along N, then split.
    Separately, onnxruntime's common-subexpression pass would merge their identical Q/DQ chains into one
    DequantizeLinear feeding several MatMuls, which its Q/DQ fusion does not take: they would all run as
    float MatMuls on weights dequantized at every call. The Concat of constants is folded when the
    session is created (a copy of the codes, no extra storage).
    """
    merge_common_subexpressions(b.graph)  # so that equal inputs are one tensor, as onnxruntime will make them
    groups: dict[tuple, list[tuple[gs.Node, LayerSpec]]] = {}
    for node, spec in placed:
        groups.setdefault(_group_key(node, spec, segment), []).append((node, spec))
    for group in groups.values():
        _rewrite_group(b, group, segment, factors)


def _rewrite_group(b: _Builder, group: list[tuple[gs.Node, LayerSpec]], segment: int, factors) -> None:
    first = group[0][1]
    x = group[0][0].inputs[0]
    outputs = [node.outputs[0] for node, _ in group]
    for node, _ in group:
        node.inputs.clear()
        node.outputs.clear()
    specs = [spec for _, spec in group]
    prefix = "+".join(spec.name for spec in specs)  # names the shared nodes after every layer they serve
    x_h = _hadamard(b, first, x, factors) if first.hadamard else x
    # A [B, K] input would let onnxruntime fuse MatMul + bias into a Gemm before its Q/DQ fusion runs,
    # leaving the weight dequantized at every call; one leading axis keeps it a MatMul.
    lifted = first.input_rank == 2
    x_main = b.op(prefix, "Unsqueeze", [x_h, b.shape([0])]) if lifted else x_h
    x_q = _static_qdq(b, prefix, x_main, first.act_bits[segment], first.act_scales[segment])
    if len(specs) == 1:
        mains = [_residue(b, specs[0], x_q, Flavour.CPU)]
    else:
        mains = _merged_residue(b, prefix, specs, x_q)
    x_t = None  # x_h as [K, M], made once for the group when a layer has a block branch
    for spec, main, y in zip(specs, mains, outputs):
        if lifted:
            main = b.op(spec.name, "Squeeze", [main, b.shape([0])])
        if spec.sigma is None:
            side = _branches_portable(b, spec, x_h, None)
        else:
            if x_t is None:
                flat = b.op(prefix, "Reshape", [x_h, b.shape([-1, first.in_features])])
                x_t = b.op(prefix, "Transpose", [flat], {"perm": [1, 0]})
            side = _branches_channel_major(b, spec, x_t, main)
        if side is None:
            b.op(spec.name, "Identity", [main], out=y)
        else:
            b.op(spec.name, "Add", [main, side], out=y)


def _branches_channel_major(b: _Builder, spec: LayerSpec, x_t: gs.Variable, like: gs.Variable) -> gs.Variable:
    """Both branches on x_h^T [K, M] (M = every token of the batch), returned shaped like `like`.

    Block rank-1: t = v_q [P, s_i] @ x_q [s_i, M] batched over the Q input blocks, [Q, P, M] -> [P, Q, M]
    (whole rows of M move), y_p = (sigma u)_p [s_o, Q] @ t_p [Q, M] batched over the P output blocks. Every
    GEMM has the M tokens as its wide side and the transposes move contiguous rows, where the portable
    form's batched [M, s_i] GEMMs and its element-wise [Q, M, P] -> [P, M, Q] transpose are 2-3x slower.
    The low-rank branch joins in the same orientation (down [r, K] and up [N, r] as stored) and one
    transpose takes the sum back to [M, N].
    """
    s_o, s_i = spec.block_shape
    p, q = spec.sigma.dims
    v = b.op(spec.name, "Transpose", [b.weight(spec.block_v)], {"perm": [1, 0, 2]})                # [Q, P, s_i]
    sigma = b.op(spec.name, "Unsqueeze", [b.weight(spec.sigma), b.shape([2])])                      # [P, Q, 1]
    su = b.op(spec.name, "Transpose", [b.op(spec.name, "Mul", [b.weight(spec.block_u), sigma])],
              {"perm": [0, 2, 1]})                                                                 # [P, s_o, Q]
    t = b.op(spec.name, "MatMul", [v, b.op(spec.name, "Reshape", [x_t, b.shape([q, s_i, -1])])])    # [Q, P, M]
    t = b.op(spec.name, "Transpose", [t], {"perm": [1, 0, 2]})                                      # [P, Q, M]
    y = b.op(spec.name, "Reshape", [b.op(spec.name, "MatMul", [su, t]), b.shape([p * s_o, -1])])    # [N, M]
    if spec.down is not None:
        low = b.op(spec.name, "MatMul", [b.weight(spec.up), b.op(spec.name, "MatMul", [b.weight(spec.down), x_t])])
        y = b.op(spec.name, "Add", [y, low])
    y = b.op(spec.name, "Transpose", [y], {"perm": [1, 0]})                                        # [M, N]
    return b.op(spec.name, "Reshape", [y, b.op(spec.name, "Shape", [like], dtype=np.int64)])


def _merged_residue(b: _Builder, prefix: str, specs: list[LayerSpec], x_q: gs.Variable) -> list[gs.Variable]:
    """One DQ + MatMul (+ bias) over the layers' weights side by side, split back per layer."""
    weights = [spec.weight[Flavour.CPU] for spec in specs]
    codes = b.op(prefix, "Concat", [b.const(w.codes) for w in weights], {"axis": 1}, dtype=np.int8)
    scale = b.op(prefix, "Concat", [b.const(w.scale) for w in weights], {"axis": 0})
    y = b.op(prefix, "MatMul", [x_q, b.op(prefix, "DequantizeLinear", [codes, scale], {"axis": 1})])
    if any(spec.bias is not None for spec in specs):
        biases = [b.weight(spec.bias) if spec.bias is not None
                  else b.const(np.zeros(spec.out_features, np.float32), f"{spec.name}.zero_bias") for spec in specs]
        y = b.op(prefix, "Add", [y, b.op(prefix, "Concat", biases, {"axis": 0})])
    parts = [gs.Variable(f"{spec.name}/split_out", dtype=np.float32) for spec in specs]
    sizes = b.const(np.array([spec.out_features for spec in specs], dtype=np.int64),
                    "split_" + "_".join(str(spec.out_features) for spec in specs))
    b.graph.nodes.append(gs.Node("Split", f"{prefix}/Split", {"axis": -1}, inputs=[y, sizes], outputs=parts))
    return parts


# ----------------------------------------------------------------------------- checks

def optimized_model(path: str | Path, flavour: Flavour | str = Flavour.CPU,
                    level: str | None = None) -> onnx.ModelProto:
    """The graph as onnxruntime optimises it for the CPU (the session's own dump, without its weights),
    with the session settings the runtime uses for `flavour`."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        # The dump warns that ALL-level graphs are machine-specific: expected, the dump is only read here.
        options = session_options(flavour, 1, level, log_severity_level=3)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "optimized.bin")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         "1024")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return onnx.load(str(Path(tmp) / "optimized.onnx"), load_external_data=False)


def optimized_op_types(path: str | Path, flavour: Flavour | str = Flavour.CPU, level: str | None = None) -> Counter:
    return Counter(node.op_type for node in optimized_model(path, flavour, level).graph.node)


def float_matmuls_on_dequantized(model: onnx.ModelProto) -> list[str]:
    """Names of float matmuls that read a DequantizeLinear output: quantized layers left unfused."""
    producer = {out: node for node in model.graph.node for out in node.output}
    return [node.name for node in model.graph.node if node.op_type in ("MatMul", "Gemm", "FusedMatMul")
            and any(i in producer and producer[i].op_type == "DequantizeLinear" for i in node.input)]
