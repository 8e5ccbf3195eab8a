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


def damped_gram(gram: torch.Tensor, damp: float = DEFAULT_DAMP, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """H + damp * mean(diag H) * I in `dtype`; inputs never seen in calibration get a unit diagonal."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"expected a square Gram matrix, got shape {tuple(gram.shape)}")
    if not (math.isfinite(damp) and damp > 0):
        raise ValueError(f"damp must be positive and finite, got {damp!r}")
    h = gram.detach().to(dtype).clone()
    dead = torch.diagonal(h) <= 0
    if dead.any():
        h[dead, :] = 0.0
        h[:, dead] = 0.0
        h.diagonal()[dead] = 1.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    return h


def reverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper triangular V with H = V V^T (the Cholesky factor of H with rows and columns reversed).

    V^-1 is the upper Cholesky factor of H^-1 that GPTQ's column updates use, so V alone drives them
    (see `gptq_quantize`): one factorization, no explicit inverse. A float32 factorization that fails
    (H too ill-conditioned for single precision) is redone in float64.
    """
    flipped = h.flip(0, 1)
    m, info = torch.linalg.cholesky_ex(flipped)
    if int(info) != 0 and h.dtype != torch.float64:
        m = torch.linalg.cholesky(flipped.double()).to(h.dtype)
    elif int(info) != 0:
        raise ValueError("the damped Gram matrix is not positive definite")
    return m.flip(0, 1)


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

    Computes in float64 for float64 input, else in float32, the factorization too: with the activation-noise
    target that moved the objective E||W x - Q x_q||^2 by 1e-5 relative on the tiny model's calibration Grams
    (a float32-sized perturbation of the Gram moves it by 4e-5) and by 1.3e-4 on a full-width synthetic one.

    With H = V V^T (V upper, `reverse_cholesky`) the upper Cholesky factor of H^-1 is U = V^-1, and the
    textbook update "w_j -= e_i U_ij for every later column, e_i = (w_i - q_i) / U_ii" sums to
    w_j + (sum_{i<j} d_i V_ij) / V_jj with d_i = w_i(original) - q_i. So the loop carries S = D V for the
    columns not yet quantized: rank-1 updates inside a block of 128 columns and one matmul per block for
    the rest (lazy batch). A group's scale needs its columns as updated by the earlier columns only, which
    is W_G + S_G V_GG^-1 (one small triangular solve per group).
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
    v = reverse_cholesky(damped_gram(gram, damp, dtype))
    w0 = w.detach().to(dtype)
    acc = torch.zeros(out, n, dtype=dtype)          # S = D V over the columns quantized so far
    codes = torch.empty(out, n, dtype=dtype)
    scales = torch.empty(out, n // gs, dtype=dtype)
    block = max(gs, (_BLOCK // gs) * gs) if gs < n else n
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        delta = torch.empty(out, b1 - b0, dtype=dtype)
        for i in range(b0, b1):
            if i % gs == 0:
                g1 = i + gs
                partial = w0[:, i:g1] + torch.linalg.solve_triangular(v[i:g1, i:g1], acc[:, i:g1], upper=True,
                                                                      left=False)
                scales[:, i // gs] = group_scale(partial, config.bits, config)
            s = scales[:, i // gs]
            col = w0[:, i] + acc[:, i] / v[i, i]
            c = _round_codes(col, s, q)
            codes[:, i] = c
            d = w0[:, i] - dequantize_codes(c, s, config)
            acc[:, i + 1:b1] += d[:, None] * v[i, i + 1:b1][None, :]
            delta[:, i - b0] = d
        if b1 < n:
            acc[:, b1:] += delta @ v[b0:b1, b1:]
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
    Computed as W' = W - noise_var * W H_q^-1 (H H_q^-1 = I - noise_var H_q^-1) with one Cholesky of H_q,
    in float64 for float64 w, else float32 (float64 again if H_q is too ill-conditioned for it).
    Returns (W' in w's dtype, H_q in the computing dtype).
    """
    if not noise_var >= 0:
        raise ValueError(f"noise_var must be non-negative, got {noise_var!r}")
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    h_q = gram.detach().to(dtype).clone()
    if noise_var == 0:
        return w, h_q
    h_q.diagonal().add_(noise_var)
    w_t = w.detach().to(dtype).mT
    chol, info = torch.linalg.cholesky_ex(h_q)
    if int(info) != 0 or dtype != torch.float64 and not torch.isfinite(chol).all():
        chol = torch.linalg.cholesky(h_q.double())
        w_t = w_t.double()
    target = w_t - noise_var * torch.cholesky_solve(w_t, chol)
    return target.mT.to(w.dtype), h_q
