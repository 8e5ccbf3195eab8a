"""ONNX export of a quantized DiT4SR transformer: one graph per timestep segment of the bit plan.

    export_segments(model, plan, out_dir, tile_latent, text_tokens, flavour=("portable", "trt")) -> [SegmentExport]

Each graph is the whole transformer forward for one tile, with the inputs and output of
`qdit4sr.artifacts.graph_io` (only the batch axis is dynamic). The layers' bits, scales and branch
shapes come from the plan, their tensors from the quantized modules.

Route: the transformer is traced once by the TorchScript exporter with every QuantLinear replaced by a
placeholder node (placeholder.py); for every segment and flavour the placeholders are rewritten into
Hadamard, activation Q/DQ, quantized weight and side-branch ops (graph_rewrite.py documents the ops,
and why b-bit activations sit in an INT8 container). Flavours (`qdit4sr.artifacts.flavour.Flavour`):

    portable  standard ONNX ops only; what onnxruntime runs
    trt       the side branches as qdit4sr plugin nodes (plugins/contract.py) for TensorRT; passes `lint_model`
    cpu       standard ONNX ops, per-channel INT8 weights that onnxruntime runs as integer matmuls
              (cpu_flavour.py)

Quantized layers whose output never reaches the velocity (dit4sr_q computes to_k_control and drops it)
are removed by the tracer as dead code; they are listed in `SegmentExport.dead_layers` and not stored.

Weights shared by the segments (all of them: segments differ only in activation bits and scales) are
written once into `weights.bin`, deduplicated by content, and referenced by every graph at the same
offsets; tensors under `external_threshold_bytes` stay inline. Everything is written into a staging
folder beside `out_dir` and moved into place only after every graph passed its checks.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import torch
from tqdm import tqdm

from ..artifacts.flavour import Flavour
from ..artifacts.manifest import graph_file_name
from ..calibration.api import quantized_layers
from ..calibration.plan import BitPlan
from ..calibration.qlinear import QuantLinear
from ..calibration.qsoftmax import QuantSoftmax, quantized_softmaxes
from ..checks import check_int
from ..fileio import atomic_write, sha256_file
from .cpu_flavour import SplitHadamardFactors, cpu_weight_dq, rewrite_layers
from .external_data import DEFAULT_THRESHOLD_BYTES, WEIGHTS_FILE, WeightStore
from .fp16_storage import compact_initializers
from .graph_checks import check_onnx, check_trt
from .graph_rewrite import HadamardFactors, prepare_layer, rewrite_segment
from .placeholder import trace_base_graph

MIN_OPSET, MAX_OPSET = 21, 23  # 21: INT4 and blocked Q/DQ; later opsets change none of the ops used here
# Ops whose schema changed meaning after the TorchScript exporter's opset 20 (lifting them would be wrong).
_CHANGED_AFTER_20 = ("GroupNormalization",)


@dataclass
class SegmentExport:
    """The graphs of one timestep segment."""

    index: int
    steps: tuple[int, int]                              # [start, end) sampler steps
    timesteps: list[float]
    graphs: dict[Flavour, Path] = field(default_factory=dict)   # flavour -> file
    graph_sha256: dict[str, str] = field(default_factory=dict)
    weights: Path | None = None                         # the shared external-data file
    weights_sha256: str | None = None
    act_bits: dict[int, int] = field(default_factory=dict)      # bits -> number of layers using them
    dead_layers: list[str] = field(default_factory=list)        # quantized, but unused by the output


# ----------------------------------------------------------------------------- validation

def _refuse_disagreement(what: str, pairs: dict[str, tuple]) -> None:
    """pairs: label -> (the module's value, the plan's value). The graphs are built from the plan; a module
    that disagrees would make them compute something else than the torch model, the numerical reference."""
    differ = [f"{label} {mine} vs plan {planned}" for label, (mine, planned) in pairs.items() if mine != planned]
    if differ:
        raise ValueError(f"{what} does not match the plan: {'; '.join(differ)}")


def _scales(values) -> list[float]:
    return [float(v) for v in np.float32(values)]  # as the graph stores them


def planned_layers(model: torch.nn.Module, plan: BitPlan) -> dict[str, QuantLinear]:
    """The model's QuantLinear layers in plan order, each checked to be the layer the plan describes."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no QuantLinear layers; quantize it with quantize_() before exporting")
    planned = [lp.name for lp in plan.layers]
    missing, extra = sorted(set(planned) - set(layers)), sorted(set(layers) - set(planned))
    if missing or extra or len(planned) != len(layers):
        raise ValueError(f"plan and model disagree: plan has {len(planned)} layers, model {len(layers)} QuantLinear; "
                         f"missing in model: {missing[:5]}; not in plan: {extra[:5]}")
    segment_map = plan.segment_of_step()
    for lp in plan.layers:
        q = layers[lp.name]
        _refuse_disagreement(f"layer {lp.name}", {
            "shape": ((q.in_features, q.out_features), (lp.in_features, lp.out_features)),
            "weight bits": (q.weight_bits, lp.weight_bits),
            "activation bits": (q.act_bits, lp.act_bits), "activation scales": (_scales(q.act_scales),
                                                                                 _scales(lp.act_scales)),
            "step -> segment map": (q.segment_of_step, segment_map),
            "low-rank rank": (0 if q.up is None else q.up.shape[1], lp.rank),
            "block shape": (None if q.block_shape is None else list(q.block_shape), lp.block_shape)})
    return {name: layers[name] for name in planned}


def planned_softmaxes(model: torch.nn.Module, plan: BitPlan) -> dict[str, QuantSoftmax]:
    """The model's quantized softmaxes in plan order, each checked against the plan."""
    softmaxes = quantized_softmaxes(model)
    planned = [site.name for site in plan.softmax]
    if set(planned) != set(softmaxes):
        raise ValueError(f"plan and model disagree on the quantized softmaxes: plan has {len(planned)}, model "
                         f"{len(softmaxes)}; differing: {sorted(set(planned) ^ set(softmaxes))[:5]}")
    segment_map = plan.segment_of_step()
    for site in plan.softmax:
        q = softmaxes[site.name]
        _refuse_disagreement(f"softmax {site.name}", {
            "bits": (q.bits, site.bits), "scales": (_scales(q.scales), _scales(site.scales)),
            "step -> segment map": (q.segment_of_step, segment_map)})
    return {name: softmaxes[name] for name in planned}


def check_tile(config, tile_latent: int, text_tokens: int) -> None:
    """The static tile must be a whole number of patches that the model's positional table covers."""
    p, max_side = config.patch_size, config.pos_embed_max_size
    check_int("tile_latent", tile_latent)
    if tile_latent % p:
        raise ValueError(f"tile_latent={tile_latent} is not a multiple of the patch size {p}")
    if max_side is not None and tile_latent // p > max_side:
        raise ValueError(f"tile_latent={tile_latent} gives {tile_latent // p} patches per side, beyond the model's "
                         f"pos_embed_max_size={max_side} (largest tile: {max_side * p} latent pixels)")
    check_int("text_tokens", text_tokens)


def check_trt_weight_layout(layers: dict[str, QuantLinear]) -> None:
    """TensorRT blocks only INT4 weights: layers stored as INT8 (> 4 bits) must be per output channel."""
    blocked = [name for name, layer in layers.items() if layer.weight_bits > 4 and layer.group_size is not None]
    if blocked:
        raise ValueError(f"{len(blocked)} layers with more than 4 weight bits are quantized in groups (e.g. "
                         f"{blocked[0]}), which TensorRT does not run as INT8: quantize with wide_group_size=None "
                         f"(the default) or export only the portable flavour")


def _check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= min(MAX_OPSET, onnx.defs.onnx_opset_version()):
        raise ValueError(f"opset must lie in {MIN_OPSET}..{MAX_OPSET} (INT4 and blocked Q/DQ need 21), got {opset}")


def _check_liftable(base: onnx.ModelProto) -> None:
    changed = sorted({n.op_type for n in base.graph.node if n.op_type in _CHANGED_AFTER_20})
    if changed:
        raise ValueError(f"the traced graph uses {changed}, whose meaning changed after opset 20; "
                         f"cannot lift it to opset >= 21")


def _staging_dir(out_dir: Path) -> Path:
    """A fresh folder beside out_dir (same file system, so the final rename is atomic)."""
    parent = out_dir.parent
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output path {out_dir} exists and is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=parent))
    except OSError as e:
        raise ValueError(f"cannot write into {parent}: {e}") from e
    if out_dir.exists() and not os.access(out_dir, os.W_OK | os.X_OK):
        shutil.rmtree(staging, ignore_errors=True)
        raise ValueError(f"output folder {out_dir} is not writable")
    return staging


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the staged files into out_dir: one rename for a new folder, else file by file (weights first)."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    names = sorted(p.name for p in staging.iterdir())
    names.sort(key=lambda n: n != WEIGHTS_FILE)  # graphs only appear once the weights they point to are there
    for name in names:
        os.replace(staging / name, out_dir / name)
    staging.rmdir()


# ----------------------------------------------------------------------------- export

@torch.no_grad()
def export_segments(model: torch.nn.Module, plan: BitPlan, out_dir: str | Path, tile_latent: int, text_tokens: int,
                    flavour: Flavour | str | Iterable[Flavour | str] = Flavour.PORTABLE, opset: int = 21, *,
                    external_threshold_bytes: int = DEFAULT_THRESHOLD_BYTES,
                    progress: bool = True) -> list[SegmentExport]:
    """Write one ONNX graph per segment and flavour (one flavour or several) plus the shared weights file."""
    flavours = Flavour.parse_many(flavour)
    _check_opset(opset)
    check_tile(model.config, tile_latent, text_tokens)
    layers = planned_layers(model, plan)
    softmaxes = planned_softmaxes(model, plan)
    if Flavour.TRT in flavours:
        check_trt_weight_layout(layers)
    out_dir = Path(out_dir)
    staging = _staging_dir(out_dir)
    try:
        base = trace_base_graph(model, layers, tile_latent, text_tokens, softmaxes)
        _check_liftable(base.model)
        base.model = compact_initializers(base.model)
        graphs: dict[tuple[int, str], onnx.ModelProto] = {}
        with WeightStore(staging / WEIGHTS_FILE, external_threshold_bytes) as store:
            store.externalize(base.model)
            live = [lp for lp in plan.layers if lp.name in base.input_ranks]
            specs = {lp.name: prepare_layer(store, lp, layers[lp.name], base.input_ranks[lp.name], flavours)
                     for lp in tqdm(live, desc="quantized weights", disable=not progress)}
            if Flavour.CPU in flavours:
                for lp in tqdm(live, desc="cpu weights", disable=not progress):
                    specs[lp.name].weight[Flavour.CPU] = cpu_weight_dq(store, lp.name, layers[lp.name])
            factors, cpu_factors = HadamardFactors(store), SplitHadamardFactors(store)  # stored when first used
            softmax_specs = {site.name: site for site in plan.softmax if site.name in base.softmax_sites}
            jobs = [(k, fl) for k in range(len(plan.segments)) for fl in flavours]
            for k, fl in tqdm(jobs, desc="segment graphs", disable=not progress):
                cpu = fl == Flavour.CPU
                graphs[k, fl] = rewrite_segment(base.model, specs, k, fl, opset, cpu_factors if cpu else factors,
                                                softmax_specs, rewrite_layers if cpu else None)
        weights_sha = store.sha256
        exports = []
        for k, (start, end) in enumerate(plan.segments):
            seg = SegmentExport(index=k, steps=(start, end), timesteps=list(plan.timesteps[start:end]),
                                weights=out_dir / WEIGHTS_FILE, weights_sha256=weights_sha,
                                dead_layers=list(base.dead_layers))
            for lp in plan.layers:
                if lp.name not in specs:
                    continue
                seg.act_bits[lp.act_bits[k]] = seg.act_bits.get(lp.act_bits[k], 0) + 1
            for fl in flavours:
                name = graph_file_name(k, fl)
                text = graphs.pop((k, fl)).SerializeToString()
                atomic_write(staging / name, lambda tmp, data=text: Path(tmp).write_bytes(data))
                check_onnx(staging / name)
                if fl == Flavour.TRT:
                    check_trt(staging / name)
                seg.graphs[fl] = out_dir / name
                seg.graph_sha256[fl] = sha256_file(staging / name)
            exports.append(seg)
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return exports
