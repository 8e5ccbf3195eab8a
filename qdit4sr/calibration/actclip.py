"""Activation clip search: the static per-tensor activation scale that minimises the quantization MSE of the
calibration activations themselves, instead of the Gaussian-optimal clip from their second moment.

Calibration records, per layer and sampler step, a histogram of |x_H| on a fixed logarithmic grid
(`HIST_BINS_PER_OCTAVE` bins per octave between 2**HIST_LOG2_LO and 2**HIST_LOG2_HI), so histograms of
different batches and steps add up. The search scores each candidate clip c (step c / qmax) by the exact
squared error of symmetric round-to-nearest at several points spread over every bin, weighted by the
bin's count. Heavy-tailed layers (outlier tokens, the per-sample conditioning vectors) get a clip that
suits them, Gaussian ones end up close to the analytic clip.
"""
from __future__ import annotations

import numpy as np
import torch

from .quantizer import gaussian_clip_ratio, qmax

HIST_LOG2_LO = -24
HIST_LOG2_HI = 16
HIST_BINS_PER_OCTAVE = 8
HIST_BINS = (HIST_LOG2_HI - HIST_LOG2_LO) * HIST_BINS_PER_OCTAVE
_POINTS_PER_BIN = 8
_CANDIDATES = 128


def abs_histogram(x: torch.Tensor) -> np.ndarray:
    """Counts of |x| per log-grid bin (float64 [HIST_BINS]); values below the grid fall into bin 0."""
    a = x.detach().abs().double().flatten()
    a = a[a > 0]
    pos = (torch.log2(a) - HIST_LOG2_LO) * HIST_BINS_PER_OCTAVE
    idx = pos.floor().clamp(0, HIST_BINS - 1).long()
    return torch.bincount(idx, minlength=HIST_BINS).double().cpu().numpy()


def _bin_points() -> np.ndarray:
    """[HIST_BINS, P] values spread log-uniformly inside each bin (bin midpoints of P sub-bins)."""
    k = np.arange(HIST_BINS)[:, None] + (np.arange(_POINTS_PER_BIN)[None, :] + 0.5) / _POINTS_PER_BIN
    return 2.0 ** (HIST_LOG2_LO + k / HIST_BINS_PER_OCTAVE)


def histogram_mse(hist: np.ndarray, clips: np.ndarray, bits: int) -> np.ndarray:
    """Estimated total squared error of quantizing the histogram's values with each clip [C]."""
    q = qmax(bits)
    points = _bin_points()[None]                       # [1, B, P]
    step = (np.asarray(clips, dtype=np.float64) / q)[:, None, None]
    codes = np.minimum(np.round(points / step), q)
    err = ((points - codes * step) ** 2).mean(axis=-1)  # [C, B]
    return err @ hist


def search_activation_scale(hist: np.ndarray, second_moment: float, amax: float, bits: int) -> float:
    """The static scale (clip / qmax) with the smallest histogram MSE among clips up to the observed amax.

    The candidates are spread over (0, amax] and include the Gaussian-optimal clip, so the estimated error is
    never above the analytic choice's.
    """
    q = qmax(bits)
    gaussian = min(gaussian_clip_ratio(bits) * float(np.sqrt(second_moment)), amax)
    if not amax > 0 or hist.sum() == 0:
        return max(gaussian / q, float(np.finfo(np.float32).tiny))
    clips = np.unique(np.append(amax * np.linspace(1.0 / _CANDIDATES, 1.0, _CANDIDATES), gaussian))
    clips = clips[clips > 0]
    best = float(clips[int(np.argmin(histogram_mse(hist, clips, bits)))])
    return max(best / q, float(np.finfo(np.float32).tiny))
