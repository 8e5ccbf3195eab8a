import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qdit4sr.models.loading import CheckpointError, load_transformer, save_transformer
from tests.helpers.micro import micro_inputs


def test_round_trip_gives_identical_outputs(tmp_path, micro_model, micro_config):
    save_transformer(micro_model, tmp_path)
    loaded = load_transformer(tmp_path, subfolder="transformer")
    inputs = micro_inputs(micro_config)
    with torch.no_grad():
        assert torch.equal(micro_model(*inputs), loaded(*inputs))
    assert loaded.config.variant == micro_config["variant"]
    assert not any(p.is_meta for p in loaded.parameters())
    written = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert written["_class_name"] == "DiT4SRTransformer2DModel"


def _edit_weights(folder, edit):
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_missing_key_is_named(tmp_path, micro_model):
    save_transformer(micro_model, tmp_path)
    _edit_weights(tmp_path, lambda s: s.pop("transformer_blocks.0.attn.to_q_control.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: transformer_blocks\.0\.attn\.to_q_control\.weight"):
        load_transformer(tmp_path)


def test_misshaped_and_unexpected_keys_are_named(tmp_path, micro_model):
    save_transformer(micro_model, tmp_path)

    def edit(state):
        state["proj_out.weight"] = torch.zeros(3, 3)
        state["transformer_blocks.0.attn.bogus"] = torch.zeros(1)

    _edit_weights(tmp_path, edit)
    with pytest.raises(CheckpointError) as info:
        load_transformer(tmp_path)
    message = str(info.value)
    assert "misshaped keys: proj_out.weight: checkpoint (3, 3)" in message
    assert "unexpected keys: transformer_blocks.0.attn.bogus" in message


def test_corrupt_and_absent_folders(tmp_path, micro_model):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_transformer(tmp_path / "nowhere")
    save_transformer(micro_model, tmp_path)
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_transformer(tmp_path)
    (tmp_path / "transformer" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_transformer(tmp_path)


def test_variant_override_on_load(tmp_path, micro_model):
    save_transformer(micro_model, tmp_path)
    assert load_transformer(tmp_path, variant="dit4sr_q").config.variant == "dit4sr_q"


def test_save_leaves_no_temporary_files(tmp_path, micro_model):
    save_transformer(micro_model, tmp_path)
    assert sorted(p.name for p in (tmp_path / "transformer").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]


def test_pipeline_applies_transformer_overrides_in_one_load(tmp_path, micro_model, monkeypatch):
    """A variant override is part of the one load (a second load would double peak memory)."""
    import qdit4sr.models.loading as loading_module
    import qdit4sr.models.pipeline as pipeline_module
    from qdit4sr.models.latents import PixelUnshuffleCodec

    save_transformer(micro_model, tmp_path)
    PixelUnshuffleCodec().save(tmp_path)
    calls = []
    monkeypatch.setattr(loading_module, "load_transformer",
                        lambda *a, **k: calls.append(k) or load_transformer(*a, **k))
    pipe = pipeline_module.DiT4SRPipeline.from_folder(tmp_path, transformer_overrides={"variant": "dit4sr_q"},
                                                      dtype=torch.bfloat16)
    assert len(calls) == 1
    assert pipe.transformer.config.variant == "dit4sr_q"
    assert pipe.transformer.proj_out.weight.dtype == torch.bfloat16
