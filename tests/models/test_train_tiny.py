"""The tiny model's training recipe: sigma grid, crops with context, and a two-step run end to end."""
import json
from dataclasses import replace

import numpy as np
import torch

from qdit4sr.models.pipeline import DEFAULT_MODEL_DIR, DiT4SRPipeline, PipelineConfig
from qdit4sr.models.train_tiny import PhotoCrops, TrainConfig, lr_condition, pipeline_config, sample_sigmas, \
    sampler_sigmas, train


def test_sampler_sigmas_are_the_pipelines():
    """The training grid is the sigmas a pipeline with those settings evaluates; the shipped sampler is the
    one pipeline_config writes (chosen after training, separate from the grid)."""
    config = TrainConfig()
    pipe = DiT4SRPipeline.__new__(DiT4SRPipeline)
    pipe.config = replace(pipeline_config(config), num_inference_steps=config.sampler_steps, shift=config.shift)
    expected = [t / 1000.0 for t in pipe.sampler_timesteps()]
    np.testing.assert_allclose(sampler_sigmas(config.sampler_steps, config.shift).numpy(), expected, rtol=1e-6)
    shipped = pipeline_config(config)
    assert (shipped.num_inference_steps, shipped.shift) == (config.shipped_steps, config.shipped_shift)
    assert PipelineConfig.from_json(DEFAULT_MODEL_DIR / "pipeline.json") == shipped


def test_training_sigmas_hit_the_grid_and_stay_in_range():
    config = TrainConfig(grid_fraction=0.5)
    sigma = sample_sigmas(config, 4000, torch.Generator().manual_seed(0))
    grid = sampler_sigmas(config.sampler_steps, config.shift)
    on_grid = (sigma[:, None] == grid[None]).any(1).double().mean().item()
    assert 0.45 < on_grid < 0.55
    assert sigma.min() >= 0 and sigma.max() <= 1


def test_crops_see_the_degradation_of_their_context():
    crops = PhotoCrops(("camera",), crop=16, context=8, rng=np.random.default_rng(0))
    hr, cond = crops.sample(3)
    assert hr.shape == cond.shape == (3, 3, 16, 16)
    # Away from the context's own border the condition is the upsampled LR of the HR content: close to it,
    # but not equal (x4 detail is lost).
    err = (cond - hr).abs().mean().item()
    assert 0 < err < 0.1
    assert (lr_condition(hr) - hr).abs().mean().item() > 0


def test_two_steps_write_a_loadable_model(tmp_path):
    config = TrainConfig(steps=2, batch_size=2, warmup=1)
    train(config, tmp_path, progress=False)
    meta = json.loads((tmp_path / "training.json").read_text())
    assert meta["train"]["steps"] == 2 and meta["cpu_seconds"] >= 0
    pipe = DiT4SRPipeline.from_folder(tmp_path)
    assert pipe.config == pipeline_config(config)
    out = pipe.upscale(np.zeros((8, 8, 3), dtype=np.uint8))
    assert out.shape == (32, 32, 3)
