"""The VAE codec as two full-precision ONNX graphs beside the segment graphs, so the folder needs no model.

    spec = export_vae(codec, out_dir)    # writes vae_encoder.onnx, vae_decoder.onnx; returns the manifest's codec

Each graph computes what `VAECodec.encode_tile` / `decode_tile` compute, in float32 (a bf16 VAE is
exported from a float32 copy): the [0, 1] <-> [-1, 1] mapping, the posterior mean, the shift and
the scaling are inside the graph. Batch, height and width are dynamic (graph_io.py); the runtime tiles
large images itself, as the torch codec does.
"""
from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Any

import torch

from ..artifacts.graph_io import BATCH_AXIS, VAE_IMAGE, VAE_LATENT
from ..artifacts.manifest import VAE_DECODER_FILE, VAE_ENCODER_FILE, FileRef
from ..fileio import atomic_write
from ..models.latents import VAECodec
from .graph_checks import check_onnx

VAE_OPSET = 17   # GroupNorm and the attention of the SD3.5 VAE need nothing newer


class _Encoder(torch.nn.Module):
    def __init__(self, codec: VAECodec, vae: torch.nn.Module):
        super().__init__()
        self.vae, self.scaling, self.shift = vae, codec.scaling, codec.shift

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        mean = self.vae.encode(image * 2.0 - 1.0).latent_dist.mean   # = .mode(), what VAECodec uses
        return (mean - self.shift) * self.scaling


class _Decoder(torch.nn.Module):
    def __init__(self, codec: VAECodec, vae: torch.nn.Module):
        super().__init__()
        self.vae, self.scaling, self.shift = vae, codec.scaling, codec.shift

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(latent / self.scaling + self.shift).sample
        return ((image + 1.0) / 2.0).clamp(0, 1)


def _export(module: torch.nn.Module, example: torch.Tensor, inp: str, out: str, target: Path) -> None:
    axes = {0: BATCH_AXIS, 2: "height", 3: "width"}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")   # the VAE's strided slices
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=VAE_OPSET, input_names=[inp],
                          output_names=[out], dynamic_axes={inp: axes, out: axes}, do_constant_folding=True)
    data = buffer.getvalue()
    del buffer
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
    check_onnx(target)


def export_vae(codec: VAECodec, out_dir: str | Path) -> dict[str, Any]:
    """Write the encoder and decoder graphs of `codec` into out_dir; the manifest's codec entry for them."""
    out_dir = Path(out_dir)
    param = next(codec.vae.parameters())
    vae = codec.vae
    if param.dtype != torch.float32 or param.device.type != "cpu":
        vae = copy.deepcopy(vae).to("cpu", torch.float32)   # the graphs are float32; the model keeps its dtype
    was_training = vae.training
    vae.eval()
    d = codec.downsample
    try:
        # Traced on a 2-latent-pixel square: the shape arithmetic is recorded symbolically (dynamic axes).
        _export(_Encoder(codec, vae), torch.rand(1, 3, 2 * d, 2 * d), VAE_IMAGE, VAE_LATENT,
                out_dir / VAE_ENCODER_FILE)
        _export(_Decoder(codec, vae), torch.randn(1, codec.latent_channels, 2, 2), VAE_LATENT, VAE_IMAGE,
                out_dir / VAE_DECODER_FILE)
    finally:
        vae.train(was_training)
    return {"kind": "vae", "encoder": _ref(out_dir, VAE_ENCODER_FILE), "decoder": _ref(out_dir, VAE_DECODER_FILE),
            "scaling": codec.scaling, "shift": codec.shift, "downsample": d, "latent_channels": codec.latent_channels,
            "tile_px": codec.tile_px, "overlap_px": codec.overlap_px}


def _ref(folder: Path, name: str) -> dict[str, Any]:
    ref = FileRef.of(folder, name)
    return {"path": ref.path, "sha256": ref.sha256, "size": ref.size}
