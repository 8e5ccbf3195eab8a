"""The generated Triton model repository, without a server: layout, files checked against the manifest,
config.pbtxt of every segment form parsed back with Triton's schema, and the command line."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from qdit4sr.cli.triton_repo import triton_repo_command
from qdit4sr.artifacts.manifest import Manifest, ManifestError
from qdit4sr.fileio import sha256_file
from qdit4sr.serving import layout
from qdit4sr.serving.model_config import ModelConfigError, check_model_config, parse_text_format
from qdit4sr.serving.triton_repo import RepositoryError, RepositorySettings, write_model_repository

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient is not installed (pip install '.[serve]')")
from google.protobuf import text_format  # noqa: E402


def _config(repo_root, model: str):
    return text_format.Parse((repo_root / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _check_segment_io(config, manifest: Manifest, max_batch: int) -> None:
    """Explicit dims and dtypes: the manifest's tensors without the batch axis; the timestep as [1] -> []."""
    assert config.max_batch_size == max_batch
    assert [i.name for i in config.input] == [t.name for t in manifest.inputs]
    for spec, entry in zip(manifest.inputs, config.input):
        assert entry.data_type == model_config_pb2.TYPE_FP32
        if len(spec.shape) == 1:
            assert list(entry.dims) == [1] and entry.HasField("reshape") and list(entry.reshape.shape) == []
        else:
            assert list(entry.dims) == spec.shape[1:] and not entry.HasField("reshape")
    assert [(o.name, list(o.dims)) for o in config.output] == [(t.name, t.shape[1:]) for t in manifest.outputs]
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 2000


def test_python_form_layout_and_files(served_repository, tiny_export):
    repo = served_repository
    manifest = Manifest.load(tiny_export)
    assert repo.segment_models == ["qdit4sr_segment_00", "qdit4sr_segment_01"]
    assert repo.max_batch_size == manifest.sampler["tile_batch"]   # guidance 1.0: no CFG doubling
    for seg, name in zip(manifest.segments, repo.segment_models):
        version = repo.root / name / "1"
        assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.py", "weights.bin"]
        assert sha256_file(version / "model.onnx") == seg.graphs["portable"].sha256
        assert sha256_file(version / "weights.bin") == manifest.shared_weights.sha256
        assert "SegmentModel as TritonPythonModel" in (version / "model.py").read_text()
        config = _config(repo.root, name)
        assert config.backend == "python" and config.name == name
        assert [(g.count, g.kind) for g in config.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
        assert config.parameters["intra_op_num_threads"].string_value == "1"
        _check_segment_io(config, manifest, repo.max_batch_size)
    upscale = _config(repo.root, "qdit4sr_upscale")
    assert upscale.backend == "python" and upscale.max_batch_size == 0 and not upscale.HasField("dynamic_batching")
    assert [(i.name, i.data_type, list(i.dims)) for i in upscale.input] == [
        ("image", model_config_pb2.TYPE_UINT8, [-1, -1, 3]), ("seed", model_config_pb2.TYPE_INT64, [1])]
    assert [(o.name, o.data_type) for o in upscale.output] == [("sr_image", model_config_pb2.TYPE_UINT8)]
    assert upscale.parameters["segment_models"].string_value == "qdit4sr_segment_00,qdit4sr_segment_01"
    sampler = repo.root / "qdit4sr_upscale" / "1" / "export"
    assert (sampler / "manifest.json").read_text() == (tiny_export / "manifest.json").read_text()
    assert sha256_file(sampler / "bit_plan.json") == manifest.plan.sha256
    record = json.loads((repo.root / layout.REPOSITORY_RECORD).read_text())
    assert record["model_hash"] == manifest.model_hash and record["models"] == repo.models
    assert not list(repo.root.parent.glob(".*staging*"))


def test_the_sampler_verifies_its_files(served_repository, tmp_path):
    sampler = tmp_path / "export"
    shutil.copytree(served_repository.root / "qdit4sr_upscale" / "1" / "export", sampler)
    assert layout.load_serving_manifest(sampler).num_steps == \
        json.loads((sampler / "manifest.json").read_text())["sampler"]["num_inference_steps"]
    plan = sampler / "bit_plan.json"
    plan.write_text(plan.read_text().replace("4", "5", 1))
    with pytest.raises(ManifestError, match="bit plan"):
        layout.load_serving_manifest(sampler)


def test_onnxruntime_form_names_the_graph_and_its_weights(tiny_export, tmp_path):
    import onnxruntime as ort

    from qdit4sr.engines.runtime import SegmentedRunner

    repo = write_model_repository(tiny_export, tmp_path / "repo", RepositorySettings(segment_form="onnxruntime",
                                                                                       intra_op_threads=2))
    manifest = Manifest.load(tiny_export)
    runner = SegmentedRunner(tiny_export, intra_op_num_threads=1)
    rng = np.random.default_rng(1)
    feeds = {s.name: rng.standard_normal([3, *s.shape[1:]]).astype(np.float32) for s in manifest.inputs}
    feeds["timestep"] = np.array([900.0, 500.0, 100.0], dtype=np.float32)
    for index, name in enumerate(repo.segment_models):
        config = _config(repo.root, name)
        assert config.backend == "onnxruntime" and config.default_model_filename == "model.onnx"
        assert config.optimization.graph.level == -1   # ORT_ENABLE_BASIC, as the in-process runtime
        assert config.parameters["intra_op_thread_count"].string_value == "2"
        _check_segment_io(config, manifest, repo.max_batch_size)
        version = repo.root / name / "1"
        assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "weights.bin"]
        # The graph finds its external weights where Triton's onnxruntime backend will load it.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(version / config.default_model_filename), options,
                                       providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(session.run(["velocity"], feeds)[0], runner.backend.run(index, feeds))


@pytest.fixture
def export_with_engines(tiny_export, tmp_path):
    """A copy of the export with stand-in engine files recorded in its manifest (no TensorRT here)."""
    from qdit4sr.engines.build import record_engines

    folder = tmp_path / "with_engines"
    shutil.copytree(tiny_export, folder)
    engines = {}
    for k in range(2):
        (folder / f"segment_{k:02d}.plan").write_bytes(os.urandom(1000 + k))
        engines[k] = folder / f"segment_{k:02d}.plan"
    record_engines(folder, engines)
    return folder


def test_tensorrt_plan_form_names_the_engines(export_with_engines, tmp_path):
    repo = write_model_repository(export_with_engines, tmp_path / "repo",
                                  RepositorySettings(segment_form="tensorrt_plan", max_batch_size=128,
                                                     segment_instances=2))
    manifest = Manifest.load(export_with_engines)
    for seg, name in zip(manifest.segments, repo.segment_models):
        config = _config(repo.root, name)
        assert config.platform == "tensorrt_plan" and not config.backend
        assert config.default_model_filename == "model.plan"
        assert [(g.count, g.kind) for g in config.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_GPU)]
        _check_segment_io(config, manifest, 128)
        version = repo.root / name / "1"
        assert [p.name for p in version.iterdir()] == ["model.plan"]
        assert (version / "model.plan").read_bytes() == seg.engine.resolve(export_with_engines).read_bytes()


def test_tensorrt_plan_form_needs_engines(tiny_export, tmp_path):
    with pytest.raises(RepositoryError, match="no TensorRT engine"):
        write_model_repository(tiny_export, tmp_path / "repo", RepositorySettings(segment_form="tensorrt_plan"))
    assert not (tmp_path / "repo").exists()


def test_a_changed_export_file_is_refused_and_nothing_is_left(tiny_export, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    weights = folder / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))   # same size: only the sha256 can tell
    with pytest.raises(RepositoryError, match="sha256 of weights.bin"):
        write_model_repository(folder, tmp_path / "repo")
    assert not (tmp_path / "repo").exists() and not list(tmp_path.glob(".repo*"))


def test_existing_output_needs_force(tiny_export, tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(RepositoryError, match="--force"):
        write_model_repository(tiny_export, out)
    assert (out / "mine.txt").read_text() == "keep"
    write_model_repository(tiny_export, out, force=True)
    assert not (out / "mine.txt").exists() and (out / "qdit4sr_upscale" / "config.pbtxt").is_file()


@pytest.mark.parametrize("mode", ["hardlink", "symlink"])
def test_linked_files(tiny_export, tmp_path, mode):
    repo = write_model_repository(tiny_export, tmp_path / "repo", RepositorySettings(files=mode, prefix="sr-a"))
    assert repo.upscale_model == "sr-a_upscale"
    placed = repo.root / "sr-a_segment_00" / "1" / "weights.bin"
    assert placed.samefile(tiny_export / "weights.bin")
    assert placed.is_symlink() == (mode == "symlink")


def test_settings_are_checked(tiny_export, tmp_path):
    with pytest.raises(RepositoryError, match="below the 64 tiles"):
        write_model_repository(tiny_export, tmp_path / "a", RepositorySettings(max_batch_size=8))
    with pytest.raises(ValueError, match="segment_form"):
        RepositorySettings(segment_form="tensorflow")
    with pytest.raises(ValueError, match="prefix"):
        RepositorySettings(prefix="a/b")
    with pytest.raises(ManifestError, match="no manifest.json"):
        write_model_repository(tmp_path, tmp_path / "b")


def test_command_line(tiny_export, tmp_path):
    out = tmp_path / "repo"
    result = CliRunner().invoke(triton_repo_command, [str(tiny_export), "--out", str(out), "--segment-form",
                                                      "onnxruntime", "--python-path", ""])
    assert result.exit_code == 0, result.output
    assert "qdit4sr_upscale" in result.output and "2 onnxruntime segment models" in result.output
    assert "_QDIT4SR_PATH = ''" in (out / "qdit4sr_upscale" / "1" / "model.py").read_text()
    again = CliRunner().invoke(triton_repo_command, [str(tiny_export), "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    missing = CliRunner().invoke(triton_repo_command, [str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "is not a folder" in missing.output
    no_engines = CliRunner().invoke(triton_repo_command, [str(tiny_export), "--out", str(tmp_path / "y"),
                                                          "--segment-form", "tensorrt_plan"])
    assert no_engines.exit_code == 2 and "no TensorRT engine" in no_engines.output


# ----------------------------------------------------------------------------- config text

def test_generated_configs_also_pass_the_strict_fallback_parser(served_repository):
    for name in served_repository.models:
        text = (served_repository.root / name / "config.pbtxt").read_text()
        tree = parse_text_format(text)
        assert tree["name"] == [name]
        assert [e["name"][0] for e in tree["input"]] == [i.name for i in _config(served_repository.root, name).input]


@pytest.mark.parametrize("text, message", [
    ('name: "a"\ninput [ { name: "x" ', "ends early"),
    ("dims: [ 1 2 ]", "expected ',' or ']'"),
    ('name "a"', "has no value"),
    ("max_batch_size: 4 }", "expected a field name, found '}'"),
    ("name: @", "unexpected character"),
])
def test_fallback_parser_rejects_malformed_text(text, message):
    with pytest.raises(ModelConfigError, match=message):
        parse_text_format(text)


def test_schema_check_rejects_unknown_fields():
    with pytest.raises(ModelConfigError, match="nmae"):
        check_model_config('nmae: "x"')
    with pytest.raises(ModelConfigError, match="KIND_TPU"):
        check_model_config("instance_group [ { kind: KIND_TPU } ]")
