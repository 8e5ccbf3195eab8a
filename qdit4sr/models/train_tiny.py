"""Train the embedded tiny DiT4SR on bundled photos (seeded, CPU, about half an hour on 2 cores).

    python -m qdit4sr.cli.train_tiny --out qdit4sr/models/default

Flow matching as in SD3: x_t = (1 - s) x0 + s eps, the model predicts v = eps - x0, conditioned on
the latent of the bicubic-upsampled LR image. Held-out photos (images.HELD_OUT_PHOTOS) are never seen.
"""
from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..fileio import atomic_write_text
from .config import TINY_CONFIG
from .images import TRAIN_PHOTOS, degrade_x4, load_photo, resize_bicubic, to_tensor
from .latents import PixelUnshuffleCodec
from .loading import save_transformer
from .pipeline import PipelineConfig
from .transformer import DiT4SRTransformer2DModel


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 8000
    batch_size: int = 8
    hr_crop: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.998
    seed: int = 0
    text_tokens: int = 4
    threads: int = 1  # results depend on the thread count; one thread keeps runs bit-reproducible


# Sampling defaults shipped with the tiny model: tiles match the training crop size.
TINY_PIPELINE = PipelineConfig(num_inference_steps=4, shift=3.0, guidance_scale=1.0, tile_size=16, tile_overlap=6,
                               tile_batch=64, min_lr_side=8, color_fix="adain")


class PhotoCrops:
    """Random HR crops (with flips, 90-degree turns and mild down-scaling) from the training photos."""

    def __init__(self, names, crop: int, rng: np.random.Generator):
        self.images = [to_tensor(load_photo(n)) for n in names]
        self.crop = crop
        self.rng = rng

    def sample(self, batch: int) -> torch.Tensor:
        crops = []
        for _ in range(batch):
            img = self.images[self.rng.integers(len(self.images))]
            scale = float(self.rng.choice([1.0, 1.0, 0.75, 0.5]))
            h, w = img.shape[-2:]
            size = max(self.crop, int(round(self.crop / scale)))
            top = int(self.rng.integers(0, h - size + 1))
            left = int(self.rng.integers(0, w - size + 1))
            patch = img[..., top:top + size, left:left + size]
            if size != self.crop:
                patch = resize_bicubic(patch, self.crop, self.crop)
            if self.rng.random() < 0.5:
                patch = patch.flip(-1)
            patch = torch.rot90(patch, int(self.rng.integers(4)), dims=(-2, -1))
            crops.append(patch)
        return torch.cat(crops)


def lr_condition(hr: torch.Tensor) -> torch.Tensor:
    """The conditioning image: HR degraded x4, then bicubic-upsampled back to HR size."""
    return resize_bicubic(degrade_x4(hr), hr.shape[-2], hr.shape[-1])


def train(config: TrainConfig, out: Path) -> DiT4SRTransformer2DModel:
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    data = PhotoCrops(TRAIN_PHOTOS, config.hr_crop, rng)
    codec = PixelUnshuffleCodec()
    model = DiT4SRTransformer2DModel(**TINY_CONFIG)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / config.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(i, config.steps) / config.steps)))
    text = torch.zeros(config.batch_size, config.text_tokens, TINY_CONFIG["joint_attention_dim"])
    pooled = torch.zeros(config.batch_size, TINY_CONFIG["pooled_projection_dim"])
    gen = torch.Generator().manual_seed(config.seed)
    bar = tqdm(range(config.steps), desc="train tiny DiT4SR")
    t0 = time.time()
    for _ in bar:
        hr = data.sample(config.batch_size)
        x0 = codec.encode(hr)
        cond = codec.encode(lr_condition(hr))
        sigma = torch.rand(config.batch_size, generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * eps
        pred = model(xt, cond, text, pooled, sigma * 1000.0)
        loss = torch.nn.functional.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - config.ema_decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_transformer(ema, out, dtype=torch.float16)
    codec.save(out)
    atomic_write_text(out / "pipeline.json", json.dumps(asdict(TINY_PIPELINE), indent=2) + "\n")
    meta = {"train": asdict(config), "train_photos": list(TRAIN_PHOTOS), "seconds": round(time.time() - t0, 1),
            "final_loss": float(loss.item())}
    atomic_write_text(out / "training.json", json.dumps(meta, indent=2) + "\n")
    return ema
