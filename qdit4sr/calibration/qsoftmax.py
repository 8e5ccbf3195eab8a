"""8-bit softmax input: the attention logits pass a static Q/DQ before the softmax, as in the deployed graph.

    p = softmax(Q_8(q k^T / sqrt(d)))      Q_8 = clamp(round(x / s_k), -127, 127) * s_k

The method keeps the softmax at 8 bits whatever the linear layers' activation width, for numerical
stability. The scale s_k is static per attention site and timestep segment: the largest absolute
logit seen by calibration in that segment over 127 (min-max, not a Gaussian clip: the largest logits
carry the attention weight, so clipping them would move the softmax's mass).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.transformer import AttentionCore
from .qlinear import active_segment
from .quantizer import fake_quantize_activation, qmax

SOFTMAX_BITS = 8


class QuantSoftmax(nn.Module):
    """softmax(fake_quant(logits)) over the last axis with the active segment's static scale."""

    def __init__(self, scales: list[float], segment_of_step: list[int], bits: int = SOFTMAX_BITS):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"softmax input bits must lie in 2..8, got {bits}")
        if not scales or any(not s > 0 for s in scales):
            raise ValueError(f"softmax input scales must be positive, one per segment; got {scales}")
        self.bits = int(bits)
        self.scales = [float(s) for s in scales]
        self.segment_of_step = [int(s) for s in segment_of_step]

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        segment = active_segment(self.segment_of_step, len(self.scales), type(self).__name__)
        return fake_quantize_activation(logits, self.bits, self.scales[segment]).softmax(-1)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scales={self.scales}"


class LogitRecorder(nn.Module):
    """Plain softmax that hands each call's logits to `record` (calibration of the softmax input range)."""

    def __init__(self, record):
        super().__init__()
        self.record = record

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        self.record(logits)
        return logits.softmax(-1)


def attention_cores(model: nn.Module) -> dict[str, AttentionCore]:
    """Every attention core of the transformer blocks, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AttentionCore)}


def softmax_scale(amax: float, bits: int = SOFTMAX_BITS) -> float:
    """Min-max scale for the softmax input; a zero range maps to the smallest normal float32."""
    return float(max(amax / qmax(bits), torch.finfo(torch.float32).tiny))


def quantized_softmaxes(model: nn.Module) -> dict[str, QuantSoftmax]:
    """The QuantSoftmax modules of a quantized model by attention-core name (the site name)."""
    return {name: core.softmax for name, core in attention_cores(model).items()
            if isinstance(core.softmax, QuantSoftmax)}
