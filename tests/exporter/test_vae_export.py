"""A VAE codec exported beside the segment graphs: the ONNX encoder/decoder compute what the torch codec
computes (tiled alike), and the exported folder is self-contained: relative names only, relocatable,
and its upscale matches the torch quantized pipeline."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from qdit4sr.artifacts.manifest import (VAE_DECODER_FILE, VAE_ENCODER_FILE, Manifest, ManifestError,
                                        load_codec_spec)
from qdit4sr.engines.runtime import load_exported_pipeline
from qdit4sr.exporter.manifest_writer import build_manifest, codec_spec
from qdit4sr.exporter.onnx_export import export_segments
from qdit4sr.exporter.vae_export import export_vae
from qdit4sr.models.latents import VAECodec
from qdit4sr.models.onnx_vae import OnnxVAECodec
from tests.helpers.micro import MICRO_CONFIG
from tests.helpers.micro_export import PIPE, TILE, TOKENS, quantized_micro, single_thread

# float32 in both; onnxruntime and torch order the convolution sums differently: measured <= 1.2e-6 on values of ~1.
CODEC_ATOL = 1e-5
VAE_TILE, VAE_OVERLAP = 16, 4   # small tiles, so the 32x32 test images are encoded and decoded in tiles


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def tiny_vae_codec(seed: int = 0) -> VAECodec:
    """A random 2-level AutoencoderKL (downsample 2) with the micro transformer's 12 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=MICRO_CONFIG["in_channels"],
                        norm_num_groups=4, scaling_factor=1.5305, shift_factor=0.0609)
    return VAECodec(vae, tile_px=VAE_TILE, overlap_px=VAE_OVERLAP)


@pytest.fixture(scope="module")
def codec_and_graphs(tmp_path_factory):
    codec = tiny_vae_codec()
    folder = tmp_path_factory.mktemp("vae")
    spec = export_vae(codec, folder)
    return codec, folder, spec


def test_spec_names_the_graphs_relative_with_the_factors(codec_and_graphs):
    codec, folder, spec = codec_and_graphs
    assert spec["encoder"]["path"] == VAE_ENCODER_FILE and spec["decoder"]["path"] == VAE_DECODER_FILE
    assert spec["encoder"]["size"] == (folder / VAE_ENCODER_FILE).stat().st_size
    assert (spec["scaling"], spec["shift"], spec["downsample"], spec["latent_channels"]) == (1.5305, 0.0609, 2, 12)
    assert (spec["tile_px"], spec["overlap_px"]) == (VAE_TILE, VAE_OVERLAP)
    assert codec_spec(codec, spec) == spec
    with pytest.raises(ValueError, match="call export_vae"):
        codec_spec(codec)


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (2, 3, 16, 12), (1, 3, 40, 24)],
                         ids=["small", "batch2", "tiled"])
def test_onnx_graphs_match_the_torch_codec(codec_and_graphs, shape):
    """Shapes other than the traced one (dynamic axes), and one large enough to be tiled (40 > 16)."""
    codec, folder, spec = codec_and_graphs
    onnx_codec = load_codec_spec(spec, folder, intra_op_num_threads=1)
    assert isinstance(onnx_codec, OnnxVAECodec)
    image = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    ref = codec.encode(image)
    got = onnx_codec.encode(image)
    assert got.shape == ref.shape == (shape[0], 12, shape[2] // 2, shape[3] // 2)
    assert (got - ref).abs().max() < CODEC_ATOL, (got - ref).abs().max()
    assert ref.abs().max() > 0.1   # a real signal, not zeros that would match anything
    latent = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    ref_image, got_image = codec.decode(latent), onnx_codec.decode(latent)
    assert got_image.shape == ref_image.shape == shape
    assert (got_image - ref_image).abs().max() < CODEC_ATOL
    assert ref_image.std() > 1e-3


def test_a_bfloat16_vae_is_exported_in_float32_and_stays_bfloat16(tmp_path):
    codec = tiny_vae_codec(seed=3)
    reference = copy.deepcopy(codec)
    codec.to(dtype=torch.bfloat16)
    export_vae(codec, tmp_path)
    assert next(codec.vae.parameters()).dtype == torch.bfloat16
    # The graph holds the float32 values the bf16 model rounds to: close to the fp32 model at bf16 precision.
    onnx_codec = OnnxVAECodec(tmp_path / VAE_ENCODER_FILE, tmp_path / VAE_DECODER_FILE, downsample=2,
                              latent_channels=12, scaling=1.5305, shift=0.0609, tile_px=VAE_TILE,
                              overlap_px=VAE_OVERLAP, intra_op_num_threads=1)
    image = torch.rand(1, 3, 8, 8)
    ref, bf16 = reference.encode(image), codec.encode(image)
    got = onnx_codec.encode(image)
    assert (got - bf16).abs().max() < 0.05 and (got - ref).abs().max() < 0.05


# ----------------------------------------------------------------------------- the exported folder

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The micro W4A4 model with a VAE codec, exported as the export stage does (graphs, VAE, manifest)."""
    q = quantized_micro("qdit4sr", "w4a4", rank=8, num_segments=2, seed=1)
    q.pipeline.codec = tiny_vae_codec(seed=5)
    folder = tmp_path_factory.mktemp("export") / "out"
    exports = export_segments(q.model, q.plan, folder, TILE, TOKENS, flavour="portable", progress=False)
    spec = export_vae(q.pipeline.codec, folder)
    manifest = build_manifest(folder, exports, q.plan, model_hash=q.model_hash, pipeline_config=PIPE,
                              codec=q.pipeline.codec, transformer_config=q.model.config, tile_latent=TILE,
                              text_tokens=TOKENS, prompt=q.pipeline.prompt, vae_spec=spec)
    manifest.save(folder)
    return q, folder


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_manifest_is_relative_and_the_moved_folder_upscales_as_torch(exported, tmp_path):
    """8x8 LR -> 32x32: VAE-encoded in 16-px tiles, 3x3 transformer tiles, 4 steps over 2 segments.

    The VAE graphs agree with torch to ~1e-6 and the segment graphs to ~1e-6 relative per call; after the
    sampler and the uint8 rounding the images are identical but for pixels on a rounding boundary (of the
    uint8 conversion or of an activation Q/DQ tie), which may differ by 1: at most 1 grey level on at
    most 1% of the values (measured: 1 of 3072).
    """
    q, folder = exported
    text = (folder / "manifest.json").read_text()
    assert str(folder) not in text and str(folder.parent) not in text
    assert not [s for s in _strings(json.loads(text)) if s.startswith("/") or ".." in s]
    manifest = Manifest.load(folder)
    assert manifest.codec["encoder"]["path"] == VAE_ENCODER_FILE and "path" not in manifest.codec

    moved = tmp_path / "elsewhere" / "engines"
    shutil.move(str(folder), str(moved))
    try:
        pipe = load_exported_pipeline(moved, flavour="portable", intra_op_num_threads=1)
        assert isinstance(pipe.codec, OnnxVAECodec)
        image = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
        ref = q.pipeline.upscale(image, seed=3)
        got = pipe.upscale(image, seed=3)
    finally:
        shutil.move(str(moved), str(folder))
    assert got.shape == ref.shape == (32, 32, 3)
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (diff.max(), (diff > 0).mean())
    # The comparison can fail: another seed gives another image.
    assert np.abs(ref.astype(int) - q.pipeline.upscale(image, seed=4).astype(int)).max() > 10


def test_a_changed_or_missing_vae_graph_is_refused(exported, tmp_path):
    _, folder = exported
    copy_ = tmp_path / "copy"
    shutil.copytree(folder, copy_)
    with open(copy_ / VAE_DECODER_FILE, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)
    with pytest.raises(ManifestError, match="VAE decoder graph: sha256 of vae_decoder.onnx"):
        Manifest.load(copy_)
    (copy_ / VAE_ENCODER_FILE).unlink()
    with pytest.raises(ManifestError, match="VAE encoder graph: file vae_encoder.onnx is missing"):
        Manifest.load(copy_)


def test_a_manifest_naming_a_vae_folder_asks_for_a_new_export(exported, tmp_path):
    _, folder = exported
    copy_ = tmp_path / "old"
    shutil.copytree(folder, copy_)
    raw = json.loads((copy_ / "manifest.json").read_text())
    raw["codec"] = {"kind": "vae", "path": "/models/dit4sr/vae"}
    (copy_ / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="older export; export it again"):
        Manifest.load(copy_)
    raw["codec"] = {**json.loads((folder / "manifest.json").read_text())["codec"], "latent_channels": 16}
    (copy_ / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="16 latent channels, the transformer takes 12"):
        Manifest.load(copy_)


def test_the_triton_repository_carries_the_vae_graphs(exported, tmp_path):
    """The sampler model runs the codec: the VAE graphs are copied into its export folder and verified."""
    from qdit4sr.serving import layout
    from qdit4sr.serving.triton_repo import RepositorySettings, write_model_repository

    _, folder = exported
    repo = write_model_repository(folder, tmp_path / "repo", RepositorySettings(python_path=""))
    sampler = repo.root / repo.upscale_model / layout.VERSION / layout.EXPORT_SUBDIR
    for name in (VAE_ENCODER_FILE, VAE_DECODER_FILE):
        assert (sampler / name).read_bytes() == (folder / name).read_bytes()
    assert layout.load_serving_manifest(sampler).codec["kind"] == "vae"
    (sampler / VAE_DECODER_FILE).unlink()
    with pytest.raises(ManifestError, match="VAE decoder graph: file vae_decoder.onnx is missing"):
        layout.load_serving_manifest(sampler)
