"""The manifest writer's helpers: the model hash and the codec description."""
import pytest
import torch

from qdit4sr.exporter.manifest_writer import codec_spec, transformer_hash
from qdit4sr.models.latents import PixelUnshuffleCodec
from qdit4sr.models.transformer import DiT4SRTransformer2DModel
from tests.helpers.micro import MICRO_CONFIG, randomize


def test_model_hash_depends_on_weights_and_config():
    a = randomize(DiT4SRTransformer2DModel(**MICRO_CONFIG))
    h = transformer_hash(a)
    assert len(h) == 64 and transformer_hash(a) == h
    with torch.no_grad():
        a.proj_out.bias[0] += 1e-3
    assert transformer_hash(a) != h
    b = randomize(DiT4SRTransformer2DModel(**{**MICRO_CONFIG, "control_conv_scale": 1.0}))
    assert transformer_hash(b) != transformer_hash(randomize(DiT4SRTransformer2DModel(**MICRO_CONFIG)))


def test_codec_spec():
    assert codec_spec(PixelUnshuffleCodec(4, 1.5)) == {"factor": 4, "scaling": 1.5, "kind": "pixel_unshuffle"}
    with pytest.raises(ValueError, match="unknown codec"):
        codec_spec(object())
