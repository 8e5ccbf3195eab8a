"""qdit4sr-upscale end to end on the micro export: output, progress and cost, image conversions, the checks
made before any denoising, and a folder that lacks the flavour it does not use."""
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from qdit4sr.cli.upscale import upscale_command


def _upscale(image, engines, output, *extra):
    return CliRunner().invoke(upscale_command, [str(image), "--engines", str(engines), "-o", str(output), *extra])


@pytest.fixture
def no_denoising(monkeypatch):
    """Fail the test if the folder is even loaded: what must be refused before any denoising."""
    from qdit4sr.engines import runtime

    def refuse(*args, **kwargs):
        raise AssertionError("the exported folder was loaded before the input was checked")

    monkeypatch.setattr(runtime, "load_exported_pipeline", refuse)


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

def test_upscale_trt_flavour_needs_engines(exported, tmp_path):
    out, _ = exported
    Image.new("RGB", (16, 16)).save(tmp_path / "lr.png")
    r = CliRunner().invoke(upscale_command, [str(tmp_path / "lr.png"), "--engines", str(out), "-o",
                                             str(tmp_path / "sr.png"), "--flavour", "trt"])
    assert r.exit_code == 2 and "error:" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "sr.png").exists()


def test_upscale_states_the_cost_and_shows_progress(exported, tmp_path):
    out, _ = exported
    Image.fromarray(np.full((12, 10, 3), 90, np.uint8)).save(tmp_path / "lr.png")
    r = _upscale(tmp_path / "lr.png", out, tmp_path / "sr.png")
    assert r.exit_code == 0, r.output
    # 12x10 -> 48x40, pixel-unshuffle x2 -> a 24x20 latent, tiles of 8 overlapping by 2: 4 x 3 tiles.
    # The flavour named is the one that runs: the default resolved for this folder (cpu graphs, no engines).
    assert "lr.png: 10x12 -> 40x48: 4 sampler steps x 12 latent tile(s) of 8x8 = 48 tile passes in 4 cpu " \
           "transformer call(s)" in r.stderr
    assert "denoising" in r.stderr and "48/48" in r.stderr        # the tqdm bar, on stderr
    assert "first step took" in r.stderr and "for the other 3 step(s)" in r.stderr
    assert r.stdout.strip() == f"wrote {tmp_path / 'sr.png'} (40x48)"
    quiet = _upscale(tmp_path / "lr.png", out, tmp_path / "sr2.png", "--no-progress")
    assert quiet.exit_code == 0 and "48/48" not in quiet.stderr and "48 tile passes" in quiet.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sr.png")), np.asarray(Image.open(tmp_path / "sr2.png")))


def test_rgba_is_composited_on_white_and_said(exported, tmp_path):
    out, _ = exported
    rgba = np.zeros((12, 10, 4), np.uint8)
    rgba[..., 1] = 180
    rgba[:6, :, 3] = 255                      # top half opaque green, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    white = np.full((12, 10, 3), 255, np.uint8)
    white[:6] = (0, 180, 0)
    Image.fromarray(white).save(tmp_path / "w.png")
    r = _upscale(tmp_path / "a.png", out, tmp_path / "a_x4.png", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "warning:" in r.stderr and "composited on a white background (60 of 120 pixels" in r.stderr
    assert _upscale(tmp_path / "w.png", out, tmp_path / "w_x4.png", "--no-progress").exit_code == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a_x4.png")), np.asarray(Image.open(tmp_path / "w_x4.png")))


def test_sixteen_bit_greyscale_is_converted(exported, tmp_path):
    out, _ = exported
    Image.fromarray((np.arange(120).reshape(12, 10) * 500).astype(np.uint16)).save(tmp_path / "g16.png")
    r = _upscale(tmp_path / "g16.png", out, tmp_path / "g_x4.png", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "16-bit greyscale image: scaled to 8 bits" in r.stderr
    assert np.asarray(Image.open(tmp_path / "g_x4.png")).shape == (48, 40, 3)


def test_unwritable_output_is_refused_before_denoising(exported, tmp_path, no_denoising, monkeypatch):
    out, _ = exported
    Image.new("RGB", (10, 10)).save(tmp_path / "lr.png")
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "sr.png"     # its folder would have to be a regular file
    r = _upscale(tmp_path / "lr.png", out, target)
    assert r.exit_code == 2 and r.stderr.startswith(f"error: cannot write {target}: ")
    assert len(r.stderr.strip().splitlines()) == 1 and ".tmp" not in r.stderr

    import tempfile

    def denied(*args, **kwargs):              # a read-only folder (root ignores chmod, so simulated)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    r = _upscale(tmp_path / "lr.png", out, tmp_path / "ro" / "sr.png")
    assert r.exit_code == 2 and r.stderr.strip() == f"error: cannot write {tmp_path / 'ro' / 'sr.png'}: Permission denied"


def test_unsupported_image_is_refused_before_denoising(exported, tmp_path, no_denoising):
    out, _ = exported
    Image.new("F", (10, 10)).save(tmp_path / "f.tif")
    r = _upscale(tmp_path / "f.tif", out, tmp_path / "x.png")
    assert r.exit_code == 2 and "mode F is not supported; use an 8-bit RGB or greyscale image" in r.stderr


def test_missing_graphs_of_the_unused_flavour_do_not_matter(exported, tmp_path):
    """Deleting the trt graphs leaves the other runs intact; damaging a graph a run uses is still caught,
    and only by the run that uses it."""
    folder = tmp_path / "engines"
    shutil.copytree(exported[0], folder)
    for graph in folder.glob("segment_*.trt.onnx"):
        graph.unlink()
    Image.new("RGB", (10, 10), (40, 80, 120)).save(tmp_path / "lr.png")
    r = _upscale(tmp_path / "lr.png", folder, tmp_path / "sr.png", "--no-progress", "--flavour", "portable")
    assert r.exit_code == 0, r.output
    r = _upscale(tmp_path / "lr.png", folder, tmp_path / "t.png", "--flavour", "trt")
    assert r.exit_code == 2 and "segment 0 trt graph: file segment_00.trt.onnx is missing" in r.stderr
    graph = folder / "segment_01.portable.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    r = _upscale(tmp_path / "lr.png", folder, tmp_path / "x.png", "--flavour", "portable")
    assert r.exit_code == 2 and "sha256 of segment_01.portable.onnx does not match" in r.stderr
    assert not (tmp_path / "x.png").exists()
    r = _upscale(tmp_path / "lr.png", folder, tmp_path / "cpu.png", "--no-progress")   # the default reads cpu graphs
    assert r.exit_code == 0 and "in 4 cpu transformer call(s)" in r.stderr, r.output


def test_upscale_with_per_request_prompt_embeddings(exported, tmp_path):
    """--prompt-embeds conditions this image on other embeddings (the export's have 4 null tokens): the
    result differs from the default's; a file that does not fit the graphs is refused in one line."""
    import torch
    from safetensors.torch import save_file

    out, _ = exported
    image = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((10, 10, 3)) * 255).astype(np.uint8)).save(image)
    gen = torch.Generator().manual_seed(0)
    save_file({"prompt_embeds": torch.randn(1, 4, 32, generator=gen) * 3,
               "pooled_prompt_embeds": torch.randn(1, 32, generator=gen) * 3}, str(tmp_path / "caption.safetensors"))
    r = _upscale(image, out, tmp_path / "a.png", "--prompt-embeds", str(tmp_path / "caption.safetensors"),
                 "--no-progress")
    assert r.exit_code == 0, r.output
    assert "conditioning: caption.safetensors, 4 text tokens, no CFG (no negative prompt)" in r.output
    r = _upscale(image, out, tmp_path / "b.png", "--no-progress")
    assert r.exit_code == 0 and "conditioning: the export's prompt embeddings, 4 text tokens" in r.output
    assert np.asarray(Image.open(tmp_path / "a.png")).tolist() != np.asarray(Image.open(tmp_path / "b.png")).tolist()
    save_file({"prompt_embeds": torch.zeros(1, 7, 32), "pooled_prompt_embeds": torch.zeros(1, 32)},
              str(tmp_path / "long.safetensors"))
    r = _upscale(image, out, tmp_path / "c.png", "--prompt-embeds", str(tmp_path / "long.safetensors"))
    assert r.exit_code == 2 and not (tmp_path / "c.png").exists()
    assert r.output.strip().splitlines()[-1] == (
        "error: --prompt-embeds long.safetensors: prompt embeddings do not fit the transformer (its exported graphs "
        "take 4 text tokens): prompt_embeds has shape [1, 7, 32], expected [1, 4, 32]")
    r = _upscale(image, out, tmp_path / "c.png", "--prompt-embeds", str(tmp_path / "none.safetensors"))
    assert r.exit_code == 2 and "error: --prompt-embeds: prompt embeddings file" in r.output
