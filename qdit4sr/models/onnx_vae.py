"""The VAE codec of an exported folder: its encoder and decoder ONNX graphs, run by onnxruntime.

    codec = OnnxVAECodec("vae_encoder.onnx", "vae_decoder.onnx", downsample=8, latent_channels=16,
                         scaling=1.5305, shift=0.0609)
    latent = codec.encode(image)     # as VAECodec.encode: image [B, 3, H, W] in [0, 1] -> latent

The graphs already hold the [0, 1] <-> [-1, 1] mapping, the shift and the scaling (graph_io.py), so
this class only tiles: images larger than `tile_px` go through the same overlapping, Gaussian-blended
tiles as the torch `VAECodec` (`tiled_encode` / `tiled_decode`), so both compute the same image.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..artifacts.graph_io import VAE_IMAGE, VAE_LATENT
from .latents import tiled_decode, tiled_encode


class OnnxVAECodec:
    kind = "vae"

    def __init__(self, encoder: str | Path, decoder: str | Path, *, downsample: int, latent_channels: int,
                 scaling: float, shift: float, tile_px: int = 512, overlap_px: int = 64,
                 providers: list[str] | None = None, intra_op_num_threads: int | None = None):
        import onnxruntime as ort

        if tile_px % downsample or overlap_px % downsample or not 0 <= overlap_px < tile_px:
            raise ValueError(f"VAE tiles need 0 <= overlap < tile, both multiples of {downsample}; "
                             f"got tile {tile_px}, overlap {overlap_px}")
        options = ort.SessionOptions()
        if intra_op_num_threads:
            options.intra_op_num_threads = int(intra_op_num_threads)
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.encoder = ort.InferenceSession(str(encoder), options, providers=providers)
        self.decoder = ort.InferenceSession(str(decoder), options, providers=providers)
        self.downsample, self.latent_channels = int(downsample), int(latent_channels)
        self.scaling, self.shift = float(scaling), float(shift)
        self.tile_px, self.overlap_px = int(tile_px), int(overlap_px)

    def to(self, device=None, dtype=None) -> "OnnxVAECodec":
        return self   # onnxruntime places the graphs itself; inputs and outputs are float32 on the CPU

    @staticmethod
    def _run(session, name: str, x: torch.Tensor) -> torch.Tensor:
        feed = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {name: feed})[0]).to(x.device)

    def encode_tile(self, image: torch.Tensor) -> torch.Tensor:
        return self._run(self.encoder, VAE_IMAGE, image)

    def decode_tile(self, latent: torch.Tensor) -> torch.Tensor:
        return self._run(self.decoder, VAE_LATENT, latent)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, H, W] in [0, 1] (H, W multiples of `downsample`) -> latent [B, C, H/d, W/d]."""
        return tiled_encode(self.encode_tile, image, self.downsample, self.tile_px, self.overlap_px)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return tiled_decode(self.decode_tile, latent, self.downsample, self.tile_px, self.overlap_px)
