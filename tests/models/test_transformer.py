import pytest
import torch

from qdit4sr.models.config import DIT4SR_CONFIG
from qdit4sr.models.transformer import DiT4SRTransformer2DModel
from tests.helpers.micro import micro_inputs, randomize


def test_forward_matches_float64_reference(micro_model, micro_config):
    inputs = micro_inputs(micro_config)
    with torch.no_grad():
        out32 = micro_model(*inputs)
        ref = micro_model.double()(*[t.double() for t in inputs])
    assert out32.shape == inputs[0].shape
    err = (out32.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= 1e-5 * max(1.0, scale), f"max abs error {err:.3e} vs output scale {scale:.3e}"


def test_full_size_config_on_meta_has_published_parameter_count():
    with torch.device("meta"):
        model = DiT4SRTransformer2DModel(**DIT4SR_CONFIG)
    count = sum(p.numel() for p in model.parameters())
    # About 2.717 B counted over every layer, including attn2's unused text projections.
    assert count == 2_716_814_144
    assert all(p.is_meta for p in model.parameters())
    keys = model.state_dict().keys()
    for key in ("transformer_blocks.0.attn.to_q_control.weight", "transformer_blocks.0.attn2.to_out_control.bias",
                "transformer_blocks.5.ff.control_conv.weight", "transformer_blocks.23.attn.add_q_proj.weight",
                "pos_embed.pos_embed", "context_embedder.weight"):
        assert key in keys
    assert "transformer_blocks.23.attn.to_add_out.weight" not in keys  # last block: context pre-only
    assert "transformer_blocks.13.attn2.to_q.weight" not in keys       # dual attention in blocks 0..12 only


def test_dit4sr_q_ignores_to_k_control_and_r1_uses_it(micro_config):
    for variant, should_change in (("dit4sr_q", False), ("dit4sr_r1", True)):
        model = randomize(DiT4SRTransformer2DModel(**{**micro_config, "variant": variant})).eval()
        inputs = micro_inputs(micro_config)
        with torch.no_grad():
            before = model(*inputs)
            model.transformer_blocks[1].attn.to_k_control.weight.mul_(3.0)
            after = model(*inputs)
        assert (not torch.equal(before, after)) == should_change, variant


def test_lr_stream_changes_output(micro_model, micro_config):
    x, lr, text, pooled, t = micro_inputs(micro_config)
    with torch.no_grad():
        a = micro_model(x, lr, text, pooled, t)
        b = micro_model(x, lr + 1.0, text, pooled, t)
    assert (a - b).abs().max() > 1e-4


def test_bad_shapes_are_rejected(micro_model, micro_config):
    x, lr, text, pooled, t = micro_inputs(micro_config)
    with pytest.raises(ValueError, match="same shape"):
        micro_model(x, lr[..., :6, :6], text, pooled, t)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        micro_model(x[..., :7, :7], lr[..., :7, :7], text, pooled, t)
    with pytest.raises(ValueError, match="variant"):
        DiT4SRTransformer2DModel(**{**micro_config, "variant": "nope"})
