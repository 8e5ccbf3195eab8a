"""GPTQ-style error compensation for the residue quantization (Frantar et al., 2023).

Quantizes the columns of a residue R [out, in] one by one and spreads each column's rounding error
over the columns not yet quantized, weighted by the inverse Hessian H^-1 of the layer's output error
||(R - Q) X||^2, where H = X X^T / N is the Gram matrix of the layer's (Hadamard-rotated) calibration
inputs. Group scales are fixed when the quantizer reaches a group's first column, from the weights as
updated so far, exactly as the RTN quantizer would fix them; codes, scales and bits are those of
`quantize_weight`, so the result is a drop-in `QuantizedWeight`.

The column updates use the upper Cholesky factor of H^-1 and lazy block updates (the standard fast
formulation); the tests check them against the textbook sequential update with explicit H^-1
down-dating.
"""
from __future__ import annotations

import math

import torch

from .quantizer import QuantizedWeight, WeightQuantConfig, _round_codes, _scale_from_amax, _search_scale, qmax

DEFAULT_DAMP = 0.01
_BLOCK = 128


def damped_gram(gram: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """H + damp * mean(diag H) * I in float64; inputs never seen in calibration get a unit diagonal."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"expected a square Gram matrix, got shape {tuple(gram.shape)}")
    if not (math.isfinite(damp) and damp > 0):
        raise ValueError(f"damp must be positive and finite, got {damp!r}")
    h = gram.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h.diagonal()[dead] = 1.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    return h


def group_scale(columns: torch.Tensor, bits: int, config: WeightQuantConfig) -> torch.Tensor:
    """The RTN scale [out] of one group's columns [out, g], rounded to the storage precision."""
    q = qmax(bits)
    groups = columns[:, None, :]
    amax = groups.abs().amax(dim=-1, keepdim=True)
    scale = _search_scale(groups, amax, q) if config.scale_search else _scale_from_amax(amax, q)
    if config.scale_dtype == torch.float16:
        tiny, big = torch.finfo(torch.float16).smallest_normal, torch.finfo(torch.float16).max
        scale = scale.clamp(tiny, big).to(torch.float16).to(scale.dtype)
    return scale.reshape(-1)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, config: WeightQuantConfig) -> torch.Tensor:
    """code * scale as `QuantizedWeight.dequantize` yields it (fp16-rounded product with fp16 scales)."""
    w = codes * scale
    return w.to(torch.float16).to(w.dtype) if config.scale_dtype == torch.float16 else w


def gptq_quantize(w: torch.Tensor, gram: torch.Tensor, config: WeightQuantConfig,
                  damp: float = DEFAULT_DAMP) -> QuantizedWeight:
    """Error-compensated quantization of w [out, in] given the input Gram matrix [in, in].

    Computes in float64 for float64 input, else in float32 (the inverse Hessian always in float64).
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    out, n = w.shape
    if gram.shape != (n, n):
        raise ValueError(f"Gram matrix {tuple(gram.shape)} does not match in_features={n}")
    gs = config.group_size or n
    if n % gs:
        raise ValueError(f"in_features={n} is not divisible by group_size={gs}")
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    q = qmax(config.bits)
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(damped_gram(gram, damp)))
    u = torch.linalg.cholesky(h_inv, upper=True).to(dtype)   # row i: H^-1 of the columns >= i, scaled
    work = w.detach().to(dtype).clone()
    codes = torch.empty(out, n, dtype=dtype)
    scales = torch.empty(out, n // gs, dtype=dtype)
    block = max(gs, (_BLOCK // gs) * gs) if gs < n else n
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        wb = work[:, b0:b1]
        err = torch.empty(out, b1 - b0, dtype=dtype)
        for j in range(b1 - b0):
            i = b0 + j
            if i % gs == 0:
                scales[:, i // gs] = group_scale(wb[:, j:j + gs], config.bits, config)
            s = scales[:, i // gs]
            col = wb[:, j]
            c = _round_codes(col, s, q)
            codes[:, i] = c
            e = (col - dequantize_codes(c, s, config)) / u[i, i]
            wb[:, j + 1:] -= e[:, None] * u[i, i + 1:b1][None, :]
            err[:, j] = e
        work[:, b1:] -= err @ u[b0:b1, b1:]
    return QuantizedWeight(qweight=codes.to(torch.int8), scales=scales.to(config.scale_dtype).contiguous(),
                           bits=config.bits, group_size=config.group_size)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> float:
    """Mean squared output error per token, tr((W - W_hat) H (W - W_hat)^T) / out, for H = X X^T / N."""
    d = (w.double() - w_hat.double())
    return float(torch.einsum("oi,ij,oj->", d, gram.double(), d)) / w.shape[0]


def activation_noise_target(w: torch.Tensor, gram: torch.Tensor, noise_var: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and Gram matrix for quantizing a layer whose inputs are themselves quantized.

    Models the activation quantizer as white noise of variance `noise_var` per element (Delta^2 / 12 of
    the static scale; the Hadamard rotation makes rounding errors nearly white): inputs x_q = x + n have
    the Gram matrix H_q = H + noise_var * I and E[x x_q^T] = H. The least-squares weights for x_q are
    W' = W H H_q^-1 (a Wiener shrinkage of directions the inputs barely excite), and
    E||W x - Q x_q||^2 = E||W x - W' x_q||^2 + E||(W' - Q) x_q||^2, so GPTQ on (W', H_q) minimises it.
    Returns (W' in w's dtype, H_q in float64).
    """
    if not noise_var >= 0:
        raise ValueError(f"noise_var must be non-negative, got {noise_var!r}")
    h = gram.detach().to(torch.float64)
    h_q = h + noise_var * torch.eye(h.shape[0], dtype=torch.float64)
    target = torch.linalg.solve(h_q, h @ w.detach().to(torch.float64).mT).mT
    return target.to(w.dtype), h_q
