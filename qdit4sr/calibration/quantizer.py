"""Symmetric uniform quantization on the restricted integer range [-qmax, qmax].

Weights use per-group (or per-output-channel) scales with round-to-nearest and an
optional clip-ratio search; activations use a static per-tensor scale derived from
a calibrated second moment and the MSE-optimal Gaussian clip.  Packing helpers
store the integer codes densely (ONNX INT4 layout for 4 bits).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import optimize, special

from ..checks import check_int, is_int

__all__ = [
    "MIN_BITS",
    "MAX_BITS",
    "qmax",
    "WeightQuantConfig",
    "QuantizedWeight",
    "quantize_weight",
    "fake_quantize_weight",
    "pack_int",
    "unpack_int",
    "gaussian_quant_mse",
    "gaussian_clip_ratio",
    "gaussian_kappa",
    "fake_quantize_activation",
    "activation_scale",
]

MIN_BITS = 2
MAX_BITS = 8

# Clip ratios tried by the weight scale search; 1.0 is included so the search can never lose to plain RTN.
_CLIP_SEARCH_GRID = (0.5, 1.0, 20)


def _check_bits(bits: int) -> int:
    if not is_int(bits) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return bits


def qmax(bits: int) -> int:
    """Largest code of the restricted symmetric range: 2**(bits-1) - 1."""
    return 2 ** (_check_bits(bits) - 1) - 1


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightQuantConfig:
    """Weight quantization settings; ``group_size=None`` means one scale per output channel."""

    bits: int = 4
    group_size: int | None = 64
    scale_search: bool = False
    scale_dtype: torch.dtype = torch.float32   # float16: scales stored (and the codes rounded) in fp16

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.scale_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"scale_dtype must be torch.float32 or torch.float16, got {self.scale_dtype}")
        check_int("group_size", self.group_size, optional=True)


@dataclass
class QuantizedWeight:
    """Integer codes plus per-group scales of a linear weight."""

    qweight: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # float32 or float16 [out, n_groups]
    bits: int
    group_size: int | None

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    def dequantize(self) -> torch.Tensor:
        """Float32 weight [out, in] = code * scale of its group, in the scales' precision.

        With fp16 scales the product is rounded to fp16, as a DequantizeLinear with an fp16 scale
        outputs it (the product of a code and an fp16 scale is exact in fp32, so one rounding).
        """
        out, n_in = self.qweight.shape
        n_groups = self.scales.shape[1]
        codes = self.qweight.to(torch.float32).reshape(out, n_groups, n_in // n_groups)
        w = (codes * self.scales.to(torch.float32)[..., None]).reshape(out, n_in)
        return w.to(self.scales.dtype).to(torch.float32) if self.scales.dtype == torch.float16 else w


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View w [out, in] as [out, n_groups, group]."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    out, n_in = w.shape
    if group_size is None:
        return w.reshape(out, 1, n_in)
    if n_in % group_size:
        raise ValueError(f"in_features={n_in} is not divisible by group_size={group_size}")
    return w.reshape(out, n_in // group_size, group_size)


def _scale_from_amax(amax: torch.Tensor, q: int) -> torch.Tensor:
    scale = amax / q
    # All-zero (or underflowing) groups get scale 1 so their codes are 0 instead of NaN.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _round_codes(w: torch.Tensor, scale: torch.Tensor, q: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale), -q, q)


def _search_scale(groups: torch.Tensor, amax: torch.Tensor, q: int) -> torch.Tensor:
    """Per-group scale whose clip ratio from the grid minimises the group's squared error."""
    lo, hi, n = _CLIP_SEARCH_GRID
    best_scale = _scale_from_amax(amax, q)
    best_err = torch.full_like(amax, math.inf)
    # Loop over the few ratios, not the groups: peak memory stays at one weight copy.
    for ratio in torch.linspace(lo, hi, n, dtype=torch.float64).tolist():
        scale = _scale_from_amax(amax * ratio, q)
        err = (groups - _round_codes(groups, scale, q) * scale).square().sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


def quantize_weight(w: torch.Tensor, config: WeightQuantConfig) -> QuantizedWeight:
    """Round-to-nearest symmetric quantization of w [out, in] per group of input channels."""
    q = qmax(config.bits)
    groups = _grouped(w.detach().to(torch.float32), config.group_size)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    if config.scale_search:
        scale = _search_scale(groups, amax, q)
    else:
        scale = _scale_from_amax(amax, q)
    if config.scale_dtype == torch.float16:
        # Round the scale first so the codes are the nearest ones for the scale that is stored.
        tiny, big = torch.finfo(torch.float16).smallest_normal, torch.finfo(torch.float16).max
        scale = scale.clamp(tiny, big).to(torch.float16).to(torch.float32)
    codes = _round_codes(groups, scale, q)
    return QuantizedWeight(
        qweight=codes.reshape(w.shape).to(torch.int8),
        scales=scale.squeeze(-1).to(config.scale_dtype).contiguous(),
        bits=config.bits,
        group_size=config.group_size,
    )


def fake_quantize_weight(w: torch.Tensor, config: WeightQuantConfig) -> torch.Tensor:
    """Quantize then dequantize w, returned in w's dtype."""
    return quantize_weight(w, config).dequantize().to(w.dtype)


# --------------------------------------------------------------------------- packing


def _check_code_range(q: torch.Tensor, bits: int) -> None:
    if q.is_floating_point() or q.is_complex():
        raise TypeError(f"pack_int expects integer codes, got {q.dtype}")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"codes out of the {bits}-bit two's complement range [{lo}, {hi}]")


def _pack_bitstream(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Little-endian bit stream: bit j of element i lands at stream position i * bits + j."""
    shifts = torch.arange(bits, device=u.device)
    stream = ((u[:, None] >> shifts) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    byte_shifts = torch.arange(8, device=u.device)
    return (stream.reshape(-1, 8) << byte_shifts).sum(dim=1).to(torch.uint8)


def _unpack_bitstream(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    byte_shifts = torch.arange(8, device=packed.device)
    stream = ((packed.to(torch.int64)[:, None] >> byte_shifts) & 1).reshape(-1)
    shifts = torch.arange(bits, device=packed.device)
    return (stream[: count * bits].reshape(count, bits) << shifts).sum(dim=1)


def pack_int(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack two's complement ``bits``-bit codes into a 1-D uint8 tensor.

    4 bits: two codes per byte, the first in the low nibble (ONNX INT4 layout), odd
    lengths padded with a zero nibble.  8 bits: one plain byte per code.  Other widths:
    a little-endian bit stream (the same rule that gives the 4- and 8-bit layouts).
    """
    _check_bits(bits)
    _check_code_range(q, bits)
    if bits == 4:
        # In 16/8-bit integers, not int64: a 13824 x 1536 weight then takes ~0.1 GB on the way, not ~0.5 GB.
        u = (q.reshape(-1).to(torch.int16) & 0xF).to(torch.uint8)
        u = torch.nn.functional.pad(u, (0, u.numel() % 2))
        return u[0::2] | (u[1::2] << 4)
    flat = q.reshape(-1).to(torch.int64)
    if bits == 8:
        return flat.to(torch.int8).view(torch.uint8)
    return _pack_bitstream(flat & (2**bits - 1), bits)


def unpack_int(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """Inverse of ``pack_int``: int8 codes of the given shape."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed must be a 1-D uint8 tensor, got {packed.dtype} with shape {tuple(packed.shape)}")
    shape = torch.Size([shape] if isinstance(shape, int) else shape)
    count = shape.numel()
    needed = (count * bits + 7) // 8
    if packed.numel() < needed:
        raise ValueError(f"{packed.numel()} bytes cannot hold {count} codes of {bits} bits ({needed} needed)")
    if bits == 8:
        return packed[:count].view(torch.int8).reshape(shape).clone()
    if bits == 4:
        b = packed[:needed].to(torch.int64)
        u = torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)[:count]
    else:
        u = _unpack_bitstream(packed[:needed], bits, count)
    signed = torch.where(u >= 2 ** (bits - 1), u - 2**bits, u)
    return signed.to(torch.int8).reshape(shape)


# --------------------------------------------------------------------------- Gaussian clip


def _pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _cell_sq_error(a: np.ndarray, b: np.ndarray, level: np.ndarray) -> np.ndarray:
    """Closed form of the integral of (z - level)^2 phi(z) over [a, b], for 0 <= a < b <= inf."""
    # Survival functions keep tail cells accurate where cdf differences would cancel.
    mass = special.ndtr(-a) - special.ndtr(-b)
    phi_a, phi_b = _pdf(a), _pdf(b)
    b_phi_b = np.where(np.isinf(b), 0.0, b) * phi_b  # b * phi(b) -> 0 as b -> inf
    first = phi_a - phi_b  # integral of z phi
    second = mass + a * phi_a - b_phi_b  # integral of z^2 phi
    return second - 2.0 * level * first + level * level * mass


def gaussian_quant_mse(clip: float | np.ndarray, bits: int) -> float | np.ndarray:
    """E[(z - Q_c(z))^2] for z ~ N(0, 1), levels k * c / qmax, k in [-qmax, qmax].

    Exact up to float rounding: the expectation is a sum over quantisation cells of
    closed-form Gaussian integrals (by symmetry only z >= 0 is integrated, then doubled).
    Accepts a scalar or an array of clip values.
    """
    q = qmax(bits)
    c = np.asarray(clip, dtype=np.float64)
    if np.any(c <= 0):
        raise ValueError("clip must be positive")
    step = (c / q)[..., None]
    k = np.arange(q + 1, dtype=np.float64)
    lower = np.maximum(k - 0.5, 0.0) * step
    upper = np.where(k < q, (k + 0.5) * step, np.inf)
    mse = 2.0 * _cell_sq_error(lower, upper, k * step).sum(axis=-1)
    return float(mse) if mse.ndim == 0 else mse


@functools.lru_cache(maxsize=None)
def _gaussian_optimum(bits: int) -> tuple[float, float]:
    """(clip, mse) minimising gaussian_quant_mse: coarse grid, then bounded Brent refinement."""
    grid = np.linspace(0.2, 10.0, 491)
    i = int(np.argmin(gaussian_quant_mse(grid, bits)))
    # Refining inside the best grid bracket avoids Brent locking onto a far local minimum.
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    res = optimize.minimize_scalar(
        lambda c: gaussian_quant_mse(c, bits), bounds=(lo, hi), method="bounded", options={"xatol": 1e-10}
    )
    return float(res.x), float(res.fun)


def gaussian_clip_ratio(bits: int) -> float:
    """MSE-optimal clip c (in units of the standard deviation) for a N(0, 1) input.

    The quantizer has levels {-qmax..qmax} * step with c = qmax * step; c minimises
    ``gaussian_quant_mse`` (exact numerical integration, Brent search over c).
    """
    return _gaussian_optimum(_check_bits(bits))[0]


def gaussian_kappa(bits: int) -> float:
    """Minimal normalised MSE of the optimally clipped ``bits``-bit symmetric quantizer on N(0, 1).

    kappa(b) is the distortion coefficient of the temporal bit scheduler: a
    Gaussian-like activation with variance v, statically quantized at b bits with
    the optimal clip, incurs mean squared error D = v * kappa(b).  It is obtained by
    summing the exact Gaussian integrals of (z - level)^2 over every quantisation
    cell and both clipped tails, minimised over the clip with scipy's bounded Brent.
    """
    return _gaussian_optimum(_check_bits(bits))[1]


# --------------------------------------------------------------------------- activations


def fake_quantize_activation(x: torch.Tensor, bits: int, scale: float | torch.Tensor) -> torch.Tensor:
    """clamp(round(x / scale), -qmax, qmax) * scale with a static scale, as the deployed Q/DQ pair does."""
    q = qmax(bits)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(dtype=x.dtype, device=x.device)
    elif not scale > 0:
        raise ValueError(f"activation scale must be positive, got {scale!r}")
    # torch.round rounds half to even, the same rule as ONNX QuantizeLinear.
    return torch.clamp(torch.round(x / scale), -q, q) * scale


def activation_scale(variance: float, bits: int) -> float:
    """Static per-tensor scale gaussian_clip_ratio(bits) * sqrt(variance) / qmax(bits).

    A zero variance maps to the smallest normal float32 so the exported Q/DQ scale stays valid.
    """
    if not variance >= 0:
        raise ValueError(f"variance must be non-negative, got {variance!r}")
    scale = gaussian_clip_ratio(bits) * math.sqrt(variance) / qmax(bits)
    return max(scale, float(torch.finfo(torch.float32).tiny))
