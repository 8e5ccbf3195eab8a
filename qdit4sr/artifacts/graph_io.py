"""The inputs and output every exported segment graph (and engine) has: names, axes and dtypes.

Each graph is the whole transformer forward for one tile: hidden_states [B, C, h, h], controlnet_image
[B, C, h, h], encoder_hidden_states [B, S, joint_dim], pooled_projections [B, pooled_dim], timestep [B];
output velocity [B, C_out, h, h]. Only the batch axis B is dynamic.

A VAE codec is exported as two more graphs, every axis dynamic but the channels: the encoder takes
image [B, 3, H, W] (RGB in [0, 1]) to latent [B, C, H/d, W/d] (the posterior mean, shifted and scaled
as the sampler uses it), the decoder takes that latent back to an image in [0, 1].
"""
from __future__ import annotations

INPUT_NAMES = ("hidden_states", "controlnet_image", "encoder_hidden_states", "pooled_projections", "timestep")
OUTPUT_NAME = "velocity"
BATCH_AXIS = "batch"
VAE_IMAGE, VAE_LATENT = "image", "latent"     # the VAE graphs' tensors (encoder: image -> latent)


def io_spec(config, tile_latent: int, text_tokens: int) -> tuple[list[dict], list[dict]]:
    """Names, shapes (batch axis symbolic) and dtypes of the graph inputs and output."""
    c, h = config.in_channels, tile_latent
    shapes = {"hidden_states": [BATCH_AXIS, c, h, h], "controlnet_image": [BATCH_AXIS, c, h, h],
              "encoder_hidden_states": [BATCH_AXIS, text_tokens, config.joint_attention_dim],
              "pooled_projections": [BATCH_AXIS, config.pooled_projection_dim], "timestep": [BATCH_AXIS]}
    inputs = [{"name": n, "shape": shapes[n], "dtype": "float32"} for n in INPUT_NAMES]
    outputs = [{"name": OUTPUT_NAME, "shape": [BATCH_AXIS, config.out_channels, h, h], "dtype": "float32"}]
    return inputs, outputs
