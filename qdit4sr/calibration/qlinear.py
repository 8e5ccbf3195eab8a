"""Fake-quant linear layer that computes exactly what the deployed graph computes.

    x_H = x H                                   (Hadamard on activations, reshape + two small matmuls)
    y   = Q_a(x_H) @ deq(W_res)^T               (residue: integer weights, b-bit static activation Q/DQ)
        + (x_H @ down^T) @ up^T                 (global low-rank branch, full precision)
        + block_rank1(x_H; sigma, u, v)         (local block rank-1 branch, full precision)
        + bias

The activation bits and scale come from the timestep segment of the current sampler step.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.step_context import current_step
from .hadamard import apply_hadamard
from .hsvd import block_rank1_apply
from .quantizer import QuantizedWeight, fake_quantize_activation

_segment_override: contextvars.ContextVar[int | None] = contextvars.ContextVar("qdit4sr_segment", default=None)

NO_ACT_QUANT = 16  # activation "bits" meaning: keep activations in full precision


@contextlib.contextmanager
def segment_scope(segment: int) -> Iterator[None]:
    """Force every QuantLinear to use one segment's activation settings (used by export per segment)."""
    token = _segment_override.set(int(segment))
    try:
        yield
    finally:
        _segment_override.reset(token)


def active_segment(segment_of_step: list[int], num_segments: int, who: str) -> int:
    """The timestep segment whose activation settings apply now: forced by segment_scope, else the sampler's."""
    forced = _segment_override.get()
    if forced is not None:
        return forced
    step = current_step()
    if step is None:
        if num_segments == 1:
            return 0
        raise RuntimeError(f"{who} with several timestep segments was called outside the sampler; "
                           "use qdit4sr.calibration.qlinear.segment_scope(k)")
    if step >= len(segment_of_step):
        raise RuntimeError(f"sampler step {step} is beyond the {len(segment_of_step)} steps of the bit plan")
    return segment_of_step[step]


class QuantLinear(nn.Module):
    def __init__(self, residual: QuantizedWeight, bias: torch.Tensor | None, *, hadamard: bool,
                 act_bits: list[int], act_scales: list[float], segment_of_step: list[int],
                 up: torch.Tensor | None = None, down: torch.Tensor | None = None,
                 block_sigma: torch.Tensor | None = None, block_u: torch.Tensor | None = None,
                 block_v: torch.Tensor | None = None):
        super().__init__()
        if len(act_bits) != len(act_scales):
            raise ValueError("act_bits and act_scales need one entry per segment")
        self.out_features, self.in_features = residual.qweight.shape
        self.weight_bits = residual.bits
        self.group_size = residual.group_size
        self.hadamard = hadamard
        self.register_buffer("qweight", residual.qweight.to(torch.int8))
        self.register_buffer("weight_scales", residual.scales.clone())  # float32 or float16, as stored
        # Dequantized on first use and kept: fake-quant forward passes reuse it, while quantizing a
        # whole model (which never calls forward) holds only the integer codes.
        self.register_buffer("_dequantized", None, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        # Contiguous copies: the same numbers in another memory layout take other BLAS paths and
        # would make a reloaded model differ in the last bit.
        for name, t in (("up", up), ("down", down), ("block_sigma", block_sigma), ("block_u", block_u),
                        ("block_v", block_v)):
            self.register_buffer(name, None if t is None else t.float().contiguous())
        self.act_bits = [int(b) for b in act_bits]
        self.act_scales = [float(s) for s in act_scales]
        self.segment_of_step = [int(s) for s in segment_of_step]

    @property
    def residual_weight(self) -> torch.Tensor:
        """The dequantized residue [out, in] in float32, as the graph's weight DequantizeLinear computes it."""
        if self._dequantized is None:
            residual = QuantizedWeight(self.qweight, self.weight_scales, self.weight_bits, self.group_size)
            self._dequantized = residual.dequantize()
        return self._dequantized

    def dequantized_residual(self) -> torch.Tensor:
        """`residual_weight` without caching it: the cached tensor when the forward made one, else a fresh
        one. For one-off reads of every layer (the cpu flavour's export): caching there would keep the whole
        model's residues in float32, twice the bf16 model, until the layers are dropped."""
        if self._dequantized is not None:
            return self._dequantized
        return QuantizedWeight(self.qweight, self.weight_scales, self.weight_bits, self.group_size).dequantize()

    @property
    def block_shape(self) -> tuple[int, int] | None:
        if self.block_u is None:
            return None
        return self.block_u.shape[-1], self.block_v.shape[-1]

    def active_segment(self) -> int:
        return active_segment(self.segment_of_step, len(self.act_bits), type(self).__name__)

    def branch(self, x_h: torch.Tensor) -> torch.Tensor | None:
        """Full-precision side branches on the rotated input (None when the layer has none)."""
        y = None
        if self.up is not None:
            y = (x_h @ self.down.T) @ self.up.T
        if self.block_u is not None:
            local = block_rank1_apply(x_h, self.block_sigma, self.block_u, self.block_v)
            y = local if y is None else y + local
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_h = apply_hadamard(x) if self.hadamard else x
        segment = self.active_segment()
        bits = self.act_bits[segment]
        x_q = x_h if bits >= NO_ACT_QUANT else fake_quantize_activation(x_h, bits, self.act_scales[segment])
        y = F.linear(x_q, self.residual_weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        branch = self.branch(x_h)
        return y if branch is None else y + branch.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w{self.weight_bits}/g{self.group_size}, "
                f"a{self.act_bits}, hadamard={self.hadamard}, rank={0 if self.up is None else self.up.shape[1]}, "
                f"blocks={self.block_shape}")
