"""Model configurations: the published DiT4SR transformer and the tiny embedded default."""
from __future__ import annotations

VARIANTS = ("dit4sr_q", "dit4sr_r1")

# diffusers config of the published DiT4SR transformer (SD3.5-medium MM-DiT plus the LR stream).
DIT4SR_CONFIG: dict = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
    "variant": "dit4sr_q",
    "control_conv_scale": 1.2,
}

# A few million parameters: same class, same block structure (dual attention in the first half,
# RMS qk-norm, LR stream, cross-stream conv), sized to train on two CPU cores.
TINY_CONFIG: dict = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 12,
    "out_channels": 12,
    "num_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "caption_projection_dim": 128,
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 32,
    "dual_attention_layers": [0, 1],
    "qk_norm": "rms_norm",
    "variant": "dit4sr_r1",
    "control_conv_scale": 1.2,
}
