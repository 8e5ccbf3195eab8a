"""manifest.json: round trip, and every kind of corruption refused with a ManifestError that names it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qdit4sr.artifacts.manifest import (MANIFEST_FILE, MANIFEST_VERSION, PLAN_FILE, WEIGHTS_FILE, FileRef, Manifest,
                                        ManifestError, load_codec_spec)
from qdit4sr.calibration.plan import BitPlan
from qdit4sr.models.latents import PixelUnshuffleCodec
from tests.helpers.micro import MICRO_CONFIG
from tests.helpers.micro_export import PIPE, TILE, TOKENS, export_micro, quantized_micro


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A two-segment W4A4 export with its manifest (SVD branches: quick to quantize)."""
    q = quantized_micro("svdquant", "w4a4", rank=4, temporal_act_bits=True, num_segments=2)
    out = tmp_path_factory.mktemp("manifest") / "export"
    export_micro(q, out, flavour=("portable", "trt"))
    return out


@pytest.fixture
def copy(folder, tmp_path) -> Path:
    """A private copy to corrupt."""
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _edit(folder: Path, change) -> None:
    raw = json.loads((folder / MANIFEST_FILE).read_text())
    change(raw)
    (folder / MANIFEST_FILE).write_text(json.dumps(raw))


def test_round_trip(folder):
    manifest = Manifest.load(folder)
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.version == MANIFEST_VERSION and manifest.precision == "w4a4"
    assert len(manifest.segments) == 2 and manifest.num_steps == PIPE.num_inference_steps
    assert manifest.flavours == ["portable", "trt"]
    assert manifest.pipeline_config() == PIPE
    assert manifest.segments[0].engine is None
    assert manifest.shared_weights.path == WEIGHTS_FILE and manifest.prompt_embeds is not None
    assert [t.name for t in manifest.inputs] == ["hidden_states", "controlnet_image", "encoder_hidden_states",
                                                "pooled_projections", "timestep"]
    assert manifest.inputs[0].shape == ["batch", MICRO_CONFIG["in_channels"], TILE, TILE]
    assert manifest.inputs[2].shape == ["batch", TOKENS, MICRO_CONFIG["joint_attention_dim"]]
    assert [manifest.segment_of_step(i) for i in range(4)] == [0, 1, 1, 1]
    assert load_codec_spec(manifest.codec, folder) == PixelUnshuffleCodec()
    timesteps = [t for seg in manifest.segments for t in seg.timesteps]
    assert timesteps == BitPlan.load(folder / PLAN_FILE).timesteps and timesteps[0] == 1000.0
    assert all(a > b for a, b in zip(timesteps, timesteps[1:]))


def test_missing_file_is_refused(copy):
    (copy / "segment_01.portable.onnx").unlink()
    with pytest.raises(ManifestError, match="segment 1 portable graph: file segment_01.portable.onnx is missing"):
        Manifest.load(copy)
    with pytest.raises(ManifestError, match=f"no {MANIFEST_FILE}"):
        Manifest.load(copy / "nowhere")


def test_changed_content_is_refused(copy):
    weights = copy / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="shared weights: sha256 of weights.bin does not match"):
        Manifest.load(copy)
    Manifest.load(copy, check_hashes=False)  # the size check alone cannot see it


def test_changed_size_is_refused(copy):
    with open(copy / "segment_00.trt.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match="segment 0 trt graph: .* bytes, the manifest says"):
        Manifest.load(copy, check_hashes=False)


def test_bad_version_is_refused(copy):
    _edit(copy, lambda raw: raw.update(version=MANIFEST_VERSION + 1))
    with pytest.raises(ManifestError, match="version 2 is not supported"):
        Manifest.load(copy)


@pytest.mark.parametrize("steps, match", [
    ([[0, 1], [2, 4]], "not contiguous: segment 1 starts at step 2, expected 1"),
    ([[0, 1], [1, 3]], "cover steps 0..3 but the sampler runs 4 steps"),
    ([[0, 0], [0, 4]], "segment 0 is empty"),
])
def test_non_contiguous_segments_are_refused(copy, steps, match):
    def change(raw):
        for seg, s in zip(raw["segments"], steps):
            seg["steps"] = s
            seg["timesteps"] = [0.0] * (s[1] - s[0])
    _edit(copy, change)
    with pytest.raises(ManifestError, match=match):
        Manifest.load(copy)


def test_truncated_json_is_refused(copy):
    text = (copy / MANIFEST_FILE).read_text()
    (copy / MANIFEST_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(copy)


def test_missing_fields_are_refused(copy):
    _edit(copy, lambda raw: raw.pop("segments"))
    with pytest.raises(ManifestError, match="lacks the fields \\['segments'\\]"):
        Manifest.load(copy)


@pytest.mark.parametrize("change, match", [
    (lambda raw: raw["segments"][0]["graphs"]["trt"].update(path="../outside.onnx"), "must stay inside the folder"),
    (lambda raw: raw["sampler"].update(tile_size=16), "differs from the exported tile"),
    (lambda raw: raw["segments"][1].update(index=5), "has index 5"),
    (lambda raw: raw["segments"][1]["graphs"].pop("trt"), "segment 1 has flavours"),
    (lambda raw: raw["codec"].update(kind="jpeg"), "unknown codec kind"),
])
def test_inconsistent_settings_are_refused(copy, change, match):
    _edit(copy, change)
    with pytest.raises(ManifestError, match=match):
        Manifest.load(copy)


def test_plan_that_disagrees_with_the_segments_is_refused(copy):
    plan = json.loads((copy / PLAN_FILE).read_text())
    plan["segments"] = [[0, 2], [2, 4]]
    (copy / PLAN_FILE).write_text(json.dumps(plan))
    ref = FileRef.of(copy, PLAN_FILE)  # re-hashed, so only the content check can object
    _edit(copy, lambda raw: raw.update(plan={"path": ref.path, "sha256": ref.sha256, "size": ref.size}))
    with pytest.raises(ManifestError, match="differ from the bit plan"):
        Manifest.load(copy)


def test_flavours_limit_the_files_checked_to_those_used(copy):
    """A runtime of one flavour needs only that flavour's graphs; what it uses is still checked in full."""
    for graph in copy.glob("segment_*.trt.onnx"):
        graph.unlink()
    with pytest.raises(ManifestError, match="trt graph: file segment_00.trt.onnx is missing"):
        Manifest.load(copy)
    with pytest.raises(ManifestError, match="trt graph: file segment_00.trt.onnx is missing"):
        Manifest.load(copy, flavours=["trt"])
    assert Manifest.load(copy, flavours=["portable"]).flavours == ["portable", "trt"]   # the record is unchanged
    data = bytearray((copy / "segment_01.portable.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "segment_01.portable.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="segment 1 portable graph: sha256"):
        Manifest.load(copy, flavours=["portable"])
    (copy / WEIGHTS_FILE).unlink()   # shared by every flavour: always checked
    with pytest.raises(ManifestError, match="shared weights"):
        Manifest.load(copy, flavours=["portable"], check_hashes=False)


def test_unknown_or_absent_flavour_is_refused(folder, tmp_path):
    with pytest.raises(ValueError, match="flavour must be one of"):
        Manifest.load(folder, flavours=["onnx"])
    portable_only = tmp_path / "p"
    export_micro(quantized_micro("rtn", "w8a8", num_segments=1), portable_only, flavour="portable")
    with pytest.raises(ManifestError, match="the folder has no trt graphs \\(it has portable\\)"):
        Manifest.load(portable_only, flavours=["trt"])
