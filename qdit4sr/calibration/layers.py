"""Which linear layers of a DiT4SR transformer are quantized."""
from __future__ import annotations

import torch
import torch.nn as nn


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the MM-DiT blocks (attention, control, feed-forward, AdaLN modulation).

    Embeddings, the final projection and the depthwise conv stay in full precision, as in the method.
    Layers that the forward never calls (attn2's text projections) are left out by `used_linears`.
    """
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise ValueError("model has no transformer_blocks; is it a DiT4SR transformer?")
    return {f"transformer_blocks.{name}": m for name, m in blocks.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def used_linears(model: nn.Module, example_inputs: tuple) -> dict[str, nn.Linear]:
    """The quantizable linears that one forward on example_inputs actually calls, in call order."""
    candidates = quantizable_linears(model)
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name))
               for name, m in candidates.items()]
    try:
        model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    seen = dict.fromkeys(order)
    return {name: candidates[name] for name in seen}


def example_inputs(model: nn.Module, latent_size: int | None = None, batch: int = 1, text_tokens: int = 4) -> tuple:
    """Small deterministic inputs with the model's channel counts (for tracing which layers run)."""
    cfg = model.config
    size = latent_size or 2 * cfg.patch_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=gen)
    return (x, x.clone(), torch.zeros(batch, text_tokens, cfg.joint_attention_dim),
            torch.zeros(batch, cfg.pooled_projection_dim), torch.full((batch,), 500.0))
