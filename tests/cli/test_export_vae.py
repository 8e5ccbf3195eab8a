"""qdit4sr-export of a model folder whose codec is a VAE (a vae/ subfolder, as in DiT4SR's): the export
writes the VAE graphs beside the segments and the folder serves without the model folder."""
import json
import shutil
from dataclasses import asdict

import numpy as np

from qdit4sr.artifacts.manifest import VAE_DECODER_FILE, VAE_ENCODER_FILE, Manifest
from tests.cli.conftest import PIPE, run_export


def test_export_with_a_vae_writes_a_self_contained_folder(tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from qdit4sr.engines.runtime import load_exported_pipeline
    from qdit4sr.models.loading import save_transformer
    from qdit4sr.models.onnx_vae import OnnxVAECodec
    from qdit4sr.models.transformer import DiT4SRTransformer2DModel
    from tests.helpers.micro import MICRO_CONFIG, randomize

    model = tmp_path / "model"
    save_transformer(randomize(DiT4SRTransformer2DModel(**MICRO_CONFIG)).eval(), model)
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=MICRO_CONFIG["in_channels"],
                  norm_num_groups=4, scaling_factor=1.5305, shift_factor=0.0609).save_pretrained(model / "vae")
    (model / "pipeline.json").write_text(json.dumps(asdict(PIPE)))

    out = tmp_path / "run" / "engines"
    result = run_export(out, model)
    assert result.exit_code == 0, result.output
    assert "VAE graphs" in result.output   # counted among the deployed files
    codec = json.loads((out / "manifest.json").read_text())["codec"]
    assert codec["encoder"]["path"] == VAE_ENCODER_FILE and codec["decoder"]["path"] == VAE_DECODER_FILE
    assert (codec["scaling"], codec["shift"], codec["downsample"]) == (1.5305, 0.0609, 2)
    assert str(model) not in (out / "manifest.json").read_text()

    # Served from elsewhere, with the model folder gone.
    shutil.rmtree(model)
    moved = tmp_path / "served"
    shutil.move(str(out), str(moved))
    Manifest.load(moved)
    pipe = load_exported_pipeline(moved, intra_op_num_threads=1)
    assert isinstance(pipe.codec, OnnxVAECodec)
    sr = pipe.upscale((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8), seed=0)
    assert sr.shape == (32, 32, 3) and sr.std() > 1
