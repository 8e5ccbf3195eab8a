"""PSNR/SSIM of a DiT4SR pipeline against bicubic x4 on the held-out bundled photos.

    python -m qdit4sr.cli.evaluate            # the embedded tiny default
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .images import (HELD_OUT_PHOTOS, center_crop, degrade_x4, load_photo, psnr, resize_bicubic, ssim, to_tensor,
                     to_uint8)
from .pipeline import DiT4SRPipeline


@dataclass(frozen=True)
class EvalImage:
    name: str
    hr: np.ndarray   # uint8 [S, S, 3]
    lr: np.ndarray   # uint8 [S/4, S/4, 3]


def held_out_set(crop: int = 128, scale: int = 4, names=HELD_OUT_PHOTOS) -> list[EvalImage]:
    """Centre crops of the held-out photos and their x4-degraded LR versions."""
    out = []
    for name in names:
        hr = center_crop(load_photo(name), crop)
        lr = to_uint8(degrade_x4(to_tensor(hr), scale))
        out.append(EvalImage(name, hr, lr))
    return out


def bicubic_x4(lr: np.ndarray, scale: int = 4) -> np.ndarray:
    h, w = lr.shape[:2]
    return to_uint8(resize_bicubic(to_tensor(lr), h * scale, w * scale))


def evaluate(pipe: DiT4SRPipeline, images: list[EvalImage], seed: int = 0) -> list[dict]:
    rows = []
    for im in images:
        sr = pipe.upscale(im.lr, seed=seed)
        bic = bicubic_x4(im.lr)
        rows.append({"image": im.name, "psnr_model": psnr(sr, im.hr), "psnr_bicubic": psnr(bic, im.hr),
                     "ssim_model": ssim(sr, im.hr), "ssim_bicubic": ssim(bic, im.hr)})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| image | PSNR model | PSNR bicubic | SSIM model | SSIM bicubic |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['image']} | {r['psnr_model']:.2f} | {r['psnr_bicubic']:.2f} | "
                     f"{r['ssim_model']:.4f} | {r['ssim_bicubic']:.4f} |")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "image"}
    lines.append(f"| mean | {mean['psnr_model']:.2f} | {mean['psnr_bicubic']:.2f} | "
                 f"{mean['ssim_model']:.4f} | {mean['ssim_bicubic']:.4f} |")
    return "\n".join(lines)
