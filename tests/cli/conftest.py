"""A micro DiT4SR model folder and one export of it, shared by the command-line tests."""
import json
from dataclasses import asdict

import pytest
from click.testing import CliRunner

from qdit4sr.models.pipeline import PipelineConfig

PIPE = PipelineConfig(num_inference_steps=4, shift=1.0, guidance_scale=1.0, tile_size=8, tile_overlap=2,
                      tile_batch=16, min_lr_side=4, color_fix="none")


def run_export(out, model_dir, *extra):
    """qdit4sr-export of the micro model at W4A4 (2 calibration images, 2 segments, rank 4) into `out`."""
    from qdit4sr.cli.export import export_command

    args = ["--precision", "w4a4", "--out", str(out), "--model", str(model_dir), "--calib-count", "2",
            "--segments", "2", "--rank", "4", *extra]
    return CliRunner().invoke(export_command, args)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from qdit4sr.models.latents import PixelUnshuffleCodec
    from qdit4sr.models.loading import save_transformer
    from qdit4sr.models.transformer import DiT4SRTransformer2DModel
    from tests.helpers.micro import MICRO_CONFIG, randomize

    folder = tmp_path_factory.mktemp("micro_model")
    save_transformer(randomize(DiT4SRTransformer2DModel(**MICRO_CONFIG)).eval(), folder)
    PixelUnshuffleCodec().save(folder)
    (folder / "pipeline.json").write_text(json.dumps(asdict(PIPE)))
    return folder


@pytest.fixture(scope="session")
def exported(tmp_path_factory, model_dir):
    """(folder, printed output) of one export; tests must not change the folder (copy it first)."""
    out = tmp_path_factory.mktemp("run") / "engines"
    result = run_export(out, model_dir)
    assert result.exit_code == 0, result.output
    return out, result.output
