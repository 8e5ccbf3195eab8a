"""Each numerical building block of the C++ runtime against its Python counterpart (qdit4sr-ops).

Exact equality everywhere except the bicubic resize: both sides compute it in float64 and round to
float32 once, so they differ only where a float64 value lands within a few float64 ulps of a float32
rounding tie (different FMA use and summation order move the last float64 bits): one float32 ulp, at
a rate of about 1e-6 of the values.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from qdit4sr.models.images import resize_bicubic
from qdit4sr.models.pipeline import DiT4SRPipeline, PipelineConfig
from qdit4sr.models.tiling import gaussian_weights, tile_starts
from qdit4sr.noise import gaussian_noise

from .cpp_build import run


def _ops(tools, *args) -> str:
    result = run([tools.ops, *args])
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("seed, count", [(0, 1), (7, 4097), (2**64 - 1, 10), (123456789, 300_000)])
def test_noise_is_bit_identical(cpp_tools, tmp_path, seed, count):
    _ops(cpp_tools, "noise", seed, count, tmp_path / "n.f32")
    got = np.fromfile(tmp_path / "n.f32", dtype=np.float32)
    np.testing.assert_array_equal(got, gaussian_noise((count,), seed))


def test_resize_matches_the_float64_torch_resize(cpp_tools, tmp_path):
    """Upsizing (plain bicubic), shrinking (antialiased) and mixed shapes, incl. the pipeline's x4."""
    rng = np.random.default_rng(0)
    shapes = [(8, 8, 32, 32), (10, 12, 40, 48), (48, 60, 32, 40), (37, 29, 148, 116), (40, 30, 13, 71),
              (5, 50, 17, 9)] + [tuple(int(v) for v in rng.integers(3, 70, size=4)) for _ in range(14)]
    differ = total = 0
    for h, w, oh, ow in shapes:
        x = rng.random((1, 3, h, w), dtype=np.float32)
        x.tofile(tmp_path / "in.f32")
        _ops(cpp_tools, "resize", 3, h, w, oh, ow, tmp_path / "in.f32", tmp_path / "out.f32")
        got = np.fromfile(tmp_path / "out.f32", dtype=np.float32).reshape(1, 3, oh, ow)
        ref = resize_bicubic(torch.from_numpy(x), oh, ow).numpy()
        ulps = np.abs(got.view(np.int32).astype(np.int64) - ref.view(np.int32).astype(np.int64))
        assert ulps.max() <= 1, (h, w, oh, ow, ulps.max())
        differ += int((ulps > 0).sum())
        total += ref.size
    assert differ <= max(1, total // 100_000), (differ, total)
    # The comparison is sharp: the float32 torch kernel (the old resize) is not what the runtime computes.
    x = torch.from_numpy(rng.random((1, 3, 37, 29), dtype=np.float32))
    f32 = torch.nn.functional.interpolate(x, size=(148, 116), mode="bicubic", align_corners=False).clamp(0, 1)
    assert (f32 != resize_bicubic(x, 148, 116)).float().mean() > 0.01


@pytest.mark.parametrize("steps, shift", [(4, 3.0), (40, 3.0), (1, 3.0), (7, 1.0), (20, 2.5)])
def test_schedule_is_bit_identical(cpp_tools, tmp_path, steps, shift):
    _ops(cpp_tools, "schedule", steps, repr(shift), tmp_path / "s.f32")
    got = np.fromfile(tmp_path / "s.f32", dtype=np.float32)
    pipe = DiT4SRPipeline.__new__(DiT4SRPipeline)  # the schedule needs only the settings
    pipe.config = PipelineConfig(num_inference_steps=steps, shift=shift)
    scheduler = pipe.make_scheduler()
    np.testing.assert_array_equal(got, np.concatenate([scheduler.timesteps.numpy(), scheduler.sigmas.numpy()]))


@pytest.mark.parametrize("length, tile, overlap", [(16, 16, 6), (18, 16, 6), (100, 16, 6), (257, 64, 24), (77, 8, 2)])
def test_tile_starts_are_identical(cpp_tools, length, tile, overlap):
    got = [int(v) for v in _ops(cpp_tools, "tiles", length, tile, overlap).split()]
    assert got == tile_starts(length, tile, overlap)


@pytest.mark.parametrize("h, w", [(16, 16), (64, 64), (7, 13)])
def test_blending_weights_are_bit_identical(cpp_tools, tmp_path, h, w):
    _ops(cpp_tools, "weights", h, w, tmp_path / "w.f32")
    got = np.fromfile(tmp_path / "w.f32", dtype=np.float32).reshape(h, w)
    np.testing.assert_array_equal(got, gaussian_weights(h, w).numpy())


@pytest.mark.parametrize("size", [0, 55, 56, 63, 64, 65, 1000, 3 * 2**20 + 7])
def test_sha256_matches_hashlib(cpp_tools, tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "blob").write_bytes(data)
    assert _ops(cpp_tools, "sha256", tmp_path / "blob").strip() == hashlib.sha256(data).hexdigest()
