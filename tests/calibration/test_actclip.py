"""Activation clip search: histogram MSE against brute force on samples, and its choice against the Gaussian clip."""
import numpy as np
import pytest
import torch

from qdit4sr.calibration.actclip import HIST_BINS, abs_histogram, histogram_mse, search_activation_scale
from qdit4sr.calibration.quantizer import activation_scale, fake_quantize_activation, qmax


def _sample_mse(x, scale, bits):
    return float((x - fake_quantize_activation(x, bits, scale)).square().sum())


def _heavy_tailed(n=50_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Student-t like: Gaussian divided by a random scale, the shape of outlier-token activations.
    return (torch.randn(n, generator=g, dtype=torch.float64)
            / torch.sqrt(torch.distributions.Gamma(1.5, 1.5).sample((n,)).double()))


def test_histogram_is_additive_and_counts_everything():
    x = _heavy_tailed(10_000)
    h = abs_histogram(x)
    assert h.shape == (HIST_BINS,) and h.sum() == 10_000
    np.testing.assert_array_equal(abs_histogram(x[:4000]) + abs_histogram(x[4000:]), h)


@pytest.mark.parametrize("bits", [4, 6])
def test_histogram_mse_matches_samples(bits):
    x = _heavy_tailed()
    h = abs_histogram(x)
    amax = float(x.abs().max())
    clips = np.array([0.05, 0.2, 0.5, 1.0]) * amax
    est = histogram_mse(h, clips, bits)
    exact = np.array([_sample_mse(x, c / qmax(bits), bits) for c in clips])
    # Eight points per 1/8-octave bin: the estimate is within a few percent of the exact error.
    np.testing.assert_allclose(est, exact, rtol=0.05)


@pytest.mark.parametrize("bits", [4, 6])
def test_search_beats_gaussian_clip_on_heavy_tails_and_matches_it_on_gaussians(bits):
    x = _heavy_tailed(seed=1)
    v, amax = float(x.square().mean()), float(x.abs().max())
    searched = search_activation_scale(abs_histogram(x), v, amax, bits)
    gaussian = min(activation_scale(v, bits), amax / qmax(bits))
    assert _sample_mse(x, searched, bits) < 0.9 * _sample_mse(x, gaussian, bits)
    # Brute force over a grid of clips: the search is within 2% of the best.
    brute = min(_sample_mse(x, c / qmax(bits), bits) for c in np.linspace(0.01, 1, 100) * amax)
    assert _sample_mse(x, searched, bits) <= 1.02 * brute

    g = torch.randn(50_000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    v, amax = float(g.square().mean()), float(g.abs().max())
    searched = search_activation_scale(abs_histogram(g), v, amax, bits)
    gaussian = activation_scale(v, bits)
    assert _sample_mse(g, searched, bits) <= 1.01 * _sample_mse(g, gaussian, bits)


def test_empty_histogram_falls_back_to_gaussian():
    assert search_activation_scale(np.zeros(HIST_BINS), 4.0, 10.0, 4) == pytest.approx(activation_scale(4.0, 4))
