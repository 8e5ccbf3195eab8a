import numpy as np
import pytest

from qdit4sr.calibration.hadamard import apply_hadamard
from qdit4sr.calibration.layers import example_inputs, quantizable_linears, used_linears
from qdit4sr.calibration.stats import ActivationStats, CalibrationConfig, collect_activation_stats
from qdit4sr.models.latents import PixelUnshuffleCodec
from qdit4sr.models.pipeline import DiT4SRPipeline, PipelineConfig

CAL_PIPE = PipelineConfig(num_inference_steps=3, shift=1.0, guidance_scale=1.0, tile_size=8, tile_overlap=2,
                          min_lr_side=4, color_fix="none")


def test_used_linears_skip_attn2_text_projections(micro_model):
    used = used_linears(micro_model, example_inputs(micro_model))
    everything = quantizable_linears(micro_model)
    assert "transformer_blocks.0.attn2.add_q_proj" in everything
    assert "transformer_blocks.0.attn2.add_q_proj" not in used
    assert "transformer_blocks.0.attn.to_q_control" in used
    assert "transformer_blocks.0.norm1.linear" in used
    assert "transformer_blocks.2.attn.to_add_out" not in everything  # last block is context pre-only


def test_statistics_match_a_direct_computation(micro_model):
    pipe = DiT4SRPipeline(micro_model, PixelUnshuffleCodec(), CAL_PIPE)
    layers = used_linears(micro_model, example_inputs(micro_model))
    name = "transformer_blocks.1.ff.net.2"
    seen = []
    layers[name].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    config = CalibrationConfig(num_images=2, lr_crop=4, seed=3, batch_size=1)
    stats = collect_activation_stats(pipe, layers, config, progress=False)
    assert stats.second_moment.shape == (len(layers), 3)
    i = stats.layer_index()[name]
    # One call per step per image; the recorded moment pools both images of that step.
    for step in range(3):
        xs = [apply_hadamard(seen[img * 3 + step]) for img in range(2)]
        v = sum(float(x.square().sum()) for x in xs) / sum(x.numel() for x in xs)
        assert stats.second_moment[i, step] == pytest.approx(v, rel=1e-9)
        assert stats.amax[i, step] == pytest.approx(max(float(x.abs().max()) for x in xs), rel=1e-9)
    assert stats.timesteps[0] == pytest.approx(1000.0)


def test_round_trip_and_validation(tmp_path):
    stats = ActivationStats(["a", "b"], [1000.0, 500.0], np.ones((2, 2)), np.full((2, 2), 3.0),
                            CalibrationConfig(num_images=1)).with_logit_range(["core"], 7.5)
    assert stats.softmax_amax.tolist() == [[7.5, 7.5]]
    stats.save(tmp_path)
    again = ActivationStats.load(tmp_path)
    assert again.layers == ["a", "b"] and np.array_equal(again.amax, stats.amax)
    assert again.softmax_sites == ["core"] and np.array_equal(again.softmax_amax, stats.softmax_amax)
    with pytest.raises(ValueError, match="softmax statistics"):
        ActivationStats(["a"], [1000.0], np.ones((1, 1)), np.ones((1, 1)), CalibrationConfig(), ["core"], np.ones((2, 1)))
    assert again.config == stats.config
    import json
    meta = json.loads((tmp_path / "activation_stats.json").read_text())
    meta["layers"] = ["a"]
    (tmp_path / "activation_stats.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match"):
        ActivationStats.load(tmp_path)


def test_batched_calibration_pools_the_same_statistics(micro_model):
    pipe = DiT4SRPipeline(micro_model, PixelUnshuffleCodec(), CAL_PIPE)
    layers = used_linears(micro_model, example_inputs(micro_model))
    one = collect_activation_stats(pipe, layers, CalibrationConfig(num_images=3, lr_crop=4, batch_size=1), False)
    many = collect_activation_stats(pipe, layers, CalibrationConfig(num_images=3, lr_crop=4, batch_size=3), False)
    # Different noise draws per batch, so only the magnitudes agree; both are finite and positive.
    assert np.all(many.second_moment > 0) and np.isfinite(many.second_moment).all()
    assert np.allclose(np.log(one.second_moment), np.log(many.second_moment), atol=1.0)


def test_grams_are_stored_in_float32_and_read_lazily(tmp_path):
    import os

    from qdit4sr.calibration.stats import LazyGrams

    rng = np.random.default_rng(0)
    grams = {"a": rng.normal(size=(8, 8)), "b": rng.normal(size=(16, 16))}
    stats = ActivationStats(["a", "b"], [1000.0], np.ones((2, 1)), np.ones((2, 1)), CalibrationConfig(gram=True),
                            gram=grams)
    stats.save(tmp_path)
    again = ActivationStats.load(tmp_path)
    assert isinstance(again.gram, LazyGrams) and sorted(again.gram) == ["a", "b"] and "a" in again.gram
    for name, g in grams.items():
        got = again.gram[name]
        assert got.dtype == np.float32 and np.array_equal(got, g.astype(np.float32))
        assert got is not again.gram[name]   # read on each access, nothing kept alive
    with pytest.raises(KeyError):
        again.gram["c"]
    # Saving a loaded artifact again (the Grams stream from the old file) keeps them.
    again.save(tmp_path / "copy")
    assert np.array_equal(ActivationStats.load(tmp_path / "copy").gram["b"], grams["b"].astype(np.float32))
    # A replaced file is refused rather than mixed with the statistics loaded before it.
    stats.save(tmp_path)
    with pytest.raises(RuntimeError, match="changed"):
        again.gram["a"]
    os.remove(tmp_path / "activation_stats.safetensors")
    with pytest.raises(FileNotFoundError):
        again.gram["a"]
