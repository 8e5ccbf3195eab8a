"""Trace the transformer to ONNX with one opaque placeholder node per QuantLinear and per QuantSoftmax.

The placeholder graph is the same for every timestep segment and flavour: only the rewrite of its
placeholders differs (see graph_rewrite). So the TorchScript exporter runs once per export, and the
quantized weights never pass through it (they are written straight into the external-data file).

Each QuantLinear is temporarily swapped for `PlaceholderLinear`, and each attention core's
QuantSoftmax for `PlaceholderSoftmax`. Both call a torch custom op (`qdit4sr_placeholder::*`) whose
ONNX symbolic is `PLACEHOLDER_DOMAIN::QuantLinear(x)` with the layer name as attribute `layer`, or
`PLACEHOLDER_DOMAIN::QuantSoftmax(logits)` with the core's name as attribute `site` (its scale differs
per segment). Eagerly the ops return zeros of the output shape: the trace needs shapes only, so the
quantized weights are never dequantized. Custom ops, not autograd Functions with a `symbolic`: the
tracer keeps every autograd Function's tensors alive until the trace ends, which made export memory
grow with depth (the attention logits alone are 1 GB per site at DiT4SR's tile).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import onnx
import torch
import torch.nn as nn

from ..artifacts.graph_io import BATCH_AXIS, INPUT_NAMES, OUTPUT_NAME
from ..calibration.qlinear import QuantLinear, segment_scope
from ..calibration.qsoftmax import QuantSoftmax

PLACEHOLDER_DOMAIN = "qdit4sr.placeholder"
PLACEHOLDER_OP = "QuantLinear"
SOFTMAX_PLACEHOLDER_OP = "QuantSoftmax"
# The TorchScript exporter's newest opset; the rewrite lifts the graph to the requested opset (>= 21).
BASE_OPSET = 20
FOLD_SIZE_LIMIT = 1 << 30  # folded constants up to 1 GiB


_OPS = "qdit4sr_placeholder"


@torch.library.custom_op(f"{_OPS}::quant_linear", mutates_args=())
def _quant_linear_op(x: torch.Tensor, out_features: int, layer: str) -> torch.Tensor:
    return x.new_zeros(*x.shape[:-1], out_features)


@_quant_linear_op.register_fake
def _(x, out_features, layer):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op(f"{_OPS}::quant_softmax", mutates_args=())
def _quant_softmax_op(logits: torch.Tensor, site: str) -> torch.Tensor:
    return torch.zeros_like(logits)


@_quant_softmax_op.register_fake
def _(logits, site):
    return torch.empty_like(logits)


def _linear_symbolic(g, x, out_features, layer):
    from torch.onnx import symbolic_helper

    n = symbolic_helper._maybe_get_const(out_features, "i")
    y = g.op(f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER_OP}", x, layer_s=symbolic_helper._maybe_get_const(layer, "s"))
    sizes = x.type().varyingSizes()
    if sizes is not None:  # rank known: declare it so the exporter's own inference can continue
        y.setType(x.type().with_sizes(list(sizes[:-1]) + [int(n)]))
    return y


def _softmax_symbolic(g, logits, site):
    from torch.onnx import symbolic_helper

    y = g.op(f"{PLACEHOLDER_DOMAIN}::{SOFTMAX_PLACEHOLDER_OP}", logits,
             site_s=symbolic_helper._maybe_get_const(site, "s"))
    y.setType(logits.type())
    return y


torch.onnx.register_custom_op_symbolic(f"{_OPS}::quant_linear", _linear_symbolic, 1)
torch.onnx.register_custom_op_symbolic(f"{_OPS}::quant_softmax", _softmax_symbolic, 1)


class PlaceholderLinear(nn.Module):
    """Stands in for a QuantLinear during tracing; records the rank of its input."""

    def __init__(self, name: str, layer: QuantLinear):
        super().__init__()
        self.layer_name = name
        self.out_features = layer.out_features
        self.input_rank: int | None = None
        # Not registered as a submodule: its buffers must not become initializers of the traced graph.
        object.__setattr__(self, "layer", layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input_rank = x.dim()
        return _quant_linear_op(x, self.out_features, self.layer_name)


class PlaceholderSoftmax(nn.Module):
    """Stands in for an attention core's QuantSoftmax during tracing."""

    def __init__(self, site: str, softmax: QuantSoftmax):
        super().__init__()
        self.site = site
        self.called = False
        object.__setattr__(self, "softmax", softmax)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        self.called = True
        return _quant_softmax_op(logits, self.site)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@contextlib.contextmanager
def placeholders(model: nn.Module, layers: dict[str, QuantLinear], softmaxes: dict[str, QuantSoftmax] | None = None
                 ) -> Iterator[tuple[dict[str, PlaceholderLinear], dict[str, PlaceholderSoftmax]]]:
    """Swap the given QuantLinear layers and attention-core softmaxes for placeholders; always restores."""
    softmaxes = softmaxes or {}
    stubs = {name: PlaceholderLinear(name, layer) for name, layer in layers.items()}
    softmax_stubs = {site: PlaceholderSoftmax(site, sm) for site, sm in softmaxes.items()}
    try:
        for name, stub in stubs.items():
            _set_module(model, name, stub)
        for site, stub in softmax_stubs.items():
            model.get_submodule(site).softmax = stub
        yield stubs, softmax_stubs
    finally:
        for name, layer in layers.items():
            _set_module(model, name, layer)
        for site, sm in softmaxes.items():
            model.get_submodule(site).softmax = sm


@contextlib.contextmanager
def tile_pos_embed(model: nn.Module, tile_latent: int) -> Iterator[None]:
    """Every cropping patch embedder holds only its crop for the static tile while the model is traced.

    The trace would otherwise carry the whole pos_embed_max_size^2 table (906 MB in float32 at DiT4SR's
    384 x 384 x 1536) through torch.onnx.export, the serialized proto, its parse and the constant
    folding, several copies at once, only to slice a tile's rows from it. The crop is the module's own
    `cropped_pos_embed` of the tile (same values), stored as a table of the tile's side so that the
    forward crops all of it; always restored."""
    saved = []
    try:
        for module in model.modules():
            side = getattr(module, "pos_embed_max_size", None)
            table = getattr(module, "pos_embed", None)
            if side is None or not isinstance(table, torch.Tensor) or not hasattr(module, "cropped_pos_embed"):
                continue
            crop = module.cropped_pos_embed(tile_latent, tile_latent).clone()
            saved.append((module, side, table))
            module.pos_embed, module.pos_embed_max_size = crop, tile_latent // module.patch_size
        yield
    finally:
        for module, side, table in saved:
            module.pos_embed, module.pos_embed_max_size = table, side


def example_inputs(config, tile_latent: int, text_tokens: int, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Deterministic example inputs with the graph's static shapes (batch 2 so no batch-1 shortcut is traced)."""
    gen = torch.Generator().manual_seed(0)
    c = config.in_channels
    x = torch.randn(batch, c, tile_latent, tile_latent, generator=gen)
    return (x, torch.randn(batch, c, tile_latent, tile_latent, generator=gen),
            torch.randn(batch, text_tokens, config.joint_attention_dim, generator=gen),
            torch.randn(batch, config.pooled_projection_dim, generator=gen),
            torch.full((batch,), 500.0))


@dataclass
class BaseGraph:
    """The traced placeholder graph plus what the rewrite needs to know about each placeholder."""

    model: onnx.ModelProto
    input_ranks: dict[str, int]          # layers with a placeholder in the graph
    dead_layers: list[str]               # called, but their output never reaches the graph's output
    softmax_sites: list[str] = field(default_factory=list)  # attention cores with a softmax placeholder

    @property
    def layers(self) -> list[str]:
        return list(self.input_ranks)


@torch.no_grad()
def trace_base_graph(model: nn.Module, layers: dict[str, QuantLinear], tile_latent: int,
                     text_tokens: int, softmaxes: dict[str, QuantSoftmax] | None = None) -> BaseGraph:
    """Export the transformer once with placeholders; dynamic batch, every other axis static."""
    args = example_inputs(model.config, tile_latent, text_tokens)
    buffer = io.BytesIO()
    dynamic = {name: {0: BATCH_AXIS} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    was_training = model.training
    model.eval()
    try:
        # Segment 0 only feeds the eager values that tracing carries along; the graph does not depend on it.
        # Shape checks in the forward become constants of the trace: expected, the graph is static but for B.
        with placeholders(model, layers, softmaxes) as (stubs, softmax_stubs), segment_scope(0), \
                tile_pos_embed(model, tile_latent), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The legacy exporter is chosen on purpose: its Function.symbolic hook makes the placeholders.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, args, buffer, dynamo=False, opset_version=BASE_OPSET,
                              input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], dynamic_axes=dynamic,
                              custom_opsets={PLACEHOLDER_DOMAIN: 1}, do_constant_folding=True)
            ranks = {name: stub.input_rank for name, stub in stubs.items()}
            uncalled_softmax = sorted(site for site, stub in softmax_stubs.items() if not stub.called)
    finally:
        model.train(was_training)
    uncalled = sorted(name for name, rank in ranks.items() if rank is None)
    if uncalled:
        raise ValueError(f"{len(uncalled)} quantized layers are never called by the forward, e.g. {uncalled[:3]}")
    if uncalled_softmax:
        raise ValueError(f"{len(uncalled_softmax)} quantized softmaxes are never called, e.g. {uncalled_softmax[:3]}")
    proto = fold_static_subgraphs(onnx.load_model_from_string(buffer.getvalue()))
    # The exporter drops dead code: e.g. dit4sr_q computes to_k_control and never uses it.
    present = {onnx.helper.get_attribute_value(a).decode() for n in proto.graph.node
               if n.domain == PLACEHOLDER_DOMAIN for a in n.attribute if a.name == "layer"}
    sites = [onnx.helper.get_attribute_value(a).decode() for n in proto.graph.node
             if n.domain == PLACEHOLDER_DOMAIN for a in n.attribute if a.name == "site"]
    return BaseGraph(proto, {name: int(rank) for name, rank in ranks.items() if name in present},
                     sorted(set(ranks) - present), sites)


def fold_static_subgraphs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold everything that does not depend on the batch axis into constants: with static spatial
    sizes most of the traced shape arithmetic is constant (the positional table is already the tile's
    crop, see `tile_pos_embed`)."""
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    graph = gs.import_onnx(model)
    ort.set_default_logger_severity(3)  # gs evaluates with onnxruntime; its optimiser notes are noise here
    try:
        graph.fold_constants(fold_shapes=True, size_threshold=FOLD_SIZE_LIMIT, error_ok=False).cleanup()
    finally:
        ort.set_default_logger_severity(2)
    return gs.export_onnx(graph, do_type_check=False)
