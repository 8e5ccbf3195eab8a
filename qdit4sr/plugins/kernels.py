"""Triton kernels of the deployed Q-DiT4SR linear layer, with float64 torch references.

On an already Hadamard-rotated input ``x_h`` [M, K] the layer computes

    y = Qa(x_h) @ deq(W)^T + (x_h @ down^T) @ up^T + block_rank1(x_h; sigma, u, v) + bias

* ``Qa(x) = clamp(round_half_even(x / a_scale), -qa, qa) * a_scale``, qa = 2**(a_bits-1) - 1;
* ``W`` holds signed integer codes, packed two per byte for 4 bits (even column in the low
  nibble, the ONNX INT4 layout) or one int8 per code for 8 bits, with float32 scales per group
  of ``group_size`` input channels;
* the block rank-1 weight is split into P x Q blocks of s_o x s_i, block (p, q) being
  ``sigma[p, q] * outer(u[p, q], v[p, q])``.

Every op has one Triton kernel source.  The same source runs on a CUDA GPU through the torch
wrappers below, on the CPU under ``TRITON_INTERPRET=1`` (set before this module is imported,
because ``triton.jit`` picks the interpreter at decoration time; ``load_kernel_module`` gives a
copy in the other mode), and is compiled ahead of time to PTX for a TensorRT plugin
(``qdit4sr.plugins.ptx``).

The activation/weight product runs on int8 codes with int32 accumulation, flushed to float32
once per weight group, so it is exact up to float32 accumulation.  The branches use float32
``tl.dot``; their ``precision`` ("tf32x3" by default: near-float32 accuracy on tensor cores,
"tf32" is faster, "ieee" exact float32 FMA) only matters on a GPU.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
from types import ModuleType
from typing import Iterator

import torch
import triton
import triton.language as tl

from ..calibration.quantizer import pack_int, qmax, unpack_int
from ..checks import is_int
from .tiles import MIN_DOT, check_tile, pow2_at_least

__all__ = [
    "KERNELS",
    "interpreter_enabled",
    "load_kernel_module",
    "block_branch_constexprs",
    "triton_mode",
    "pack_weight",
    "unpack_weight",
    "lowrank_branch",
    "block_rank1_branch",
    "fused_quant_linear",
    "lowrank_reference",
    "block_rank1_reference",
    "quantize_activation_reference",
    "fused_quant_linear_reference",
]

SUPPORTED_W_BITS = (4, 8)
PRECISIONS = ("tf32x3", "tf32", "ieee")
_MIN_DOT_K_INT8 = 32  # int8 tl.dot needs a reduction dimension of at least 32
# Launch options shared by every wrapper: explicit FMA contraction (Triton warns when it is left
# to its changing default); the interpreter ignores it.
_LAUNCH_OPTIONS = {"enable_fp_fusion": True}

# Adding then subtracting 1.5 * 2**23 rounds a float32 of magnitude below 2**22 to an integer
# with the FPU's round-half-to-even; the operand is clamped to |x| <= 127 first, so it always
# applies, and unlike libdevice rint it also runs under the interpreter.
_RINT_MAGIC = tl.constexpr(12582912.0)


# =========================================================================== device helpers


@triton.jit
def _quantize_activation(x, a_scale, A_BITS: tl.constexpr):
    """int8 codes clamp(rint(x / a_scale), -qa, qa) of a float32 tile."""
    qa: tl.constexpr = (1 << (A_BITS - 1)) - 1
    # div_rn: the plain "/" may lower to an approximate division, which would move ties.
    y = tl.math.div_rn(x, a_scale)
    # Clamping before rounding is equivalent (qa is an integer) and bounds |y| for the magic add.
    y = tl.minimum(tl.maximum(y, -qa * 1.0), qa * 1.0)
    y = (y + _RINT_MAGIC) - _RINT_MAGIC
    return y.to(tl.int8)


@triton.jit
def _load_weight_codes(w_ptr, offs_k, offs_n, mask_n, K, W_BITS: tl.constexpr):
    """int8 weight codes as a [BLOCK_K, BLOCK_N] tile (the transposed layout tl.dot wants)."""
    if W_BITS == 8:
        codes = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=mask_n[None, :], other=0)
    else:
        # Byte j holds columns 2j (low nibble) and 2j+1 (high nibble); it is loaded for each of them.
        byte = tl.load(w_ptr + offs_n[None, :] * (K // 2) + (offs_k // 2)[:, None], mask=mask_n[None, :], other=0)
        byte = byte.to(tl.int8, bitcast=True)
        # Move the wanted nibble to the top, then an arithmetic shift sign-extends it.
        shift = (4 - 4 * (offs_k % 2)).to(tl.int8)
        codes = ((byte << shift[:, None]) >> 4).to(tl.int8)
    return codes


@triton.jit
def _output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's output rows and columns of y [M, N] (grid axis 1 over M, axis 0 over N), with masks."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    return offs_m, offs_m < M, n0, offs_n, offs_n < N


@triton.jit
def _store_output(y_ptr, acc, offs_m, mask_m, offs_n, mask_n, N):
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _x_tile(x_ptr, offs_m, mask_m, k0, K, BLOCK_K: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] tile of row-major x [M, K] at column k0 (zeros outside), its columns and mask."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    return x, offs_k, mask_k


@triton.jit
def _lowrank_down(t, x, down_ptr, offs_k, mask_k, K, R, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """t [BLOCK_M, BLOCK_R] += x_tile @ down[:, k_tile]^T."""
    offs_r = tl.arange(0, BLOCK_R)
    down_t = tl.load(down_ptr + offs_r[None, :] * K + offs_k[:, None],
                     mask=(offs_r < R)[None, :] & mask_k[:, None], other=0.0)
    return tl.dot(x, down_t, acc=t, input_precision=PRECISION)


@triton.jit
def _lowrank_up(acc, t, up_ptr, offs_n, mask_n, R, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += t @ up[n_tile, :]^T."""
    offs_r = tl.arange(0, BLOCK_R)
    up_t = tl.load(up_ptr + offs_n[None, :] * R + offs_r[:, None],
                   mask=(offs_r < R)[:, None] & mask_n[None, :], other=0.0)
    return tl.dot(t, up_t, acc=acc, input_precision=PRECISION)


@triton.jit
def _block_rank1_step(acc, x, k0, n0, offs_k, mask_k, offs_n, mask_n, sigma_ptr, u_ptr, v_ptr, P, Q, S_O, S_I,
                      BLOCKS_K: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
    """acc += the block rank-1 branch restricted to one (k tile, n tile), as two small dots.

    Column c of the intermediate t stands for block (p0 + c // BLOCKS_K, q0 + c % BLOCKS_K),
    where BLOCKS_K bounds the block columns a k tile touches.  t = x_tile @ V with
    V[k, c] = v[p, q, k - q * S_I] when k lies in block column q (else 0), then
    acc += t @ E with E[c, n] = sigma[p, q] * u[p, q, n - p * S_O] when n lies in block row p.
    Both are dense dots on tensor cores; the zeros cost a little padding, no gathers in registers.
    """
    offs_c = tl.arange(0, BLOCK_T)
    p_c = n0 // S_O + offs_c // BLOCKS_K
    q_c = k0 // S_I + offs_c % BLOCKS_K
    q_k = offs_k // S_I
    v_mask = (q_k[:, None] == q_c[None, :]) & mask_k[:, None] & (p_c < P)[None, :]
    v_t = tl.load(v_ptr + (p_c[None, :] * Q + q_c[None, :]) * S_I + (offs_k - q_k * S_I)[:, None],
                  mask=v_mask, other=0.0)
    t = tl.dot(x, v_t, input_precision=PRECISION)
    p_n = offs_n // S_O
    e_mask = (p_n[None, :] == p_c[:, None]) & mask_n[None, :] & (q_c < Q)[:, None]
    block = p_n[None, :] * Q + q_c[:, None]
    e = tl.load(sigma_ptr + block, mask=e_mask, other=0.0) \
        * tl.load(u_ptr + block * S_O + (offs_n - p_n * S_O)[None, :], mask=e_mask, other=0.0)
    return tl.dot(t, e, acc=acc, input_precision=PRECISION)


# =========================================================================== kernels


@triton.jit
def lowrank_branch_kernel(x_ptr, down_ptr, up_ptr, y_ptr, M, N, K, R,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """y [M, N] = (x @ down^T) @ up^T for row-major float32 x [M, K], down [R, K], up [N, R]."""
    offs_m, mask_m, n0, offs_n, mask_n = _output_tile(M, N, BLOCK_M, BLOCK_N)
    t = tl.full((BLOCK_M, BLOCK_R), 0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, offs_k, mask_k = _x_tile(x_ptr, offs_m, mask_m, k0, K, BLOCK_K)
        t = _lowrank_down(t, x, down_ptr, offs_k, mask_k, K, R, BLOCK_R, PRECISION)
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    acc = _lowrank_up(acc, t, up_ptr, offs_n, mask_n, R, BLOCK_R, PRECISION)
    _store_output(y_ptr, acc, offs_m, mask_m, offs_n, mask_n, N)


@triton.jit
def block_rank1_branch_kernel(x_ptr, sigma_ptr, u_ptr, v_ptr, y_ptr, M, N, K, P, Q, S_O, S_I,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCKS_K: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
    """y [M, N] of the block rank-1 branch: sigma [P, Q], u [P, Q, S_O], v [P, Q, S_I]."""
    offs_m, mask_m, n0, offs_n, mask_n = _output_tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, offs_k, mask_k = _x_tile(x_ptr, offs_m, mask_m, k0, K, BLOCK_K)
        acc = _block_rank1_step(acc, x, k0, n0, offs_k, mask_k, offs_n, mask_n, sigma_ptr, u_ptr, v_ptr,
                                P, Q, S_O, S_I, BLOCKS_K, BLOCK_T, PRECISION)
    _store_output(y_ptr, acc, offs_m, mask_m, offs_n, mask_n, N)


@triton.jit
def fused_quant_linear_kernel(x_ptr, w_ptr, w_scales_ptr, bias_ptr, down_ptr, up_ptr, sigma_ptr, u_ptr, v_ptr,
                              y_ptr, M, N, K, GROUP, R, P, Q, S_O, S_I, a_scale,
                              W_BITS: tl.constexpr, A_BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                              HAS_LOWRANK: tl.constexpr, HAS_BLOCK: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCKS_K: tl.constexpr, BLOCK_T: tl.constexpr,
                              PRECISION: tl.constexpr):
    """y [M, N] = Qa(x) @ deq(W)^T (+ low-rank) (+ block rank-1) (+ bias) in one pass over K.

    Requires GROUP % BLOCK_K == 0 and K % GROUP == 0, so a k tile never straddles a scale group,
    and BLOCK_K >= 32 (the int8 dot's minimum).
    Pointers of absent parts may be any valid pointer; the HAS_* flags keep them unread.
    """
    offs_m, mask_m, n0, offs_n, mask_n = _output_tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    t = tl.full((BLOCK_M, BLOCK_R), 0, tl.float32)
    n_groups = K // GROUP
    for g in range(0, n_groups):
        # Integer products are exact in int32 within a group (|sum| <= GROUP * 127**2).
        acc_int = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
        for kk in range(0, GROUP, BLOCK_K):
            k0 = g * GROUP + kk
            x, offs_k, mask_k = _x_tile(x_ptr, offs_m, mask_m, k0, K, BLOCK_K)
            codes_w = _load_weight_codes(w_ptr, offs_k, offs_n, mask_n, K, W_BITS)
            acc_int = tl.dot(_quantize_activation(x, a_scale, A_BITS), codes_w, acc=acc_int, out_dtype=tl.int32)
            if HAS_LOWRANK:
                t = _lowrank_down(t, x, down_ptr, offs_k, mask_k, K, R, BLOCK_R, PRECISION)
            if HAS_BLOCK:
                acc = _block_rank1_step(acc, x, k0, n0, offs_k, mask_k, offs_n, mask_n, sigma_ptr, u_ptr, v_ptr,
                                        P, Q, S_O, S_I, BLOCKS_K, BLOCK_T, PRECISION)
        scale = tl.load(w_scales_ptr + offs_n * n_groups + g, mask=mask_n, other=0.0) * a_scale
        acc += acc_int.to(tl.float32) * scale[None, :]
    if HAS_LOWRANK:
        acc = _lowrank_up(acc, t, up_ptr, offs_n, mask_n, R, BLOCK_R, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    _store_output(y_ptr, acc, offs_m, mask_m, offs_n, mask_n, N)


# Op name -> kernel; the PTX compiler looks kernels up here.
KERNELS = {
    "lowrank_branch": lowrank_branch_kernel,
    "block_rank1_branch": block_rank1_branch_kernel,
    "fused_quant_linear": fused_quant_linear_kernel,
}


def interpreter_enabled() -> bool:
    """True when this module's kernels were built for the Triton CPU interpreter."""
    return not isinstance(fused_quant_linear_kernel, triton.runtime.JITFunction)


@contextlib.contextmanager
def triton_mode(interpret: bool) -> Iterator[None]:
    """Temporarily set TRITON_INTERPRET, which Triton reads when decorating and when compiling.

    Changes the process environment, so it is not meant for concurrent use from several threads.
    """
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_VARIANTS: dict[bool, ModuleType] = {}


def load_kernel_module(interpret: bool) -> ModuleType:
    """This module if its kernels match ``interpret``, else a private copy built in that mode.

    ``triton.jit`` picks the interpreter when a kernel is decorated, so a process that imported
    this module in one mode (e.g. tests on the CPU, then a PTX build) needs a second copy for the
    other.  This works whichever mode ``triton`` itself was imported in because the kernels only
    call builtins of ``triton.language`` (``tl.full``, not the ``@jit`` helper ``tl.zeros``).
    """
    if interpreter_enabled() == interpret:
        return sys.modules[__name__]
    if interpret not in _VARIANTS:
        name = f"{__name__}_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, __file__)
        module = importlib.util.module_from_spec(spec)
        module.__package__ = __package__  # the relative import of the quantizer must resolve
        sys.modules[name] = module
        with triton_mode(interpret):
            spec.loader.exec_module(module)
        _VARIANTS[interpret] = module
    return _VARIANTS[interpret]


# =========================================================================== packing


def pack_weight(codes: torch.Tensor, w_bits: int) -> torch.Tensor:
    """Integer codes [N, K] -> uint8 [N, K/2] (4 bits, ONNX INT4 nibble order) or int8 [N, K] (8 bits)."""
    _check_w_bits(w_bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if w_bits == 4:
        if k % 2:
            raise ValueError(f"4-bit packing needs an even K, got K={k}")
        return pack_int(codes, 4).reshape(n, k // 2)
    return codes.to(torch.int8).contiguous()


def unpack_weight(packed: torch.Tensor, w_bits: int, k: int) -> torch.Tensor:
    """Inverse of ``pack_weight``: int8 codes [N, K]."""
    _check_w_bits(w_bits)
    n = packed.shape[0]
    if w_bits == 8:
        return packed.view(torch.int8).reshape(n, k).clone()
    return unpack_int(packed.contiguous().reshape(-1), 4, (n, k))


# =========================================================================== references (float64)


def quantize_activation_reference(x: torch.Tensor, a_scale: float, a_bits: int) -> torch.Tensor:
    """Activation codes clamp(round(x / a_scale), -qa, qa), computed in float32 as the deployed Q/DQ does."""
    scale = torch.tensor(a_scale, dtype=torch.float32, device=x.device)
    q = qmax(a_bits)
    return torch.clamp(torch.round(x.to(torch.float32) / scale), -q, q)


def lowrank_reference(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(x @ down^T) @ up^T in float64."""
    return (x.double() @ down.double().T) @ up.double().T


def block_rank1_reference(x: torch.Tensor, sigma: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Block rank-1 branch in float64: y[.., p*s_o+o] = sum_q sigma[p,q] u[p,q,o] (x[.., q-block] . v[p,q])."""
    p, q, s_i = v.shape
    t = torch.einsum("...qi,pqi->...pq", x.double().reshape(*x.shape[:-1], q, s_i), v.double())
    y = torch.einsum("...pq,pqo->...po", t * sigma.double(), u.double())
    return y.reshape(*x.shape[:-1], p * u.shape[-1])


def fused_quant_linear_reference(x_h: torch.Tensor, packed_w: torch.Tensor, w_scales: torch.Tensor, w_bits: int,
                                 group_size: int | None, a_scale: float, a_bits: int,
                                 bias: torch.Tensor | None = None, down: torch.Tensor | None = None,
                                 up: torch.Tensor | None = None, sigma: torch.Tensor | None = None,
                                 u: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
    """The deployed layer in float64 (activation codes rounded in float32, like the kernel and ONNX)."""
    k = x_h.shape[-1]
    codes = unpack_weight(packed_w, w_bits, k).double()
    group = k if group_size is None else group_size
    w = codes * w_scales.double().repeat_interleave(group, dim=1)
    a32 = float(torch.tensor(a_scale, dtype=torch.float32))
    y = (quantize_activation_reference(x_h, a_scale, a_bits).double() * a32) @ w.T
    if down is not None:
        y = y + lowrank_reference(x_h, down, up)
    if sigma is not None:
        y = y + block_rank1_reference(x_h, sigma, u, v)
    if bias is not None:
        y = y + bias.double()
    return y


# =========================================================================== launch wrappers


def _check_w_bits(w_bits: int) -> None:
    if w_bits not in SUPPORTED_W_BITS:
        raise ValueError(f"w_bits must be one of {SUPPORTED_W_BITS}, got {w_bits!r}")


def _check_float32(name: str, t: torch.Tensor, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_device(*tensors: torch.Tensor) -> torch.device:
    """All tensors on one device that this module's kernels can run on."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cpu" and not interpreter_enabled():
        raise RuntimeError("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing "
                           "qdit4sr.plugins.kernels, or use load_kernel_module(interpret=True)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device}")
    return device


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _flatten_input(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    _check_float32(name, x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1]).contiguous()


def _check_int32_offsets(m: int, n: int, k: int) -> None:
    # The kernels index with int32 element offsets (row * width + column).
    if m * max(n, k) >= 2**31:
        raise ValueError(f"{m} rows x {max(n, k)} columns exceed the kernels' int32 indexing; split the rows")


def _block_m(m: int, device: torch.device, block_m: int | None) -> int:
    if block_m is not None:
        return check_tile("block_m", block_m)
    # On the GPU larger tiles feed the tensor cores; the interpreter only pays per program.
    return 64 if device.type == "cuda" and m > 32 else min(64, pow2_at_least(m))


def _block_n(n: int, device: torch.device, block_n: int | None) -> int:
    if block_n is not None:
        return check_tile("block_n", block_n)
    return min(128 if device.type == "cuda" else 64, pow2_at_least(n))


def _max_blocks_per_tile(extent: int, tile: int, block: int) -> int:
    """Most blocks of size ``block`` that one tile [t * tile, (t + 1) * tile) of [0, extent) touches."""
    return max((min(s + tile, extent) - 1) // block - s // block + 1 for s in range(0, extent, tile))


def block_branch_constexprs(n: int, k: int, s_o: int, s_i: int, block_n: int, block_k: int) -> dict[str, int]:
    """BLOCKS_K and BLOCK_T of the block rank-1 kernels for an [n, k] weight of s_o x s_i blocks."""
    blocks_k = _max_blocks_per_tile(k, block_k, s_i)
    blocks_n = _max_blocks_per_tile(n, block_n, s_o)
    return {"BLOCKS_K": blocks_k, "BLOCK_T": pow2_at_least(blocks_k * blocks_n)}


def _check_block_branch(sigma: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n: int | None,
                        k: int) -> tuple[int, int, int, int]:
    """(P, Q, s_o, s_i) of consistent block rank-1 factors for an [n, k] weight (n=None: any)."""
    _check_float32("sigma", sigma, 2)
    _check_float32("u", u, 3)
    _check_float32("v", v, 3)
    p, q = sigma.shape
    s_o, s_i = u.shape[2], v.shape[2]
    _check_shape("u", u, (p, q, s_o))
    _check_shape("v", v, (p, q, s_i))
    if q * s_i != k:
        raise ValueError(f"block columns Q * s_i = {q} * {s_i} must equal in_features K = {k}")
    if n is not None and p * s_o != n:
        raise ValueError(f"block rows P * s_o = {p} * {s_o} must equal out_features N = {n}")
    if min(p, q, s_o, s_i) < 1:
        raise ValueError("block rank-1 factors must be non-empty")
    return p, q, s_o, s_i


def _check_lowrank(down: torch.Tensor, up: torch.Tensor, n: int | None, k: int) -> int:
    """Rank R of consistent low-rank factors down [R, K], up [N, R] (n=None: any N)."""
    _check_float32("down", down, 2)
    _check_float32("up", up, 2)
    r = down.shape[0]
    if down.shape[1] != k:
        raise ValueError(f"down must have shape [R, {k}], got {tuple(down.shape)}")
    if up.shape[1] != r or (n is not None and up.shape[0] != n):
        raise ValueError(f"up must have shape [{'N' if n is None else n}, {r}], got {tuple(up.shape)}")
    if r < 1:
        raise ValueError("low-rank factors must have rank >= 1")
    return r


def _grid(m: int, n: int, block_m: int, block_n: int) -> tuple[int, int]:
    return triton.cdiv(n, block_n), triton.cdiv(m, block_m)


def lowrank_branch(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, *, precision: str = "tf32x3",
                   block_m: int | None = None, block_n: int | None = None, block_k: int = 64,
                   num_warps: int = 4) -> torch.Tensor:
    """(x @ down^T) @ up^T for float32 x [..., K], down [R, K], up [N, R]; returns float32 [..., N]."""
    x2 = _flatten_input(x)
    m, k = x2.shape
    r = _check_lowrank(down, up, None, k)
    n = up.shape[0]
    _check_int32_offsets(m, n, k)
    _check_precision(precision)
    check_tile("block_k", block_k)
    device = _check_device(x2, down, up)
    bm, bn = _block_m(m, device, block_m), _block_n(n, device, block_n)
    y = torch.empty(m, n, dtype=torch.float32, device=device)
    if m:
        lowrank_branch_kernel[_grid(m, n, bm, bn)](
            x2, down.contiguous(), up.contiguous(), y, m, n, k, r,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, BLOCK_R=pow2_at_least(r), PRECISION=precision,
            num_warps=num_warps, **_LAUNCH_OPTIONS)
    return y.reshape(*x.shape[:-1], n)


def block_rank1_branch(x: torch.Tensor, sigma: torch.Tensor, u: torch.Tensor, v: torch.Tensor, *,
                       precision: str = "tf32x3", block_m: int | None = None, block_n: int | None = None,
                       block_k: int = 64, num_warps: int = 4) -> torch.Tensor:
    """Block rank-1 branch for float32 x [..., K], sigma [P, Q], u [P, Q, s_o], v [P, Q, s_i] -> [..., P*s_o]."""
    x2 = _flatten_input(x)
    m, k = x2.shape
    p, q, s_o, s_i = _check_block_branch(sigma, u, v, None, k)
    n = p * s_o
    _check_int32_offsets(m, n, k)
    _check_precision(precision)
    check_tile("block_k", block_k)
    device = _check_device(x2, sigma, u, v)
    bm, bn = _block_m(m, device, block_m), _block_n(n, device, block_n)
    tiling = block_branch_constexprs(n, k, s_o, s_i, bn, block_k)
    y = torch.empty(m, n, dtype=torch.float32, device=device)
    if m:
        block_rank1_branch_kernel[_grid(m, n, bm, bn)](
            x2, sigma.contiguous(), u.contiguous(), v.contiguous(), y, m, n, k, p, q, s_o, s_i,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, **tiling, PRECISION=precision,
            num_warps=num_warps, **_LAUNCH_OPTIONS)
    return y.reshape(*x.shape[:-1], n)


def _fused_block_k(group: int) -> int:
    """Largest k tile (32 or 64, what the int8 dot allows) that divides the scale group."""
    for block_k in (64, _MIN_DOT_K_INT8):
        if group % block_k == 0:
            return block_k
    raise ValueError(f"group_size must be a multiple of {_MIN_DOT_K_INT8}, got {group}")


def _check_packed_weight(packed_w: torch.Tensor, w_scales: torch.Tensor, w_bits: int, group: int,
                         k: int) -> int:
    """N of a packed weight and its scales, after checking layout, dtype and group size."""
    _check_w_bits(w_bits)
    if not isinstance(packed_w, torch.Tensor) or packed_w.dim() != 2:
        raise ValueError(f"packed_w must be a 2-D tensor, got {getattr(packed_w, 'shape', type(packed_w))}")
    n = packed_w.shape[0]
    if w_bits == 4:
        if packed_w.dtype != torch.uint8:
            raise ValueError(f"4-bit weights must be packed as uint8, got {packed_w.dtype}")
        if k % 2 or packed_w.shape[1] != k // 2:
            raise ValueError(f"4-bit packed_w must have shape [N, K/2] = [{n}, {k / 2:g}], got {tuple(packed_w.shape)}")
    else:
        if packed_w.dtype != torch.int8:
            raise ValueError(f"8-bit weights must be int8, got {packed_w.dtype}")
        _check_shape("packed_w", packed_w, (n, k))
    if group < 1 or k % group:
        raise ValueError(f"group_size={group} must divide in_features K={k}")
    _check_float32("w_scales", w_scales, 2)
    _check_shape("w_scales", w_scales, (n, k // group))
    return n


def fused_quant_linear(x_h: torch.Tensor, packed_w: torch.Tensor, w_scales: torch.Tensor, w_bits: int,
                       group_size: int | None, a_scale: float, a_bits: int, bias: torch.Tensor | None = None,
                       down: torch.Tensor | None = None, up: torch.Tensor | None = None,
                       sigma: torch.Tensor | None = None, u: torch.Tensor | None = None,
                       v: torch.Tensor | None = None, *, precision: str = "tf32x3", block_m: int | None = None,
                       block_n: int | None = None, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """Deployed quantized linear on a Hadamard-rotated float32 input x_h [..., K]; returns float32 [..., N].

    ``group_size`` None means one scale per output channel (same as K).  Low-rank (down, up) and
    block rank-1 (sigma, u, v) factors come as complete sets or not at all.
    """
    x2 = _flatten_input(x_h, "x_h")
    m, k = x2.shape
    group = k if group_size is None else int(group_size)
    n = _check_packed_weight(packed_w, w_scales, w_bits, group, k)
    _check_int32_offsets(m, n, k)
    block_k = _fused_block_k(group)
    if not is_int(a_bits) or not 2 <= a_bits <= 8:
        raise ValueError(f"a_bits must be an integer in [2, 8], got {a_bits!r}")
    a_scale = float(a_scale)
    if not (math.isfinite(a_scale) and a_scale > 0):
        raise ValueError(f"a_scale must be a positive finite number, got {a_scale!r}")
    _check_precision(precision)
    tensors = [x2, packed_w, w_scales]
    has_lowrank = _has_all("down/up", down, up)
    has_block = _has_all("sigma/u/v", sigma, u, v)
    r, (p, q, s_o, s_i) = 1, (1, 1, 1, 1)
    if has_lowrank:
        r = _check_lowrank(down, up, n, k)
        tensors += [down, up]
    if has_block:
        p, q, s_o, s_i = _check_block_branch(sigma, u, v, n, k)
        tensors += [sigma, u, v]
    if bias is not None:
        _check_float32("bias", bias, 1)
        _check_shape("bias", bias, (n,))
        tensors.append(bias)
    device = _check_device(*tensors)
    bm, bn = _block_m(m, device, block_m), _block_n(n, device, block_n)
    tiling = block_branch_constexprs(n, k, s_o, s_i, bn, block_k) if has_block else {"BLOCKS_K": 1, "BLOCK_T": MIN_DOT}
    y = torch.empty(m, n, dtype=torch.float32, device=device)
    if m:
        # Absent operands are replaced by y: a valid pointer the constexpr flags never read.
        def arg(t: torch.Tensor | None) -> torch.Tensor:
            return y if t is None else t.contiguous()

        fused_quant_linear_kernel[_grid(m, n, bm, bn)](
            x2, packed_w.contiguous(), w_scales.contiguous(), arg(bias), arg(down), arg(up), arg(sigma), arg(u),
            arg(v), y, m, n, k, group, r, p, q, s_o, s_i, a_scale,
            W_BITS=w_bits, A_BITS=a_bits, HAS_BIAS=bias is not None, HAS_LOWRANK=has_lowrank,
            HAS_BLOCK=has_block, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, BLOCK_R=pow2_at_least(r),
            **tiling, PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
            **_LAUNCH_OPTIONS)
    return y.reshape(*x_h.shape[:-1], n)


def _has_all(names: str, *tensors: torch.Tensor | None) -> bool:
    """Whether a branch is present; a partial set of factors is an error."""
    present = [t is not None for t in tensors]
    if any(present) and not all(present):
        raise ValueError(f"{names} must be given together or not at all")
    return all(present)
