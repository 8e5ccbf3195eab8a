"""The full-size quantization bench's synthetic statistics: shapes, PSD Grams shared per width, and a drop-in
for a real per-layer Gram dict in quantize_ (same codes), with the stage timer restoring what it wraps."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from qdit4sr.calibration import api
from qdit4sr.calibration.api import quantize_, quantized_layers
from qdit4sr.calibration.layers import example_inputs, used_linears
from qdit4sr.calibration.plan import QDiT4SRConfig
from qdit4sr.models.transformer import DiT4SRTransformer2DModel
from tests.helpers.micro import MICRO_CONFIG, randomize

_PATH = Path(__file__).resolve().parents[2] / "bench" / "bench_quantize_full.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quantize_full", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _micro():
    model = randomize(DiT4SRTransformer2DModel(**MICRO_CONFIG)).eval()
    return model, list(used_linears(model, example_inputs(model)))


def test_random_gram_is_psd_with_unit_mean_diagonal(bench):
    g = bench.random_gram(96, rows=64, seed=3)
    assert g.shape == (96, 96) and g.dtype == np.float32
    np.testing.assert_allclose(g, g.T, atol=1e-12)
    eig = np.linalg.eigvalsh(g.astype(np.float64))
    # PSD up to the float32 rounding of a rank-deficient matrix (64 rows for 96 inputs).
    assert eig.min() > -1e-6 * eig.max()
    assert np.isclose(np.diag(g).mean(), 1.0, rtol=0.05)   # rotation keeps the trace; scales normalised to 1
    np.testing.assert_array_equal(g, bench.random_gram(96, rows=64, seed=3))


def test_shared_grams_one_matrix_per_width(bench):
    grams = bench.SharedGrams({"a": 64, "b": 64, "c": 128}, rows=32)
    assert sorted(grams) == ["a", "b", "c"] and len(grams) == 3
    assert grams.held_bytes() == 0 and grams.build() >= 0 and grams.held_bytes() == 4 * (64 * 64 + 128 * 128)
    assert grams["a"] is grams["b"] and grams["c"].shape == (128, 128)
    assert grams.real_bytes() == 4 * (64 * 64 * 2 + 128 * 128)
    with pytest.raises(KeyError):
        grams["missing"]


def test_synthetic_stats_stand_in_for_a_real_gram_dict(bench):
    model, names = _micro()
    stats = bench.synthetic_stats(model, names, steps=6, gram=True)
    assert stats.second_moment.shape == (len(names), 6) and (stats.second_moment > 0).all()
    config = QDiT4SRConfig.preset("qdit4sr_plus", "w4a4", rank=4, num_segments=2)
    before = {name: getattr(api, name) for name in bench.STAGES}
    with bench.stage_times() as stages:
        plan = quantize_(model, config, stats, progress=False)
    assert {name: getattr(api, name) for name in bench.STAGES} == before
    assert stages["decomposition"] > 0 and stages["GPTQ"] > 0 and stages["VaTMP schedule"] > 0
    assert len(plan.layers) == len(names) and len(plan.segments) == 2

    # The same Grams as a plain per-layer dict (what a loaded artifact holds) give identical codes.
    reference, _ = _micro()
    dict_stats = type(stats)(**{**stats.__dict__, "gram": {n: stats.gram[n].copy() for n in names}})
    quantize_(reference, config, dict_stats, progress=False)
    ours, theirs = quantized_layers(model), quantized_layers(reference)
    for name in names:
        torch.testing.assert_close(ours[name].qweight, theirs[name].qweight, rtol=0, atol=0)
