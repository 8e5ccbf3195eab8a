"""Quantized residues as the `cpu` graph flavour runs them: INT8 codes per output channel, float32 scales.

onnxruntime's integer kernel (MatMulIntegerToFloat) runs only per-output-channel INT8 weights with
float32 scales, so every residue becomes codes c [N, K] in [-MAX_CODE, MAX_CODE] and a scale s [N]:

    exact        the layer is already per channel with codes in range and c * s equal to the portable
                 weight in float32 (quantized with CPU_EXACT_CONFIG: per channel, at most 7 bits, whose
                 scales `quantize_` keeps in float32): codes and scales are kept.
    re-expressed otherwise (group-64 INT4 grids, 8-bit codes, fp16 products that are not float32-exact):
                 s = max|w_row| / MAX_CODE and c = round(w / s) with w the portable weight
                 (`QuantLinear.residual_weight`), so |c * s - w| <= s / 2 (plus the float32 rounding of
                 w / s, at most 63 * 2^-24 of a step): within half an INT8 step of the portable model,
                 element by element.

Why MAX_CODE = 63: without AVX-512 VNNI (AVX2, AVX-512BW) the u8 x s8 kernel sums adjacent pairs of
products into a saturating int16 before widening. onnxruntime feeds activations as u8 (its int8 Q/DQ
shifted by 128, so codes up to 255 for any width <= 8 bits), and 2 * 255 * 63 = 32130 < 32767, so no
pair can saturate for any activation width; full-range int8 weights (127) can. VNNI and AMX kernels
accumulate in int32 and are exact either way. 8-bit weight codes are therefore re-expressed to 7 bits.

`cpu_reference_(model)` swaps every QuantLinear's residue for this form: the torch fake-quant model of
the cpu graphs (what their tests compare against, and what the quality bench scores).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .qlinear import QuantLinear
from .quantizer import QuantizedWeight

MAX_CODE = 63          # |code| bound that cannot saturate the u8 x s8 pair sums of non-VNNI kernels
# QDiT4SRConfig settings under which every residue is kept exactly (per channel, at most 7 bits).
CPU_EXACT_CONFIG = {"group_size": None, "wide_group_size": None, "weight_bit_range": (2, 7)}
_TINY = torch.finfo(torch.float32).tiny  # scale of an all-zero row (codes 0)
# |w / s| <= 127, so float32 division moves it by at most 127 * 2^-24 < 2^-17 of a step: a tie can round
# to the farther code by that much.
ROUNDING_SLACK = 2.0 ** -17


@dataclass
class CpuWeight:
    """One residue in the cpu layout and how it relates to the portable weight."""

    codes: torch.Tensor     # int8 [N, K], |codes| <= MAX_CODE
    scale: torch.Tensor     # float32 [N]
    exact: bool             # codes * scale == the portable weight, element by element

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale[:, None]

    def bound(self) -> torch.Tensor:
        """Per output channel, the largest possible |codes * scale - portable weight| (0 when exact)."""
        return torch.zeros_like(self.scale) if self.exact else self.scale * (0.5 + ROUNDING_SLACK)


def _kept(layer: QuantLinear, max_code: int) -> CpuWeight | None:
    """The layer's own codes and scales, when they already are the cpu layout (exactly)."""
    if layer.group_size is not None or layer.weight_scales.shape[1] != 1:
        return None
    codes = layer.qweight
    if codes.numel() and int(codes.abs().max()) > max_code:
        return None
    scale = layer.weight_scales[:, 0].float()
    candidate = CpuWeight(codes.to(torch.int8), scale.contiguous(), exact=True)
    # fp16 scales: the portable DQ rounds code * scale to fp16, which float32 scales do not.
    return candidate if torch.equal(candidate.dequantize(), layer.dequantized_residual()) else None


def requantize_per_channel(w: torch.Tensor, max_code: int = MAX_CODE) -> CpuWeight:
    """w [N, K] on a per-row grid of step max|w_row| / max_code: |codes * scale - w| <= scale / 2 (+ slack)."""
    w = w.float()
    scale = torch.clamp(w.abs().amax(dim=1) / max_code, min=_TINY)
    codes = torch.clamp(torch.round(w / scale[:, None]), -max_code, max_code)
    weight = CpuWeight(codes.to(torch.int8), scale.contiguous(), exact=False)
    # e.g. one group per row: the grid then holds every weight
    weight.exact = torch.equal(weight.dequantize(), w)
    return weight


def cpu_weight(layer: QuantLinear, max_code: int = MAX_CODE) -> CpuWeight:
    """The layer's residue as the cpu flavour stores it (exact when possible, else re-expressed)."""
    if not 1 <= max_code <= 127:
        raise ValueError(f"max_code must lie in 1..127, got {max_code}")
    return _kept(layer, max_code) or requantize_per_channel(layer.dequantized_residual(), max_code)


def code_bits(max_code: int) -> int:
    """The narrowest two's complement width holding codes in [-max_code, max_code] (63 -> 7)."""
    return max(2, int(max_code).bit_length() + 1)


def cpu_quant_linear(layer: QuantLinear, weight: CpuWeight, max_code: int = MAX_CODE) -> QuantLinear:
    """A QuantLinear computing what the cpu graph computes: the same layer with the cpu residue."""
    if weight.exact:
        return layer
    residual = QuantizedWeight(weight.codes, weight.scale[:, None].clone(), code_bits(max_code), None)
    return QuantLinear(residual, layer.bias, hadamard=layer.hadamard, act_bits=layer.act_bits,
                       act_scales=layer.act_scales, segment_of_step=layer.segment_of_step, up=layer.up,
                       down=layer.down, block_sigma=layer.block_sigma, block_u=layer.block_u,
                       block_v=layer.block_v)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@torch.no_grad()
def cpu_reference_(model: nn.Module, max_code: int = MAX_CODE) -> dict[str, CpuWeight]:
    """Give every QuantLinear of `model` its cpu residue, in place; returns the weights by layer name."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    weights = {}
    for name, layer in layers.items():
        weights[name] = cpu_weight(layer, max_code)
        _set_module(model, name, cpu_quant_linear(layer, weights[name], max_code))
    return weights
