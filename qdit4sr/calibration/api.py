"""`quantize_(model, config, stats)`: plan and apply Q-DiT4SR to a DiT4SR transformer, in place.

Layer by layer so the full-size model fits in memory: each weight is rotated and split into its
full-precision branches, the residue overwrites the original weight, VaSMP picks the weight bits
from the residues' variances, then each residue is quantized and its nn.Linear replaced.

With `storage_dtype="float16"` (the default) everything kept in floating point (branches, group-wise
weight scales, biases and the unquantized layers) is rounded to fp16 values, which is how the export
stores it; the torch model still computes in fp32, so it and the exported graphs agree exactly.
Per-output-channel weight scales stay float32 (see `_scale_dtype`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from .actclip import search_activation_scale
from .gptq import activation_noise_target, gptq_quantize
from .hadamard import rotate_weight
from .hsvd import HSVDConfig, block_rank1_weight, decompose_weight
from .layers import quantizable_linears
from .plan import BitPlan, LayerPlan, QDiT4SRConfig, SoftmaxPlan, step_to_segment
from .qlinear import NO_ACT_QUANT, QuantLinear
from .qsoftmax import QuantSoftmax, attention_cores, softmax_scale
from .quantizer import (QuantizedWeight, WeightQuantConfig, activation_scale, gaussian_kappa, qmax,
                        quantize_weight)
from .stats import ActivationStats
from .vasmp import allocate_bits, layer_weight_variance
from .vatmp import schedule_shared


@dataclass
class _Branches:
    up: torch.Tensor | None
    down: torch.Tensor | None
    sigma: torch.Tensor | None
    u: torch.Tensor | None
    v: torch.Tensor | None
    block_shape: tuple[int, int] | None

    def to(self, device) -> "_Branches":
        return _Branches(*(None if t is None else t.to(device) for t in (self.up, self.down, self.sigma, self.u,
                                                                          self.v)), self.block_shape)


def _hsvd_config(config: QDiT4SRConfig) -> HSVDConfig:
    return HSVDConfig(method=config.decomposition, rank=config.rank if config.decomposition != "rtn" else 0,
                      seed=config.seed)


def _budget_quant_config(config: QDiT4SRConfig) -> WeightQuantConfig:
    """The residue quantizer at the budget's bit width: what the budget split scores its candidates with."""
    bits = int(round(config.weight_bits))
    return WeightQuantConfig(bits=bits, group_size=config.group_size_for(bits), scale_search=config.scale_search,
                             scale_dtype=torch.float16 if config.storage_dtype == "float16" else torch.float32)


def _rotated(weight: torch.Tensor, config: QDiT4SRConfig, device: torch.device | None) -> torch.Tensor:
    """The weight in float32 on `device` (None: where it is), Hadamard-rotated when the method rotates."""
    w = weight.detach().to(device=device, dtype=torch.float32)
    return rotate_weight(w) if config.hadamard else w


def _residue(w_h: torch.Tensor, br: _Branches) -> torch.Tensor:
    """W_H minus the dense branches (W_G + W_L summed first, as WeightDecomposition.branch_weight does)."""
    if br.up is None and br.sigma is None:
        return w_h
    branch = torch.zeros_like(w_h)
    if br.up is not None:
        branch = branch + br.up @ br.down
    if br.sigma is not None:
        branch = branch + block_rank1_weight(br.sigma, br.u, br.v)
    return w_h - branch


def split_weight(weight: torch.Tensor, config: QDiT4SRConfig,
                 device: torch.device | None = None) -> tuple[torch.Tensor, _Branches]:
    """Rotate and remove the full-precision branches on `device` (None: the weight's); (residue, branches)."""
    w_h = _rotated(weight, config, device)
    if config.decomposition == "rtn":
        return w_h, _Branches(None, None, None, None, None, None)
    # Only the budget split looks at the quantized residue; the other methods' branches ignore it.
    dec = decompose_weight(w_h, _hsvd_config(config), _budget_quant_config(config))
    br = _Branches(dec.up, dec.down, dec.sigma, dec.u, dec.v, dec.block_shape)
    return _residue(w_h, br), br


def _weight_bits(variances: np.ndarray, sizes: np.ndarray, config: QDiT4SRConfig) -> tuple[np.ndarray, dict]:
    lo, hi = config.weight_bit_range
    if not config.mixed_weight_bits:
        return np.full(len(variances), int(config.weight_bits)), {}
    result = allocate_bits(variances, sizes, config.weight_bits, lo, hi)
    return result.bits.astype(int), {"vasmp_achieved_bits": result.achieved, "vasmp_distortion": result.distortion,
                                     "vasmp_uniform_distortion": result.uniform_distortion,
                                     "vasmp_exact": bool(result.exact)}


def _act_schedule(v: np.ndarray, config: QDiT4SRConfig) -> tuple[list[tuple[int, int]], np.ndarray, dict]:
    """Segments and [L, K] activation bits from per-step second moments v [L, T]."""
    steps = v.shape[1]
    if config.act_bits == NO_ACT_QUANT:
        return [(0, steps)], np.full((v.shape[0], 1), NO_ACT_QUANT), {}
    if not config.use_temporal:
        return [(0, steps)], np.full((v.shape[0], 1), int(config.act_bits)), {}
    kappa = {b: gaussian_kappa(b) for b in config.act_bit_choices}
    sched = schedule_shared(v, kappa, config.act_bits, config.num_segments, config.act_bit_choices)
    b = sched.boundaries
    return [(b[i], b[i + 1]) for i in range(len(b) - 1)], sched.bits.astype(int), {
        "vatmp_cost": sched.cost, "vatmp_exact": bool(sched.exact)}


def _static_scale(v_seg: np.ndarray, amax_seg: np.ndarray, bits: int, hist_seg: np.ndarray | None = None) -> float:
    """Gaussian-optimal clip from the segment's mean second moment, never beyond the observed range; with the
    segment's |x| histograms [steps, bins], the clip with the smallest quantization MSE on them instead."""
    if bits == NO_ACT_QUANT:
        return 1.0
    if hist_seg is not None:
        return search_activation_scale(hist_seg.sum(0), float(v_seg.mean()), float(amax_seg.max()), bits)
    scale = activation_scale(float(v_seg.mean()), bits)
    return float(min(scale, max(float(amax_seg.max()) / qmax(bits), np.finfo(np.float32).tiny)))


def _storage_round(t: torch.Tensor | None, config: QDiT4SRConfig) -> torch.Tensor | None:
    """t rounded to the storage precision, kept in float32 for compute."""
    if t is None or config.storage_dtype == "float32":
        return t
    return t.detach().float().to(torch.float16).float()


def _scale_dtype(config: QDiT4SRConfig, group_size: int | None) -> torch.dtype:
    """Group scales follow storage_dtype; per-channel scales stay float32 (4 bytes per output channel), so
    code x scale is exact in float32 and the cpu flavour runs the layer exactly as an integer matmul."""
    return torch.float16 if config.storage_dtype == "float16" and group_size is not None else torch.float32


def round_unquantized_(model: nn.Module, config: QDiT4SRConfig) -> None:
    """Round the float parameters and buffers outside the quantized layers to the storage precision."""
    for module in model.modules():
        if isinstance(module, QuantLinear):  # its tensors are rounded when it is built
            continue
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if t.dtype == torch.float32 and config.storage_dtype != "float32":
                # In place, through a half-size copy: the 384^2 positional table alone is 0.9 GB in float32.
                t.data.copy_(t.data.to(torch.float16))


def _act_noise_var(bits: np.ndarray, scales: list[float], segments: list[tuple[int, int]]) -> float:
    """Mean over sampler steps of the activation rounding-noise variance scale^2 / 12 (0 where unquantized)."""
    steps = segments[-1][1]
    return sum((e - s) / steps * (scales[k] ** 2 / 12.0 if bits[k] < NO_ACT_QUANT else 0.0)
               for k, (s, e) in enumerate(segments))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


@torch.no_grad()
def quantize_(model: nn.Module, config: QDiT4SRConfig, stats: ActivationStats, progress: bool = True,
              device: str | torch.device | None = None) -> BitPlan:
    """Replace the calibrated linears of `model` by QuantLinear; returns the BitPlan that was applied.

    The decompositions and residue quantization run on `device` (None: where each weight is), one
    layer at a time; the QuantLinear layers are stored where the model is. Memory stays flat in the
    model size: the first pass keeps only each layer's small branches and residue variance, the
    second recomputes the residue from the original weight, quantizes it and frees the weight.
    """
    linears = quantizable_linears(model)
    missing = [n for n in stats.layers if n not in linears]
    if missing:
        raise ValueError(f"activation statistics name layers the model lacks, e.g. {missing[:3]}")
    names = list(stats.layers)
    if config.error_compensation != "none" and (stats.gram is None or set(names) - set(stats.gram)):
        raise ValueError("GPTQ error compensation needs the layers' input Gram matrices; collect the activation "
                         "statistics with CalibrationConfig(gram=True)")
    if config.act_clip_search and stats.act_hist is None:
        raise ValueError("the activation clip search needs activation histograms; collect the activation "
                         "statistics with CalibrationConfig(act_hist=True)")
    device = None if device is None else torch.device(device)

    branches: dict[str, _Branches] = {}
    variances = np.zeros(len(names))
    for i, name in enumerate(tqdm(names, desc=f"decompose ({config.decomposition})", disable=not progress)):
        residue, br = split_weight(linears[name].weight, config, device)
        variances[i] = max(layer_weight_variance(residue), 1e-30)
        branches[name] = br.to("cpu")   # small; the device keeps room for the next layer
        del residue
    sizes = np.array([linears[n].weight.numel() for n in names], dtype=np.int64)
    w_bits, w_info = _weight_bits(variances, sizes, config)

    segments, a_bits, a_info = _act_schedule(stats.second_moment, config)
    segment_of_step = step_to_segment(segments)

    layer_plans = []
    for i, name in enumerate(tqdm(names, desc="quantize residues", disable=not progress)):
        layer, br = linears.pop(name), branches.pop(name)  # pop: the original weight is freed once replaced
        home = layer.weight.device
        residue = _residue(_rotated(layer.weight, config, device), br.to(device or home))
        group_size = config.group_size_for(int(w_bits[i]))
        wq = WeightQuantConfig(bits=int(w_bits[i]), group_size=group_size, scale_search=config.scale_search,
                               scale_dtype=_scale_dtype(config, group_size))
        hist = stats.act_hist[i] if config.act_clip_search else None
        scales = [_static_scale(stats.second_moment[i, s:e], stats.amax[i, s:e], int(a_bits[i, k]),
                                None if hist is None else hist[s:e]) for k, (s, e) in enumerate(segments)]
        if config.error_compensation != "none":
            target, gram = residue, torch.from_numpy(stats.gram[name]).to(residue.device)
            if config.error_compensation == "gptq_act":
                target, gram = activation_noise_target(target, gram, _act_noise_var(a_bits[i], scales, segments))
            residual = gptq_quantize(target, gram, wq, config.gptq_damp)
        else:
            residual = quantize_weight(residue, wq)
        del residue
        residual = QuantizedWeight(residual.qweight.to(home), residual.scales.to(home), residual.bits,
                                   residual.group_size)
        keep = lambda t: None if t is None else _storage_round(t, config).to(home)  # noqa: E731
        qlayer = QuantLinear(residual, keep(layer.bias), hadamard=config.hadamard, act_bits=list(a_bits[i]),
                             act_scales=scales, segment_of_step=segment_of_step, up=keep(br.up),
                             down=keep(br.down), block_sigma=keep(br.sigma), block_u=keep(br.u), block_v=keep(br.v))
        _set_module(model, name, qlayer)
        del layer
        layer_plans.append(LayerPlan(name=name, in_features=qlayer.in_features, out_features=qlayer.out_features,
                                     weight_bits=int(w_bits[i]), weight_variance=float(variances[i]),
                                     act_bits=[int(b) for b in a_bits[i]], act_scales=scales,
                                     rank=0 if br.up is None else int(br.up.shape[1]),
                                     block_shape=None if br.block_shape is None else list(br.block_shape)))
    round_unquantized_(model, config)
    softmax = _quantize_softmax_(model, config, stats, segments, segment_of_step)
    plan = BitPlan(config=config, timesteps=list(stats.timesteps), segments=segments, layers=layer_plans,
                   stats={**w_info, **a_info}, softmax=softmax)
    plan.stats["mean_weight_bits"] = plan.mean_weight_bits()
    plan.stats["mean_act_bits"] = plan.mean_act_bits()
    plan.validate()
    return plan


def _quantize_softmax_(model: nn.Module, config: QDiT4SRConfig, stats: ActivationStats,
                       segments: list[tuple[int, int]], segment_of_step: list[int]) -> list[SoftmaxPlan]:
    """Put an 8-bit softmax-input quantizer into every attention core, scaled per segment from calibration."""
    if not config.quantize_softmax:
        return []
    cores = attention_cores(model)
    if not stats.softmax_sites:
        raise ValueError("the activation statistics have no attention-logit ranges; collect them again with "
                         "collect_activation_stats (or set softmax_bits=16)")
    if set(stats.softmax_sites) != set(cores):
        raise ValueError(f"activation statistics name other attention cores than the model has, e.g. "
                         f"{sorted(set(stats.softmax_sites) ^ set(cores))[:3]}")
    plans = []
    for i, name in enumerate(stats.softmax_sites):
        scales = [softmax_scale(float(stats.softmax_amax[i, s:e].max()), config.softmax_bits) for s, e in segments]
        cores[name].softmax = QuantSoftmax(scales, segment_of_step, config.softmax_bits)
        plans.append(SoftmaxPlan(name=name, bits=config.softmax_bits, scales=scales))
    return plans


def _load_softmax_(model: nn.Module, plan: BitPlan) -> None:
    cores = attention_cores(model)
    segment_of_step = plan.segment_of_step()
    for site in plan.softmax:
        if site.name not in cores:
            raise ValueError(f"the bit plan names the attention core {site.name}, which the model lacks")
        cores[site.name].softmax = QuantSoftmax(site.scales, segment_of_step, site.bits)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


_BUFFERS = ("qweight", "weight_scales", "bias", "up", "down", "block_sigma", "block_u", "block_v")


def save_quantized(model: nn.Module, path) -> None:
    """The quantized layers' tensors (integer residues, scales, branches, biases) as one safetensors file."""
    from safetensors.torch import save_file

    from ..fileio import atomic_write

    tensors = {f"{name}.{b}": getattr(m, b).contiguous() for name, m in quantized_layers(model).items()
               for b in _BUFFERS if getattr(m, b) is not None}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


@torch.no_grad()
def load_quantized_(model: nn.Module, plan: BitPlan, path) -> None:
    """Rebuild the QuantLinear layers of `plan` in an unquantized model from `save_quantized` output."""
    from safetensors.torch import load_file

    from .quantizer import QuantizedWeight

    tensors = load_file(str(path))
    linears = quantizable_linears(model)
    segment_of_step = plan.segment_of_step()
    for lp in plan.layers:
        if lp.name not in linears:
            raise ValueError(f"the bit plan names {lp.name}, which the model lacks")
        get = lambda b: tensors.get(f"{lp.name}.{b}")  # noqa: E731
        if get("qweight") is None or tuple(get("qweight").shape) != (lp.out_features, lp.in_features):
            raise ValueError(f"quantized state has no valid residue for {lp.name}")
        residual = QuantizedWeight(get("qweight"), get("weight_scales"), lp.weight_bits,
                                   plan.config.group_size_for(lp.weight_bits))
        _set_module(model, lp.name, QuantLinear(
            residual, get("bias"), hadamard=plan.config.hadamard, act_bits=lp.act_bits, act_scales=lp.act_scales,
            segment_of_step=segment_of_step, up=get("up"), down=get("down"), block_sigma=get("block_sigma"),
            block_u=get("block_u"), block_v=get("block_v")))
    round_unquantized_(model, plan.config)
    _load_softmax_(model, plan)
