"""Overlapping tiles with Gaussian blending weights, for latents larger than one transformer tile."""
from __future__ import annotations

import math

import torch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile` that overlap by at least `overlap`."""
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > overlap >= 0, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    # Spread the tiles evenly so the last one ends exactly at the border.
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def tile_windows(height: int, width: int, tile: int, overlap: int) -> list[tuple[slice, slice]]:
    return [(slice(top, top + min(tile, height)), slice(left, left + min(tile, width)))
            for top in tile_starts(height, tile, overlap) for left in tile_starts(width, tile, overlap)]


def gaussian_weights(height: int, width: int, variance: float = 0.01) -> torch.Tensor:
    """Separable Gaussian bump [height, width] peaking at the tile centre (as in MultiDiffusion-style stitching)."""

    def bump(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64)
        mid = (n - 1) / 2
        return torch.exp(-((x - mid) / n) ** 2 / (2 * variance))

    return (bump(height)[:, None] * bump(width)[None, :]).float()
