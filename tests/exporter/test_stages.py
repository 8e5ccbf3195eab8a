"""Export stages: the cached comparison crops, and the summary's statements about storage and activations."""
import numpy as np
import pytest
import torch

from qdit4sr.calibration.plan import BitPlan, LayerPlan, QDiT4SRConfig
from qdit4sr.exporter import stages
from qdit4sr.exporter.settings import ExportSettings
from qdit4sr.models.evaluate import EvalImage
from qdit4sr.models.latents import PixelUnshuffleCodec
from qdit4sr.models.pipeline import DiT4SRPipeline, PipelineConfig
from qdit4sr.models.transformer import DiT4SRTransformer2DModel
from tests.helpers.micro import MICRO_CONFIG, randomize

PIPE = PipelineConfig(num_inference_steps=2, shift=1.0, guidance_scale=1.0, tile_size=8, tile_overlap=2,
                      tile_batch=16, min_lr_side=4, color_fix="none")


class CountingPipeline(DiT4SRPipeline):
    def __init__(self, *args, calls: list, label: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.label = calls, label

    def upscale(self, image, scale=4, seed=0):
        self.calls.append(self.label)
        return super().upscale(image, scale, seed)


@pytest.fixture
def crop_setup(tmp_path, monkeypatch):
    """A run folder with quantized/ artifacts, a micro FP and 'quantized' pipeline, and a small held-out photo,
    with every upscale and FP model load counted."""
    calls = []

    def pipeline(label, seed):
        model = randomize(DiT4SRTransformer2DModel(**MICRO_CONFIG), seed=seed).eval()
        return CountingPipeline(model, PixelUnshuffleCodec(), PIPE, calls=calls, label=label)

    def load_fp(settings):
        calls.append("load FP")
        return pipeline("FP", 0)

    hr = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    monkeypatch.setattr(stages, "load_pipeline", load_fp)
    monkeypatch.setattr("qdit4sr.models.evaluate.held_out_set",
                        lambda size, names: [EvalImage(names[0], hr, hr[::4, ::4].copy())])
    (tmp_path / "quantized").mkdir()
    (tmp_path / "quantized" / "bit_plan.json").write_text("{}")
    (tmp_path / "quantized" / "weights.safetensors").write_bytes(b"codes")
    return tmp_path, pipeline("quantized", 1), calls


def test_comparison_crops_are_cached_and_reused(crop_setup):
    folder, quantized, calls = crop_setup
    settings = ExportSettings()
    log = stages.StageLog()
    with torch.no_grad():
        first = stages.comparison_crops(settings, quantized, folder, "model-hash", log)
    assert calls == ["load FP", "FP", "quantized"] and log.done == ["comparison crops"]
    assert (folder / stages.CROPS_FILE).is_file()
    assert not np.array_equal(first["FP"], first["quantized"])   # two different models really ran

    calls.clear()
    log = stages.StageLog()
    again = stages.comparison_crops(settings, quantized, folder, "model-hash", log)
    assert calls == [] and log.reused == ["comparison crops"]     # resumed: no model loaded, nothing upscaled
    assert again.keys() == first.keys() and all(np.array_equal(again[k], first[k]) for k in first)


@pytest.mark.parametrize("change", ["weights", "plan", "seed", "model"])
def test_comparison_crops_are_recomputed_when_an_input_changes(crop_setup, change):
    folder, quantized, calls = crop_setup
    with torch.no_grad():
        stages.comparison_crops(ExportSettings(), quantized, folder, "model-hash", stages.StageLog())
    calls.clear()
    settings, model_hash = ExportSettings(), "model-hash"
    if change == "weights":
        (folder / "quantized" / "weights.safetensors").write_bytes(b"other codes")
    elif change == "plan":
        (folder / "quantized" / "bit_plan.json").write_text('{"changed": 1}')
    elif change == "seed":
        settings = ExportSettings(seed=1)
    else:
        model_hash = "another-model"
    log = stages.StageLog()
    with torch.no_grad():
        stages.comparison_crops(settings, quantized, folder, model_hash, log)
    assert calls == ["load FP", "FP", "quantized"] and log.done == ["comparison crops"]


def test_a_damaged_crop_cache_is_recomputed(crop_setup):
    folder, quantized, calls = crop_setup
    with torch.no_grad():
        stages.comparison_crops(ExportSettings(), quantized, folder, "h", stages.StageLog())
        path = folder / stages.CROPS_FILE
        path.write_bytes(path.read_bytes()[:100])
        calls.clear()
        stages.comparison_crops(ExportSettings(), quantized, folder, "h", stages.StageLog())
    assert calls == ["load FP", "FP", "quantized"]


def test_no_crops_for_a_user_model(crop_setup):
    folder, quantized, calls = crop_setup
    from qdit4sr.exporter.settings import ModelSettings

    log = stages.StageLog()
    assert stages.comparison_crops(ExportSettings(model=ModelSettings(path="m")), quantized, folder, "h", log) is None
    assert calls == [] and "comparison crop" in log.skipped[0]


def _plan(weight_bits, precision="w4a4", method="qdit4sr") -> BitPlan:
    config = QDiT4SRConfig.preset(method, precision, num_segments=2)
    layers = [LayerPlan(name=f"transformer_blocks.0.l{i}", in_features=64, out_features=64, weight_bits=b,
                        weight_variance=1e-3, act_bits=[4, 4], act_scales=[0.1, 0.1]) for i, b in enumerate(weight_bits)]
    return BitPlan(config=config, timesteps=[1000.0, 500.0, 250.0, 10.0], segments=[(0, 2), (2, 4)], layers=layers)


def test_weight_storage_names_the_containers():
    assert stages.weight_storage(_plan([4, 4, 3])) == "3 layer(s) as INT4 (3/4-bit codes)"
    six = stages.weight_storage(_plan([6, 6, 6], "w6a6"))
    assert six.startswith("3 layer(s) as INT8 (6-bit codes): 6-bit codes take 8 bits each, the size of w8a8")
    assert stages.weight_storage(_plan([8, 8], "w8a8")) == "2 layer(s) as INT8 (8-bit codes)"
    mixed = stages.weight_storage(_plan([4, 5, 8], "w6a6"))
    assert mixed.startswith("1 layer(s) as INT4 (4-bit codes); 2 layer(s) as INT8 (5/8-bit codes): 5-bit codes")


def test_activation_use_claims_timestep_bits_only_when_used():
    assert stages.activation_use(_plan([4], "w4a4")).startswith("per layer and timestep segment (VaTMP over 2")
    a16 = stages.activation_use(_plan([4], "w4a16"))
    assert a16.startswith("full precision (A16)") and "VaTMP" not in a16
    assert stages.activation_use(_plan([4], "w4a6", "hsvd")).startswith("A6 in every layer and step")
