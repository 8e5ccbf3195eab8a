"""Latent codecs: the SD3.5 VAE for real checkpoints, a fixed invertible pixel-unshuffle for the tiny model."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .tiling import gaussian_weights, tile_windows


@dataclass(frozen=True)
class PixelUnshuffleCodec:
    """latent = scaling * pixel_unshuffle(2x - 1): exact inverse, no weights, 3*factor^2 channels."""

    factor: int = 2
    scaling: float = 2.0
    kind: str = "pixel_unshuffle"

    @property
    def latent_channels(self) -> int:
        return 3 * self.factor ** 2

    @property
    def downsample(self) -> int:
        return self.factor

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(image * 2.0 - 1.0, self.factor) * self.scaling

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return ((F.pixel_shuffle(latent / self.scaling, self.factor) + 1.0) / 2.0).clamp(0, 1)

    def to(self, device=None, dtype=None) -> "PixelUnshuffleCodec":
        return self  # no weights: it computes on its input's device

    def save(self, folder: Path) -> None:
        (Path(folder) / "codec.json").write_text(json.dumps(asdict(self), indent=2))


class VAECodec:
    """diffusers AutoencoderKL (the SD3.5 VAE) loaded from a local folder; uses its shift/scaling factors.

    Images larger than `tile_px` are encoded and decoded in overlapping tiles (`tile_px` wide, sharing
    `overlap_px`), blended with Gaussian weights, so memory stays bounded whatever the image size.
    The VAE computes in its own dtype on its device (`to`); images and latents are float32.
    """

    kind = "vae"

    def __init__(self, vae, tile_px: int = 512, overlap_px: int = 64):
        self.vae = vae.eval()
        cfg = vae.config
        self.scaling = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", 0.0) or 0.0)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)
        if tile_px % self.downsample or overlap_px % self.downsample or not 0 <= overlap_px < tile_px:
            raise ValueError(f"VAE tiles need 0 <= overlap < tile, both multiples of {self.downsample}; "
                             f"got tile {tile_px}, overlap {overlap_px}")
        self.tile_px, self.overlap_px = tile_px, overlap_px

    @classmethod
    def from_folder(cls, path: str | Path, subfolder: str | None = "vae", **tiling) -> "VAECodec":
        from diffusers import AutoencoderKL

        folder = Path(path) / subfolder if subfolder else Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no VAE config.json in {folder}")
        return cls(AutoencoderKL.from_pretrained(folder), **tiling)

    def to(self, device=None, dtype=None) -> "VAECodec":
        self.vae.to(device=device, dtype=dtype)
        return self

    def _param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    def encode_tile(self, image: torch.Tensor) -> torch.Tensor:
        p = self._param()
        latent = self.vae.encode((image * 2.0 - 1.0).to(p.device, p.dtype)).latent_dist.mode()
        return (latent.float() - self.shift) * self.scaling

    def decode_tile(self, latent: torch.Tensor) -> torch.Tensor:
        p = self._param()
        image = self.vae.decode((latent / self.scaling + self.shift).to(p.device, p.dtype)).sample
        return ((image.float() + 1.0) / 2.0).clamp(0, 1)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, H, W] in [0, 1] (H, W multiples of `downsample`) -> latent [B, C, H/d, W/d]."""
        return tiled_encode(self.encode_tile, image, self.downsample, self.tile_px, self.overlap_px)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return tiled_decode(self.decode_tile, latent, self.downsample, self.tile_px, self.overlap_px)


def _tiled_on_latent_grid(fn, x: torch.Tensor, lat_h: int, lat_w: int, tile: int, overlap: int,
                         scale_in: int, scale_out: int) -> torch.Tensor:
    """fn over overlapping windows of the latent grid (tile/overlap in latent pixels), Gaussian-blended.

    A window [r, c] reads x[..., r * scale_in, c * scale_in] and writes the output at r * scale_out,
    so every tile starts on a whole latent pixel in both spaces.
    """
    out = norm = None
    for rows, cols in tile_windows(lat_h, lat_w, tile, overlap):
        y = fn(x[..., rows.start * scale_in:rows.stop * scale_in, cols.start * scale_in:cols.stop * scale_in])
        if out is None:
            out = torch.zeros((*y.shape[:-2], lat_h * scale_out, lat_w * scale_out), dtype=y.dtype, device=y.device)
            norm = torch.zeros(lat_h * scale_out, lat_w * scale_out, dtype=y.dtype, device=y.device)
        r = slice(rows.start * scale_out, rows.stop * scale_out)
        c = slice(cols.start * scale_out, cols.stop * scale_out)
        weight = gaussian_weights(y.shape[-2], y.shape[-1]).to(device=y.device, dtype=y.dtype)
        out[..., r, c] += y * weight
        norm[r, c] += weight
    return out / norm


def tiled_encode(encode_tile, image: torch.Tensor, downsample: int, tile_px: int, overlap_px: int) -> torch.Tensor:
    """encode_tile over overlapping image tiles of tile_px (whole when the image fits one tile)."""
    h, w = image.shape[-2:]
    if h % downsample or w % downsample:
        raise ValueError(f"image {w}x{h} is not a multiple of the VAE's downsampling {downsample}")
    if h <= tile_px and w <= tile_px:
        return encode_tile(image)
    d = downsample
    return _tiled_on_latent_grid(encode_tile, image, h // d, w // d, tile_px // d, overlap_px // d, d, 1)


def tiled_decode(decode_tile, latent: torch.Tensor, downsample: int, tile_px: int, overlap_px: int) -> torch.Tensor:
    """decode_tile over overlapping latent tiles of tile_px / downsample, blended in pixel space."""
    h, w = latent.shape[-2:]
    d = downsample
    if h * d <= tile_px and w * d <= tile_px:
        return decode_tile(latent)
    return _tiled_on_latent_grid(decode_tile, latent, h, w, tile_px // d, overlap_px // d, 1, d)


def load_codec(folder: Path):
    """The codec stored beside a model folder: codec.json (pixel-unshuffle) or a vae/ subfolder."""
    folder = Path(folder)
    if (folder / "codec.json").is_file():
        spec = json.loads((folder / "codec.json").read_text())
        if spec.get("kind") != "pixel_unshuffle":
            raise ValueError(f"unknown codec kind {spec.get('kind')!r} in {folder / 'codec.json'}")
        return PixelUnshuffleCodec(factor=int(spec["factor"]), scaling=float(spec["scaling"]))
    if (folder / "vae" / "config.json").is_file():
        return VAECodec.from_folder(folder, "vae")
    raise FileNotFoundError(f"{folder} has neither codec.json nor a vae/ folder")
