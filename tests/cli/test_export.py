"""The command line end to end on a micro DiT4SR folder, including every bad input the tool promises to catch."""
import json
from dataclasses import asdict

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from qdit4sr.calibration.plan import QuantizationSettings
from qdit4sr.cli.export import export_command
from qdit4sr.cli.upscale import upscale_command
from qdit4sr.engines.build import EngineBuildConfig
from qdit4sr.exporter.settings import ExportConfig, ExportSettings
from qdit4sr.models.latents import PixelUnshuffleCodec
from qdit4sr.models.loading import save_transformer
from qdit4sr.models.pipeline import PipelineConfig

PIPE = PipelineConfig(num_inference_steps=4, shift=1.0, guidance_scale=1.0, tile_size=8, tile_overlap=2,
                      tile_batch=16, min_lr_side=4, color_fix="none")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from qdit4sr.models.transformer import DiT4SRTransformer2DModel
    from tests.helpers.micro import MICRO_CONFIG, randomize

    folder = tmp_path_factory.mktemp("micro_model")
    save_transformer(randomize(DiT4SRTransformer2DModel(**MICRO_CONFIG)).eval(), folder)
    PixelUnshuffleCodec().save(folder)
    (folder / "pipeline.json").write_text(json.dumps(asdict(PIPE)))
    return folder


def _export(out, model_dir, *extra):
    args = ["--precision", "w4a4", "--out", str(out), "--model", str(model_dir), "--calib-count", "2",
            "--segments", "2", "--rank", "4", *extra]
    return CliRunner().invoke(export_command, args)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model_dir):
    out = tmp_path_factory.mktemp("run") / "engines"
    result = _export(out, model_dir)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_export_writes_a_complete_folder(exported):
    out, output = exported
    assert (out / "manifest.json").is_file() and (out / "weights.bin").is_file()
    assert sorted(p.name for p in out.glob("segment_*.onnx")) == [
        f"segment_{k:02d}.{flavour}.onnx" for k in range(2) for flavour in ("cpu", "portable", "trt")]
    assert (out / "report" / "report.md").is_file()
    assert "TensorRT engines were not built" in output   # no TensorRT here, and the summary says why
    assert str(out / "manifest.json") in output
    assert not list(out.glob("**/*.tmp")) and not list(out.parent.glob(".*staging*"))


def test_rerun_resumes_from_the_cache(exported, model_dir):
    out, _ = exported
    result = _export(out, model_dir)
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output
    assert "reused           calibration, quantization, ONNX export" in result.output


def test_upscale_with_the_exported_folder(exported, tmp_path):
    out, _ = exported
    image = (np.random.default_rng(0).random((12, 10, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "lr.png")
    result = CliRunner().invoke(upscale_command, [str(tmp_path / "lr.png"), "--engines", str(out),
                                                  "-o", str(tmp_path / "sr.png")])
    assert result.exit_code == 0, result.output
    assert np.asarray(Image.open(tmp_path / "sr.png")).shape == (48, 40, 3)


def test_upscale_bad_inputs(exported, tmp_path):
    out, _ = exported
    runner = CliRunner()
    r = runner.invoke(upscale_command, [str(tmp_path / "none.png"), "--engines", str(out), "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "does not exist" in r.output
    Image.new("CMYK", (16, 16)).save(tmp_path / "cmyk.jpg")
    r = runner.invoke(upscale_command, [str(tmp_path / "cmyk.jpg"), "--engines", str(out), "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "mode CMYK" in r.output
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    r = runner.invoke(upscale_command, [str(tmp_path / "tiny.png"), "--engines", str(out), "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "too small" in r.output
    r = runner.invoke(upscale_command, [str(tmp_path / "tiny.png"), "--engines", str(tmp_path), "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "manifest" in r.output.lower()
    assert not (tmp_path / "x.png").exists()


def test_missing_and_corrupt_model_folders(tmp_path, model_dir):
    r = _export(tmp_path / "a", tmp_path / "nowhere")
    assert r.exit_code == 2 and "does not exist" in r.output
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    r = _export(tmp_path / "b", broken)
    assert r.exit_code == 2 and "cannot read" in r.output
    assert not (tmp_path / "b").exists()


def test_unknown_precision(tmp_path, model_dir):
    r = CliRunner().invoke(export_command, ["--precision", "int4", "--out", str(tmp_path / "o"), "--model", str(model_dir)])
    assert r.exit_code == 2 and "w<bits>a<bits>" in r.output


def test_non_empty_and_unwritable_out_dirs(tmp_path, model_dir):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = _export(out, model_dir)
    assert r.exit_code == 2 and "--force" in r.output
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("")
    r = _export(tmp_path / "file" / "sub", model_dir)
    assert r.exit_code == 2 and "error:" in r.output


def test_calibration_images_of_wrong_mode_or_size(tmp_path, model_dir):
    images = tmp_path / "calib"
    images.mkdir()
    Image.new("CMYK", (32, 32)).save(images / "a.jpg")
    r = _export(tmp_path / "o1", model_dir, "--calib-images", str(images))
    assert r.exit_code == 2 and "mode CMYK" in r.output
    (images / "a.jpg").unlink()
    Image.new("RGB", (2, 2)).save(images / "b.png")
    r = _export(tmp_path / "o2", model_dir, "--calib-images", str(images))
    assert r.exit_code == 2 and "smaller than" in r.output


def test_interrupted_run_leaves_no_manifest_and_resumes(tmp_path, model_dir, monkeypatch):
    from qdit4sr.exporter import stages

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "export", interrupt)
    out = tmp_path / "o"
    r = _export(out, model_dir)
    assert r.exit_code == 130 and "rerun resumes" in r.output
    assert not (out / "manifest.json").exists()
    assert (out / "quantized" / "bit_plan.json").is_file()   # finished stages stay cached
    monkeypatch.undo()
    r = _export(out, model_dir)
    assert r.exit_code == 0, r.output
    assert "reused           calibration, quantization" in r.output


def test_option_groups_build_the_settings(tmp_path, monkeypatch):
    """Each option group fills its settings dataclass; --flavour is repeatable (default all three flavours)."""
    from qdit4sr.exporter import stages

    seen = []

    def stop(settings):
        seen.append(settings)
        raise stages.ExportError("stop here")

    monkeypatch.setattr(stages, "load_pipeline", stop)
    for extra, expected in (((), ("portable", "trt", "cpu")), (("--flavour", "portable"), ("portable",)),
                            (("--flavour", "trt", "--flavour", "portable"), ("portable", "trt"))):
        r = CliRunner().invoke(export_command, ["--out", str(tmp_path / "o"), *extra])
        assert r.exit_code == 2 and "stop here" in r.output
        assert seen.pop().export.flavours == expected
    r = CliRunner().invoke(export_command, ["--out", str(tmp_path / "o"), "--flavour", "onnx"])
    assert r.exit_code == 2 and "'onnx' is not one of 'portable', 'trt', 'cpu'" in r.output
    r = CliRunner().invoke(export_command, ["--out", str(tmp_path / "o"), "--model", "m", "--variant", "dit4sr_r1",
                                            "--precision", "W4A6", "--method", "rtn", "--segments", "3",
                                            "--calib-count", "5", "--seed", "7", "--batch-max", "8",
                                            "--workspace-gib", "0.5", "--timing-cache", "t.cache"])
    settings = seen.pop()
    assert (settings.model.path, settings.model.variant) == ("m", "dit4sr_r1")
    assert settings.quantization == QuantizationSettings(precision="w4a6", method="rtn", segments=3, rank=None)
    assert (settings.calibration.images, settings.calibration.count, settings.seed) == (None, 5, 7)
    assert settings.engines == EngineBuildConfig(batch_max=8, workspace_bytes=1 << 29, timing_cache_path="t.cache")


def test_engine_stage_follows_the_flavours_and_forwards_the_build_options(tmp_path, monkeypatch):
    from qdit4sr.engines import build
    from qdit4sr.exporter import stages

    log = stages.StageLog()
    portable = ExportSettings(export=ExportConfig(flavours=("portable",)))
    assert stages.build_trt_engines(portable, tmp_path, log) == []
    assert "built from the trt graphs, which --flavour did not ask for" in log.skipped[0]
    calls = []
    monkeypatch.setattr(build, "tensorrt_status", lambda: (True, "pretend"))
    monkeypatch.setattr(build, "build_engines", lambda folder, config: calls.append((folder, config)) or [])
    settings = ExportSettings(engines=EngineBuildConfig(batch_max=4))
    stages.build_trt_engines(settings, tmp_path, log)
    assert calls == [(tmp_path, EngineBuildConfig(batch_max=4))] and log.done == ["TensorRT engines"]


def test_upscale_trt_flavour_needs_engines(exported, tmp_path):
    out, _ = exported
    Image.new("RGB", (16, 16)).save(tmp_path / "lr.png")
    r = CliRunner().invoke(upscale_command, [str(tmp_path / "lr.png"), "--engines", str(out), "-o",
                                             str(tmp_path / "sr.png"), "--flavour", "trt"])
    assert r.exit_code == 2 and "error:" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "sr.png").exists()
