"""Latent codecs: the SD3.5 VAE for real checkpoints, a fixed invertible pixel-unshuffle for the tiny model."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


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

    def save(self, folder: Path) -> None:
        (Path(folder) / "codec.json").write_text(json.dumps(asdict(self), indent=2))


class VAECodec:
    """diffusers AutoencoderKL (the SD3.5 VAE) loaded from a local folder; uses its shift/scaling factors."""

    kind = "vae"

    def __init__(self, vae):
        self.vae = vae.eval()
        cfg = vae.config
        self.scaling = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", 0.0) or 0.0)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)

    @classmethod
    def from_folder(cls, path: str | Path, subfolder: str | None = "vae") -> "VAECodec":
        from diffusers import AutoencoderKL

        folder = Path(path) / subfolder if subfolder else Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no VAE config.json in {folder}")
        return cls(AutoencoderKL.from_pretrained(folder))

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        latent = self.vae.encode(image * 2.0 - 1.0).latent_dist.mode()
        return (latent - self.shift) * self.scaling

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(latent / self.scaling + self.shift).sample
        return ((image + 1.0) / 2.0).clamp(0, 1)


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
