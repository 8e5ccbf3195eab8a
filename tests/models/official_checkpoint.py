"""The published DiT4SR state-dict layout, derived independently of qdit4sr's model class, and checkpoint
folders written in it (random values) for loading and export tests.

The published code builds its transformer as diffusers' SD3Transformer2DModel whose blocks add, per
attention module (attn, and attn2 in dual-attention blocks), `to_{q,k,v}_control` and `to_out_control`
linears, and a depthwise 3x3 `ff.control_conv`. Its attn2 is built with the same class as attn
(added_kv_proj_dim = dim, context_pre_only of the block), so attn2 carries text projections
(`add_{q,k,v}_proj`, `norm_added_{q,k}`) and, unless the block is the last one, `to_add_out`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import save_file

from qdit4sr.models.config import DIT4SR_CONFIG

# The keys of the published config.json (no qdit4sr-only fields: variant and conv scale take their defaults).
SD3_KEYS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
            "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
            "pos_embed_max_size", "dual_attention_layers", "qk_norm")


def official_config(num_layers: int = 24, **overrides) -> dict:
    config = {k: DIT4SR_CONFIG[k] for k in SD3_KEYS}
    config.update(num_layers=num_layers, **overrides)
    return config


def official_layout(config: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a published-style checkpoint for `config` (built on the meta device)."""
    with torch.device("meta"):
        base = SD3Transformer2DModel(**config)
    layout = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    head_dim = config["attention_head_dim"]
    inner_ff = 4 * dim
    last = config["num_layers"] - 1
    for i in range(config["num_layers"]):
        prefix = f"transformer_blocks.{i}."
        attns = ["attn"] + (["attn2"] if i in config["dual_attention_layers"] else [])
        for attn in attns:
            for proj in ("to_q_control", "to_k_control", "to_v_control", "to_out_control"):
                layout[f"{prefix}{attn}.{proj}.weight"] = (dim, dim)
                layout[f"{prefix}{attn}.{proj}.bias"] = (dim,)
        if "attn2" in attns:
            for proj in ("add_q_proj", "add_k_proj", "add_v_proj") + (("to_add_out",) if i != last else ()):
                layout[f"{prefix}attn2.{proj}.weight"] = (dim, dim)
                layout[f"{prefix}attn2.{proj}.bias"] = (dim,)
            if config["qk_norm"] == "rms_norm":
                layout[f"{prefix}attn2.norm_added_q.weight"] = (head_dim,)
                layout[f"{prefix}attn2.norm_added_k.weight"] = (head_dim,)
        layout[f"{prefix}ff.control_conv.weight"] = (inner_ff, 1, 3, 3)
        layout[f"{prefix}ff.control_conv.bias"] = (inner_ff,)
    return layout


def write_official_checkpoint(folder: Path, config: dict, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                              std: float = 0.02) -> Path:
    """`folder/transformer/` with the published names and shapes for `config`, random `dtype` values."""
    target = Path(folder) / "transformer"
    target.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(official_layout(config).items()):
        if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
            state[name] = torch.ones(shape, dtype=dtype)     # RMS-norm gains
        else:
            state[name] = torch.randn(shape, generator=gen, dtype=dtype).mul_(std)
    save_file(state, str(target / "diffusion_pytorch_model.safetensors"))
    (target / "config.json").write_text(json.dumps(
        {"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.30.0", **config}, indent=2))
    return target
