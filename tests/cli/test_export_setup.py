"""qdit4sr-export's device, sampler and conditioning options: they reach the settings, bad values are refused
in one line before the model loads, and what they set ends up in the manifest, the run record and the summary."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from qdit4sr.cli.export import export_command
from qdit4sr.engines.runtime import load_exported_pipeline
from qdit4sr.exporter.settings import CalibrationSettings, ExportSettings, ModelSettings, SamplerSettings
from qdit4sr.models.pipeline import PROMPT_KEYS, PromptEmbeddings
from qdit4sr.models.placement import DeviceConfig
from tests.cli.conftest import run_export

JOINT, POOLED = 32, 32    # the micro model's text widths


def _prompt_file(path, tokens=3, joint=JOINT, pooled=POOLED, negative=True, drop=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = dict(zip(PROMPT_KEYS, ((1, tokens, joint), (1, pooled)) * 2))
    keys = PROMPT_KEYS if negative else PROMPT_KEYS[:2]
    save_file({k: torch.randn(shapes[k], generator=gen) for k in keys if k not in drop}, str(path))
    return path


@pytest.fixture
def stop_at_load(monkeypatch):
    """Record the settings the command built and stop before loading any model."""
    from qdit4sr.exporter import stages

    seen = []

    def stop(settings):
        seen.append(settings)
        raise stages.ExportError("stop here")

    monkeypatch.setattr(stages, "load_pipeline", stop)
    return seen


def test_options_reach_the_settings(tmp_path, stop_at_load):
    r = CliRunner().invoke(export_command, ["--out", str(tmp_path / "o"), "--device", "CUDA:1", "--dtype", "bfloat16",
                                            "--offload", "--prompt-embeds", "p.safetensors", "--steps", "6",
                                            "--guidance", "4.5", "--shift", "2", "--calib-size", "16"])
    assert r.exit_code == 2 and "stop here" in r.output
    s = stop_at_load.pop()
    assert s.device == DeviceConfig(device="cuda:1", dtype="bfloat16", offload=True)
    assert s.sampler == SamplerSettings(steps=6, guidance=4.5, shift=2.0)
    assert s.calibration.size == 16 and s.model.prompt_embeds == "p.safetensors"
    CliRunner().invoke(export_command, ["--out", str(tmp_path / "o")])
    s = stop_at_load.pop()     # defaults: CPU float32, the folder's sampler, its crop size
    assert s.device == DeviceConfig() and s.sampler == SamplerSettings() and s.calibration.size is None


def test_the_command_hands_freed_memory_back_to_the_os(tmp_path, stop_at_load, monkeypatch):
    from qdit4sr import hostmem

    calls = []
    monkeypatch.setattr(hostmem, "return_large_blocks_to_os", lambda: calls.append("threshold"))
    CliRunner().invoke(export_command, ["--out", str(tmp_path / "o")])
    assert calls == ["threshold"] and stop_at_load    # set before the model loads


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "'tpu' is not cpu, cuda or cuda:N"),
    (["--device", "cuda:x"], "'cuda:x' is not cpu, cuda or cuda:N"),
    (["--dtype", "int8"], "'int8' is not one of 'float32', 'bfloat16', 'float16'"),
    (["--offload"], "offload moves blocks from host memory to an accelerator; it needs a cuda device"),
    (["--steps", "0"], "0 is not in the range 1<=x<=1000"),
    (["--guidance", "nan"], "nan is not a finite number"),
    (["--guidance", "-1"], "-1.0 is not in the range x>=0"),
    (["--shift", "0"], "0.0 is not in the range x>0"),
    (["--calib-size", "0"], "0 is not in the range 1<=x<=4096"),
])
def test_bad_values_are_refused_in_one_line(tmp_path, stop_at_load, args, message):
    r = CliRunner().invoke(export_command, ["--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not stop_at_load and not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA refuses --device cuda")
def test_cuda_without_a_gpu_is_refused_before_loading(tmp_path, model_dir, monkeypatch):
    from qdit4sr.models import loading

    monkeypatch.setattr(loading, "load_transformer", lambda *a, **k: pytest.fail("the model was loaded"))
    r = run_export(tmp_path / "o", model_dir, "--device", "cuda")
    assert r.exit_code == 2 and "error: device cuda was asked for, but torch sees no CUDA GPU" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_calib_size_the_model_cannot_take(tmp_path, model_dir):
    """Micro model: pixel-unshuffle x2 and patch 2, so the x4 crop must be a multiple of 4 pixels: any size
    is; a VAE model (x8) needs a multiple of 16, i.e. an LR side divisible by 4 (checked in resolve_settings)."""
    from types import SimpleNamespace

    from qdit4sr.exporter import stages

    pipe = SimpleNamespace(config=SimpleNamespace(tile_size=64), codec=SimpleNamespace(downsample=8),
                           transformer=SimpleNamespace(config=SimpleNamespace(patch_size=2), inner_dim=1536))
    with pytest.raises(stages.ExportError, match=r"--calib-size 30: the x4 crop \(120 px\) must be a multiple of 16"):
        stages.resolve_settings(ExportSettings(calibration=CalibrationSettings(size=30)), pipe)


@pytest.mark.parametrize("kwargs, message", [
    ({"drop": ("pooled_prompt_embeds",)}, "p.safetensors must hold prompt_embeds, pooled_prompt_embeds (and "
                                          "optionally the negative pair); missing ['pooled_prompt_embeds']"),
    ({"joint": 16}, "p.safetensors: prompt embeddings do not fit the transformer: prompt_embeds has shape "
                    "[1, 3, 16], expected [1, 3, 32]; negative_prompt_embeds has shape [1, 3, 16], expected [1, 3, 32]"),
    ({"drop": ("negative_pooled_prompt_embeds",)}, "negative_prompt_embeds and negative_pooled_prompt_embeds come "
                                                   "together or not at all"),
])
def test_a_bad_prompt_file_is_refused_before_loading(tmp_path, model_dir, monkeypatch, kwargs, message):
    from qdit4sr.models import loading

    monkeypatch.setattr(loading, "load_transformer", lambda *a, **k: pytest.fail("the model was loaded"))
    path = _prompt_file(tmp_path / "p.safetensors", **kwargs)
    r = run_export(tmp_path / "o", model_dir, "--prompt-embeds", str(path))
    assert r.exit_code == 2 and message in r.output, r.output
    assert r.output.startswith("error: --prompt-embeds") and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    r = run_export(tmp_path / "o", model_dir, "--prompt-embeds", str(tmp_path / "none.safetensors"))
    assert r.exit_code == 2 and "none.safetensors does not exist" in r.output


def test_cached_record_follows_what_changes_the_result():
    base = ExportSettings()
    record = base.cached_record()
    same = (ExportSettings(device=DeviceConfig(device="cuda", offload=True)),
            ExportSettings(model=ModelSettings(prompt_embeds="elsewhere/p.safetensors")))
    other = (ExportSettings(device=DeviceConfig(dtype="bfloat16")), ExportSettings(sampler=SamplerSettings(steps=3)),
             ExportSettings(sampler=SamplerSettings(guidance=2.0)), ExportSettings(sampler=SamplerSettings(shift=1.0)),
             ExportSettings(calibration=CalibrationSettings(size=16)),
             ExportSettings(model=ModelSettings(prompt_sha256="0" * 64)))
    assert all(s.cached_record() == record for s in same)
    assert all(s.cached_record() != record for s in other)


@pytest.fixture(scope="module")
def cfg_export(tmp_path_factory, model_dir):
    """The micro model exported with a negative prompt pair, 3 steps, shift 2.5 and guidance 3 (the folder's
    pipeline.json says 4 steps, shift 1, guidance 1)."""
    tmp = tmp_path_factory.mktemp("cfg")
    prompt = _prompt_file(tmp / "caption.safetensors", tokens=5)
    out = tmp / "engines"
    r = run_export(out, model_dir, "--prompt-embeds", str(prompt), "--steps", "3", "--shift", "2.5",
                   "--guidance", "3", "--calib-count", "1", "--calib-size", "6", "--segments", "1",
                   "--flavour", "portable")
    assert r.exit_code == 0, r.output
    return out, prompt, r.output


def test_sampler_and_conditioning_reach_the_manifest_and_the_summary(cfg_export):
    out, prompt, output = cfg_export
    manifest = json.loads((out / "manifest.json").read_text())
    sampler = manifest["sampler"]
    assert (sampler["num_inference_steps"], sampler["shift"], sampler["guidance_scale"]) == (3, 2.5, 3.0)
    assert manifest["text_tokens"] == 5 and manifest["prompt_embeds"] is not None
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["sampler"] == {"steps": 3, "guidance": 3.0, "shift": 2.5}
    assert run["settings"]["calibration"]["size"] == 6 and run["settings"]["device"] == {"dtype": "float32"}
    assert run["placement"] == {"device": "cpu", "offload": False}
    rows = {line[:16].strip(): line[17:] for line in output.splitlines()}
    assert rows["conditioning"] == ("--prompt-embeds caption.safetensors: 5 text tokens, CFG 3 with the negative "
                                    "prompt; the export runs the same")
    assert rows["sampler"] == "3 steps, shift 2.5, guidance 3"
    assert rows["calibration"] == ("1 crop(s) of 6x6 LR pixels from the bundled photos; model in float32 on cpu")
    assert "conditioning" in (out / "report" / "report.md").read_text()
    # The exported runtime runs CFG with the exported negative pair, as calibration did.
    pipe = load_exported_pipeline(out, flavour="portable")
    given = PromptEmbeddings.from_file(prompt)
    for key in PROMPT_KEYS:
        assert torch.equal(getattr(pipe.prompt, key), getattr(given, key)), key
    assert pipe.upscale_work((8, 8, 3)).cfg


def test_changed_sampler_settings_do_not_reuse_the_cache(cfg_export, model_dir, tmp_path):
    import shutil

    out, prompt, _ = cfg_export
    copy = tmp_path / "engines"
    shutil.copytree(out, copy)
    common = ["--prompt-embeds", str(prompt), "--steps", "3", "--shift", "2.5", "--guidance", "3",
              "--calib-count", "1", "--calib-size", "6", "--segments", "1", "--flavour", "portable"]
    for change in (["--shift", "2.0"], ["--calib-size", "4"]):
        r = run_export(copy, model_dir, *common, *change)
        assert r.exit_code == 2 and "was made with other settings" in r.output, r.output
    other = _prompt_file(tmp_path / "caption.safetensors", tokens=5, seed=1)   # same name, other content
    r = run_export(copy, model_dir, *[other if a == str(prompt) else a for a in map(str, common)])
    assert r.exit_code == 2 and "was made with other settings" in r.output, r.output


def test_bf16_calibration_exports_float32_graphs_and_resumes(model_dir, tmp_path):
    """--dtype bfloat16: the model is read and calibrated in bf16, the graphs are still float32 (the runtime
    runs them as for a float32 run), and a rerun resumes every stage (the resumed model is cast the same way)."""
    import onnx

    common = ["--dtype", "bfloat16", "--calib-count", "1", "--segments", "1", "--flavour", "portable"]
    out = tmp_path / "engines"
    r = run_export(out, model_dir, *common)
    assert r.exit_code == 0, r.output
    assert "model in bfloat16 on cpu" in r.output
    graph = onnx.load(str(out / "segment_00.portable.onnx"), load_external_data=False)
    assert {i.type.tensor_type.elem_type for i in graph.graph.input} == {onnx.TensorProto.FLOAT}
    assert not [t.name for t in graph.graph.initializer if t.data_type == onnx.TensorProto.BFLOAT16]
    image = (torch.rand(8, 8, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    first = load_exported_pipeline(out, flavour="portable").upscale(image, seed=1)
    r = run_export(out, model_dir, *common)
    assert r.exit_code == 0 and "reused           calibration, quantization, ONNX export" in r.output, r.output
    assert (load_exported_pipeline(out, flavour="portable").upscale(image, seed=1) == first).all()
    r = run_export(out, model_dir, *common[2:])    # float32 calibration: other statistics, not reused
    assert r.exit_code == 2 and "was made with other settings" in r.output
