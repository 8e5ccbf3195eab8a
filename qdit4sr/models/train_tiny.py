"""Train the embedded tiny DiT4SR on bundled photos (seeded, CPU, one thread: 37 CPU-minutes).

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
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm import tqdm

from ..fileio import atomic_write_text
from .config import TINY_CONFIG
from .images import TRAIN_PHOTOS, degrade_x4, load_photo, resize_bicubic, to_tensor
from .latents import PixelUnshuffleCodec
from .loading import load_transformer, save_transformer
from .pipeline import PipelineConfig
from .transformer import DiT4SRTransformer2DModel


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 10000
    batch_size: int = 8
    hr_crop: int = 32
    context: int = 16            # HR pixels of context around each crop when degrading (as inside a tiled image)
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    seed: int = 0
    text_tokens: int = 4
    sampler_steps: int = 4       # the training grid: these sigmas get extra training weight
    shift: float = 8.0           # large: sigmas 1, .94, .80, .06, so the output stays near the MMSE estimate
    shipped_steps: int = 2       # the sampler written to pipeline.json, chosen after training by
    shipped_shift: float = 3.0   # `qdit4sr.cli.evaluate --steps/--shift` (sigmas 1, .75); not used in training
    grid_fraction: float = 0.5   # share of samples drawn exactly at the sampler's sigmas
    density_shift: float = 3.0   # the other samples: shifted-uniform sigmas, broader than the sampler's grid
    x0_loss: bool = True         # weight the velocity error by sigma^2, i.e. the error of the implied x0
    threads: int = 1  # results depend on the thread count; fixed threads keep runs bit-reproducible


def pipeline_config(config: TrainConfig) -> PipelineConfig:
    """Sampling defaults shipped with the tiny model: tiles match the training crop size."""
    return PipelineConfig(num_inference_steps=config.shipped_steps, shift=config.shipped_shift, guidance_scale=1.0,
                          tile_size=config.hr_crop // 2, tile_overlap=10, tile_batch=64, min_lr_side=8,
                          color_fix="adain")


TINY_PIPELINE = pipeline_config(TrainConfig())


def sampler_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The sigmas the shipped flow-matching Euler sampler evaluates the model at (diffusers' shifted grid)."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas[:-1].float()


def sample_sigmas(config: TrainConfig, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Training sigmas: a share exactly on the sampler's grid, the rest from a shifted-uniform density."""
    u = torch.rand(batch, generator=gen)
    sigma = config.density_shift * u / (1 + (config.density_shift - 1) * u)
    grid = sampler_sigmas(config.sampler_steps, config.shift)
    on_grid = torch.rand(batch, generator=gen) < config.grid_fraction
    pick = grid[torch.randint(len(grid), (batch,), generator=gen)]
    return torch.where(on_grid, pick, sigma)


class PhotoCrops:
    """Random HR crops with their conditioning images, like interior tiles of a whole degraded photo.

    Augmentations: mild down-scaling, flips, 90-degree turns, colour-channel permutations.
    The degradation is applied to the crop plus `context` pixels on each side, then the margin is cut,
    so tile borders see the same bicubic interpolation as inside a full image.
    """

    def __init__(self, names, crop: int, context: int, rng: np.random.Generator):
        self.images = [to_tensor(load_photo(n)) for n in names]
        self.crop = crop
        self.context = context
        self.rng = rng

    def _patch(self, size: int) -> torch.Tensor:
        img = self.images[self.rng.integers(len(self.images))]
        scale = float(self.rng.choice([1.0, 1.0, 0.75, 0.5]))
        h, w = img.shape[-2:]
        src = min(h, w, max(size, int(round(size / scale))))
        top = int(self.rng.integers(0, h - src + 1))
        left = int(self.rng.integers(0, w - src + 1))
        patch = img[..., top:top + src, left:left + src]
        if src != size:
            patch = resize_bicubic(patch, size, size)
        if self.rng.random() < 0.5:
            patch = patch.flip(-1)
        patch = torch.rot90(patch, int(self.rng.integers(4)), dims=(-2, -1))
        return patch[:, torch.as_tensor(self.rng.permutation(3))]

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(HR crops, conditioning crops) [B, 3, crop, crop]."""
        size = self.crop + 2 * self.context
        big = torch.cat([self._patch(size) for _ in range(batch)])
        cond = lr_condition(big)
        # the crop's offset inside the context window: even, so latent pixels stay aligned
        offs = 2 * self.rng.integers(0, self.context + 1, size=(batch, 2))
        hr = torch.stack([big[i, :, a:a + self.crop, b:b + self.crop] for i, (a, b) in enumerate(offs)])
        lr = torch.stack([cond[i, :, a:a + self.crop, b:b + self.crop] for i, (a, b) in enumerate(offs)])
        return hr, lr


def lr_condition(hr: torch.Tensor) -> torch.Tensor:
    """The conditioning image: HR degraded x4, then bicubic-upsampled back to HR size."""
    return resize_bicubic(degrade_x4(hr), hr.shape[-2], hr.shape[-1])


def train(config: TrainConfig, out: Path, progress: bool = True, init: Path | None = None) -> DiT4SRTransformer2DModel:
    if config.context % 4 or config.hr_crop % 4:
        raise ValueError("hr_crop and context must be multiples of the x4 scale")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    data = PhotoCrops(TRAIN_PHOTOS, config.hr_crop, config.context, rng)
    codec = PixelUnshuffleCodec()
    model = DiT4SRTransformer2DModel(**TINY_CONFIG)
    if init is not None:  # warm start from a trained model folder (its fp16 weights, promoted to fp32)
        model.load_state_dict(load_transformer(init, "transformer").float().state_dict())
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / config.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(i, config.steps) / config.steps)))
    text = torch.zeros(config.batch_size, config.text_tokens, TINY_CONFIG["joint_attention_dim"])
    pooled = torch.zeros(config.batch_size, TINY_CONFIG["pooled_projection_dim"])
    gen = torch.Generator().manual_seed(config.seed)
    bar = tqdm(range(config.steps), desc="train tiny DiT4SR", disable=not progress, mininterval=10)
    t0, cpu0 = time.time(), time.process_time()
    for i in bar:
        hr, lr = data.sample(config.batch_size)
        x0 = codec.encode(hr)
        cond = codec.encode(lr)
        sigma = sample_sigmas(config, config.batch_size, gen)
        eps = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * eps
        pred = model(xt, cond, text, pooled, sigma * 1000.0)
        err = (pred - (eps - x0)).pow(2).mean((1, 2, 3))
        # sigma^2 |v - v*|^2 = |x0_hat - x0|^2: the few-step sampler's output is the last step's x0 estimate
        loss = (err * sigma.pow(2)).mean() / sigma.pow(2).mean() if config.x0_loss else err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        decay = min(config.ema_decay, (1 + i) / (10 + i))  # EMA warm-up: early averages do not keep the init
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_transformer(ema, out, dtype=torch.float16)
    codec.save(out)
    atomic_write_text(out / "pipeline.json", json.dumps(asdict(pipeline_config(config)), indent=2) + "\n")
    meta = {"train": asdict(config), "init": None if init is None else str(init), "train_photos": list(TRAIN_PHOTOS),
            "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - cpu0, 1),
            "final_loss": float(loss.item())}
    atomic_write_text(out / "training.json", json.dumps(meta, indent=2) + "\n")
    return ema
