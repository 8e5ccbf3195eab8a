"""qdit4sr-serve (C++) against the Python runtime on the tiny default's W4A4 export.

Tolerance: at most one grey level on at most 0.1% of the values. Both runtimes run the same graphs
on the same ONNX Runtime version with the same settings, the same noise (qdit4sr.noise), and the same
float32 operations in the same order; the resizes and colour statistics are computed in float64 and
rounded once. What can still differ is a float64 result within a few float64 ulps of a float32
rounding tie (about one value in 10^6 of the bicubic condition image), which moves that value by
one float32 ulp and, through the quantized graphs, can move an output pixel by one grey level. On
the images below the outputs are identical, which the tests report when they are not.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from qdit4sr.artifacts.manifest import FileRef
from qdit4sr.engines.runtime import load_exported_pipeline
from qdit4sr.models.images import load_photo

from .cpp_build import run

MAX_DIFFERENT = 0.001


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return load_photo("chelsea")


def _save(image: np.ndarray, path: Path) -> Path:
    Image.fromarray(image).save(path)
    return path


def _serve(tools, folder: Path, pairs: list[tuple[Path, Path]], *extra) -> subprocess.CompletedProcess:
    args = [tools.serve, "--engines", folder, *extra]
    for lr, sr in pairs:
        args += ["-i", lr, "-o", sr]
    return run(args, timeout=600)


_PIPELINES: dict[Path, object] = {}


def _python(folder: Path, image: np.ndarray, seed: int) -> np.ndarray:
    """The Python runtime's image (each folder's pipeline loaded once)."""
    if folder not in _PIPELINES:
        _PIPELINES[folder] = load_exported_pipeline(folder)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _PIPELINES[folder].upscale(image, seed=seed)
    finally:
        torch.set_num_threads(before)


def _assert_same(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= MAX_DIFFERENT, (diff.max(), int((diff > 0).sum()))


def _derived(folder: Path, out: Path, **changes) -> Path:
    """A folder whose files link to `folder`'s, with manifest.json fields replaced (not hashed itself)."""
    out.mkdir()
    for f in folder.iterdir():
        if f.is_file() and f.name != "manifest.json":
            os.symlink(f, out / f.name)
    manifest = json.loads((folder / "manifest.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key] = {**manifest[key], **value}
        else:
            manifest[key] = value
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


# ----------------------------------------------------------------------------- equality with Python

@pytest.mark.parametrize("name, crop, tiles", [("one-tile", (slice(100, 108), slice(200, 208)), 1),
                                               ("multi-tile", (slice(60, 70), slice(150, 162)), 6)])
def test_same_png_as_the_python_runtime(cpp_tools, tiny_export, photo, tmp_path, name, crop, tiles):
    """8x8 LR -> one 16x16 latent tile; 10x12 LR -> a 20x24 latent in 2x3 overlapping tiles (overlap 10)."""
    lr = photo[crop]
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    latent = [2 * s for s in lr.shape[:2]]   # x4, then the pixel-unshuffle codec halves it
    from qdit4sr.models.tiling import tile_windows

    assert len(tile_windows(*latent, manifest["tile_latent"], manifest["sampler"]["tile_overlap"])) == tiles
    result = _serve(cpp_tools, tiny_export, [(_save(lr, tmp_path / "lr.png"), tmp_path / "sr.png")], "--seed", "11")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    got = np.asarray(Image.open(tmp_path / "sr.png"))
    ref = _python(tiny_export, lr, seed=11)
    _assert_same(got, ref)
    # The comparison is sharp: another seed gives another image.
    assert np.abs(ref.astype(int) - _python(tiny_export, lr, seed=12).astype(int)).max() > 10


def test_enlarged_small_input_and_guidance(cpp_tools, tiny_export, photo, tmp_path):
    """The paths the tiny default does not take: min_lr_side enlargement with the antialiased resize back
    down, and classifier-free guidance with negative prompt embeddings."""
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    tokens, dim = manifest["text_tokens"], manifest["transformer"]["joint_attention_dim"]
    pooled = manifest["transformer"]["pooled_projection_dim"]
    gen = torch.Generator().manual_seed(0)
    prompt = {"prompt_embeds": torch.randn(1, tokens, dim, generator=gen),
              "pooled_prompt_embeds": torch.randn(1, pooled, generator=gen),
              "negative_prompt_embeds": torch.randn(1, tokens, dim, generator=gen),
              "negative_pooled_prompt_embeds": torch.randn(1, pooled, generator=gen)}
    folder = _derived(tiny_export, tmp_path / "variant", sampler={"min_lr_side": 12, "guidance_scale": 3.0})
    save_file(prompt, str(folder / "prompt.safetensors"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["prompt_embeds"] = FileRef.of(folder, "prompt.safetensors").__dict__
    (folder / "manifest.json").write_text(json.dumps(manifest))
    lr = photo[100:108, 200:210]                     # 8x10: enlarged x1.5 to 12x15, 48x60 sampled, 32x40 out
    result = _serve(cpp_tools, folder, [(_save(lr, tmp_path / "lr.png"), tmp_path / "sr.png")], "--seed", "5")
    assert result.returncode == 0, result.stderr
    got = np.asarray(Image.open(tmp_path / "sr.png"))
    ref = _python(folder, lr, seed=5)
    assert _PIPELINES[folder]._use_cfg()
    assert ref.shape == (32, 40, 3)
    _assert_same(got, ref)


def test_four_threads_share_one_runtime(cpp_tools, tiny_export, photo, tmp_path):
    """4 request threads on one runtime object give the images of one-at-a-time runs."""
    crops = [photo[60:68, 150:158], photo[200:209, 300:308], photo[10:18, 20:30], photo[120:128, 90:98]]
    lrs = [_save(c, tmp_path / f"lr{k}.png") for k, c in enumerate(crops)]
    together = _serve(cpp_tools, tiny_export, [(lr, tmp_path / f"par{k}.png") for k, lr in enumerate(lrs)],
                      "--parallel", "4")
    assert together.returncode == 0, together.stderr
    alone = _serve(cpp_tools, tiny_export, [(lr, tmp_path / f"seq{k}.png") for k, lr in enumerate(lrs)],
                   "--parallel", "1")
    assert alone.returncode == 0, alone.stderr
    images = []
    for k in range(4):
        par, seq = (np.asarray(Image.open(tmp_path / f"{kind}{k}.png")) for kind in ("par", "seq"))
        np.testing.assert_array_equal(par, seq)
        images.append(seq)
    assert len({im.tobytes() for im in images}) == 4


# ----------------------------------------------------------------------------- refusals

def _copy(tiny_export: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(tiny_export, folder, ignore=shutil.ignore_patterns("calibration", "quantized"))
    return folder


def _corrupt_weights(folder: Path) -> str:
    data = bytearray((folder / "weights.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "weights.bin").write_bytes(bytes(data))
    return "shared weights: sha256 of weights.bin does not match the manifest (file changed)"


def _missing_segment(folder: Path) -> str:
    (folder / "segment_01.portable.onnx").unlink()
    return "segment 1 portable graph: file segment_01.portable.onnx is missing"


def _segment_entry_removed(folder: Path) -> str:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["segments"] = manifest["segments"][:-1]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    last = max(segment["steps"][1] for segment in manifest["segments"])   # the covered [0, last) range
    return f"segments cover steps 0..{last} but the sampler runs {manifest['sampler']['num_inference_steps']} steps"


def _invalid_json(folder: Path) -> str:
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text[: len(text) // 2])
    return "manifest.json is not valid JSON (truncated or corrupted?)"


def _edit_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _unknown_codec(folder: Path) -> str:
    _edit_manifest(folder, codec={"kind": "wavelet", "levels": 2})
    return "unknown codec kind 'wavelet'"


def _vae_without_graphs(folder: Path) -> str:
    _edit_manifest(folder, codec={"kind": "vae", "path": "vae"})
    return "unsupported codec 'vae'"


def _vae_with_graphs(folder: Path) -> str:
    """An export with a VAE codec: its graphs are verified, then refused (the C++ runtime has no VAE)."""
    refs = {}
    for part in ("encoder", "decoder"):
        path = folder / f"vae_{part}.onnx"
        path.write_bytes(part.encode())
        refs[part] = {"path": path.name, "sha256": hashlib.sha256(part.encode()).hexdigest(), "size": len(part)}
    _edit_manifest(folder, codec={"kind": "vae", **refs, "scaling": 1.5305, "shift": 0.0609, "downsample": 8,
                                  "latent_channels": 16, "tile_px": 512, "overlap_px": 64})
    return "unsupported codec 'vae': the C++ runtime runs only the pixel_unshuffle codec"


def _wrong_timesteps(folder: Path) -> str:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sampler"]["shift"] = 1.0
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return "lists timestep"


def _truncated_graph(folder: Path) -> str:
    path = folder / "segment_00.portable.onnx"
    path.write_bytes(path.read_bytes()[:-10])
    return "segment 0 portable graph: segment_00.portable.onnx has"


@pytest.mark.parametrize("damage", [_corrupt_weights, _missing_segment, _segment_entry_removed, _invalid_json,
                                    _unknown_codec, _vae_without_graphs, _vae_with_graphs, _wrong_timesteps, _truncated_graph])
def test_damaged_folders_are_refused_in_one_line(cpp_tools, tiny_export, photo, tmp_path, damage):
    folder = _copy(tiny_export, tmp_path)
    expected = damage(folder)
    lr = _save(photo[100:108, 200:208], tmp_path / "lr.png")
    result = _serve(cpp_tools, folder, [(lr, tmp_path / "out" / "sr.png")])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_requests_write_nothing(cpp_tools, tiny_export, photo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cases = [([tmp_path / "none.png"], "cannot open image"),
             ([_save(photo[:6, :20], tmp_path / "tiny.png")], "too small"),
             ([tmp_path / "lr.txt"], "is not a PNG file")]
    (tmp_path / "lr.txt").write_text("not an image")
    for inputs, expected in cases:
        result = _serve(cpp_tools, tiny_export, [(inputs[0], out / "sr.png")])
        assert result.returncode == 2 and expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    result = run([cpp_tools.serve, "--engines", tiny_export, "-i", tmp_path / "lr.txt"])
    assert result.returncode == 2 and "every -i needs its own -o" in result.stderr
    result = _serve(cpp_tools, tiny_export, [(tmp_path / "tiny.png", out / "sr.png")], "--backend", "tensorrt")
    assert result.returncode == 2 and "TensorRT" in result.stderr
    assert list(out.iterdir()) == []


def test_concurrent_writers_never_expose_a_partial_png(cpp_tools, tiny_export, photo, tmp_path):
    """The output appears complete or not at all (temporary file + rename), even while being replaced."""
    lr = _save(photo[100:108, 200:208], tmp_path / "lr.png")
    target = tmp_path / "sr.png"
    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            time.sleep(0.002)
            if target.exists():
                try:
                    with Image.open(target) as im:
                        im.load()
                        seen.append(im.size)
                except FileNotFoundError:
                    pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = _serve(cpp_tools, tiny_export, [(lr, target)] * 3)
    finally:
        stop.set()
        watcher.join(timeout=30)
    assert result.returncode == 0, result.stderr
    assert seen and all(size == (32, 32) for size in seen)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
