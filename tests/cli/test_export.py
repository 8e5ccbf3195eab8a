"""The command line end to end on a micro DiT4SR folder, including every bad input the tool promises to catch."""
import shutil
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from qdit4sr.calibration.plan import QuantizationSettings
from qdit4sr.cli.export import export_command
from qdit4sr.engines.build import EngineBuildConfig
from qdit4sr.exporter.settings import ExportConfig, ExportSettings
from tests.cli.conftest import run_export



def _export(out, model_dir, *extra):
    return run_export(out, model_dir, *extra)


def test_export_writes_a_complete_folder(exported):
    out, output = exported
    assert (out / "manifest.json").is_file() and (out / "weights.bin").is_file()
    assert sorted(p.name for p in out.glob("segment_*.onnx")) == [
        f"segment_{k:02d}.{flavour}.onnx" for k in range(2) for flavour in ("cpu", "portable", "trt")]
    assert (out / "report" / "report.md").is_file()
    assert "TensorRT engines were not built" in output   # no TensorRT here, and the summary says why
    assert str(out / "manifest.json") in output
    assert not list(out.glob("**/*.tmp")) and not list(out.parent.glob(".*staging*"))


def test_rerun_resumes_from_the_cache(exported, model_dir, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(exported[0], out)   # the shared export stays as a fresh run left it
    result = _export(out, model_dir)
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output
    assert "reused           calibration, quantization, ONNX export" in result.output


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


def _row(output: str, label: str) -> str:
    return next(line[17:] for line in output.splitlines() if line.startswith(f"{label:16s} "))


def test_summary_reports_weights_and_whole_folder_sizes_against_fp16(exported, model_dir):
    """Both the shared weights and everything written are compared with the fp16 transformer, with the
    sizes the files really have."""
    import re

    from qdit4sr.models.loading import load_transformer

    out, output = exported
    fp16 = sum(p.numel() * 2 for p in load_transformer(model_dir, "transformer").parameters())
    weights = (out / "weights.bin").stat().st_size
    whole = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.relative_to(out).parts[0] != "report")
    mib = 2 ** 20

    def ratio(size):
        return f"{fp16 / size:.2f}x smaller than" if size <= fp16 else f"{size / fp16:.2f}x larger than"

    assert _row(output, "weights").startswith(f"{weights / mib:.2f} MiB in weights.bin")
    assert f"{ratio(weights)} the fp16 transformer ({fp16 / mib:.2f} MiB)" in _row(output, "weights")
    assert _row(output, "whole folder").startswith(f"{whole / mib:.2f} MiB with the stage caches")
    assert f"{ratio(whole)} the fp16 transformer" in _row(output, "whole folder")
    deployed = float(re.match(r"([\d.]+) MiB", _row(output, "deployed files")).group(1))
    assert weights / mib < deployed < whole / mib
    assert "as INT4 (4-bit codes)" in _row(output, "weight storage")
    assert "per layer and timestep segment (VaTMP" in _row(output, "activations")


def test_exports_into_different_folders_are_byte_identical(exported, model_dir, tmp_path):
    """Nothing written names the output folder: another folder gets the same bytes."""
    out_a, _ = exported
    out_b = tmp_path / "elsewhere" / "other_name"
    r = _export(out_b, model_dir)
    assert r.exit_code == 0, r.output
    files = sorted(p.relative_to(out_a) for p in out_a.rglob("*") if p.is_file() and p.suffix != ".png")
    assert sorted(p.relative_to(out_b) for p in out_b.rglob("*") if p.is_file() and p.suffix != ".png") == files
    for rel in files:
        assert (out_a / rel).read_bytes() == (out_b / rel).read_bytes(), rel
        for folder in (out_a, out_b):
            assert str(folder).encode() not in (folder / rel).read_bytes(), rel
        assert b"other_name" not in (out_b / rel).read_bytes() and b"elsewhere" not in (out_b / rel).read_bytes()
    for name in ("manifest.json", "report/report.md", "segment_00.portable.onnx", "segment_01.trt.onnx"):
        assert Path(name) in files


def test_w6a6_and_w4a16_summaries_say_what_is_stored_and_used(model_dir, tmp_path):
    r = _export(tmp_path / "w6", model_dir, "--precision", "w6a6", "--flavour", "portable")
    assert r.exit_code == 0, r.output
    storage = _row(r.output, "weight storage")
    assert "as INT8" in storage and "take 8 bits each, the size of w8a8" in storage
    r = _export(tmp_path / "a16", model_dir, "--precision", "w4a16", "--flavour", "portable")
    assert r.exit_code == 0, r.output
    assert _row(r.output, "activations").startswith("full precision (A16)")
    report = (tmp_path / "a16" / "report" / "report.md").read_text()
    assert "VaTMP" not in report.split("## Hyper-parameters")[0]
