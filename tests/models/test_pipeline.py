import numpy as np
import pytest
import torch

from qdit4sr.models.latents import PixelUnshuffleCodec, VAECodec
from qdit4sr.models.pipeline import DiT4SRPipeline, PipelineConfig, adain_color_fix
from qdit4sr.models.step_context import current_step

SMALL = PipelineConfig(num_inference_steps=3, shift=1.0, guidance_scale=1.0, tile_size=8, tile_overlap=4,
                       tile_batch=4, min_lr_side=4, color_fix="none")


class PointwiseModel(torch.nn.Module):
    """A stand-in whose output at a pixel depends only on that pixel: tiling must not change it."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.seen_steps = []

    def forward(self, x, lr, text, pooled, t):
        self.seen_steps.append(current_step())
        return torch.tanh(x - 0.5 * lr) * (t.view(-1, 1, 1, 1) / 1000.0)


class _Cfg(dict):
    __getattr__ = dict.__getitem__


def _pointwise_pipeline(config=SMALL):
    cfg = _Cfg(joint_attention_dim=4, pooled_projection_dim=4, patch_size=2)
    return DiT4SRPipeline(PointwiseModel(cfg), PixelUnshuffleCodec(), config)


def test_tiled_equals_untiled_when_one_tile(micro_model):
    pipe = DiT4SRPipeline(micro_model, PixelUnshuffleCodec(), SMALL)
    lr = torch.randn(1, 12, 8, 8)
    a = pipe.denoise(lr, 3, tiled=True)
    b = pipe.denoise(lr, 3, tiled=False)
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_gaussian_blending_is_exact_for_a_pointwise_model():
    pipe = _pointwise_pipeline()
    lr = torch.randn(1, 12, 20, 14)
    a = pipe.denoise(lr, 0, tiled=True)
    b = pipe.denoise(lr, 0, tiled=False)
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_tiling_differs_for_a_real_model_on_a_large_latent(micro_model):
    # Sanity check that the multi-tile path is really taken (attention sees only its tile).
    pipe = DiT4SRPipeline(micro_model, PixelUnshuffleCodec(), SMALL)
    lr = torch.randn(1, 12, 16, 16)
    a = pipe.denoise(lr, 0, tiled=True)
    b = pipe.denoise(lr, 0, tiled=False)
    assert (a - b).abs().max() > 1e-4


def test_step_hooks_see_every_step():
    pipe = _pointwise_pipeline()
    calls = []
    pipe.step_callbacks.append(lambda i, t: calls.append((i, t)))
    pipe.denoise(torch.zeros(1, 12, 8, 8), 0)
    assert [i for i, _ in calls] == [0, 1, 2]
    assert calls[0][1] == pytest.approx(1000.0)
    assert pipe.transformer.seen_steps == [0, 1, 2]
    assert current_step() is None


def test_sampler_follows_flow_matching_euler():
    # With v = eps - x0 exactly known, Euler integration from noise lands on x0.
    x0 = torch.randn(1, 12, 8, 8)

    class Oracle(PointwiseModel):
        def forward(self, x, lr, text, pooled, t):
            sigma = t.view(-1, 1, 1, 1) / 1000.0
            return (x - x0) / sigma.clamp_min(1e-6)

    pipe = DiT4SRPipeline(Oracle(_Cfg(joint_attention_dim=4, pooled_projection_dim=4, patch_size=2)),
                          PixelUnshuffleCodec(), SMALL)
    out = pipe.denoise(torch.zeros_like(x0), 0)
    assert torch.allclose(out, x0, atol=1e-5)


def test_upscale_shapes_determinism_and_errors(micro_model):
    pipe = DiT4SRPipeline(micro_model, PixelUnshuffleCodec(), SMALL)
    image = (np.random.default_rng(0).random((9, 11, 3)) * 255).astype(np.uint8)
    a = pipe.upscale(image, seed=1)
    assert a.shape == (36, 44, 3) and a.dtype == np.uint8
    assert np.array_equal(a, pipe.upscale(image, seed=1))
    with pytest.raises(ValueError, match="too small"):
        pipe.upscale(image[:4, :4])
    with pytest.raises(ValueError, match="uint8"):
        pipe.upscale(image.astype(np.float32))
    with pytest.raises(ValueError, match="RGB"):
        pipe.upscale(image[..., 0:2])


def test_classifier_free_guidance_combines_both_branches(micro_model, micro_config):
    from qdit4sr.models.pipeline import PromptEmbeddings

    gen = torch.Generator().manual_seed(0)
    prompt = PromptEmbeddings(torch.randn(1, 3, micro_config["joint_attention_dim"], generator=gen),
                              torch.randn(1, micro_config["pooled_projection_dim"], generator=gen),
                              torch.randn(1, 3, micro_config["joint_attention_dim"], generator=gen),
                              torch.randn(1, micro_config["pooled_projection_dim"], generator=gen))
    cfg = PipelineConfig(**{**SMALL.__dict__, "guidance_scale": 4.0})
    pipe = DiT4SRPipeline(micro_model, PixelUnshuffleCodec(), cfg, prompt)
    x, lr, t = torch.randn(1, 12, 8, 8), torch.randn(1, 12, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        v = pipe.predict_velocity(x, lr, t)
        vc = micro_model(x, lr, prompt.prompt_embeds, prompt.pooled_prompt_embeds, t)
        vu = micro_model(x, lr, prompt.negative_prompt_embeds, prompt.negative_pooled_prompt_embeds, t)
    assert torch.allclose(v, vu + 4.0 * (vc - vu), atol=1e-5)


def test_pixel_unshuffle_codec_is_invertible():
    codec = PixelUnshuffleCodec()
    image = torch.rand(1, 3, 16, 12)
    latent = codec.encode(image)
    assert latent.shape == (1, 12, 8, 6)
    assert torch.allclose(codec.decode(latent), image, atol=1e-6)


def test_vae_codec_with_a_small_random_autoencoder():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        scaling_factor=1.5305, shift_factor=0.0609)
    codec = VAECodec(vae)
    latent = codec.encode(torch.rand(1, 3, 16, 16))
    assert latent.shape == (1, 4, 8, 8) and codec.downsample == 2
    assert codec.decode(latent).shape == (1, 3, 16, 16)


def test_adain_color_fix_matches_reference_statistics():
    img, ref = torch.rand(1, 3, 8, 8) * 0.5, torch.rand(1, 3, 8, 8) * 0.5 + 0.25
    fixed = adain_color_fix(img, ref)
    assert torch.allclose(fixed.mean((-2, -1)), ref.mean((-2, -1)), atol=1e-4)


class _CountingModel(PointwiseModel):
    def __init__(self, config):
        super().__init__(config)
        self.batches = []

    def forward(self, x, lr, text, pooled, t):
        self.batches.append(x.shape[0])
        return super().forward(x, lr, text, pooled, t)


@pytest.mark.parametrize("shape", [(9, 11), (12, 40), (30, 8), (8, 8)])
def test_upscale_work_counts_what_upscale_does(shape):
    """The announced steps x tiles and transformer calls are what the run then does, and the tile
    callbacks (the progress bar) add up to the announced total."""
    cfg = _Cfg(joint_attention_dim=4, pooled_projection_dim=4, patch_size=2)
    pipe = DiT4SRPipeline(_CountingModel(cfg), PixelUnshuffleCodec(), SMALL)
    image = np.zeros((*shape, 3), np.uint8)
    work = pipe.upscale_work(image.shape)
    ticks = []
    pipe.tile_callbacks.append(ticks.append)
    out = pipe.upscale(image)
    assert out.shape[:2] == (shape[0] * 4, shape[1] * 4) and work.output_size == (shape[1] * 4, shape[0] * 4)
    assert sum(ticks) == work.tile_passes == work.steps * work.tiles
    assert len(pipe.transformer.batches) == work.transformer_calls
    assert sum(pipe.transformer.batches) == work.tile_passes  # no guidance here: one batch row per tile
    assert work.steps == SMALL.num_inference_steps


def test_upscale_work_of_a_large_input():
    pipe = _pointwise_pipeline()
    work = pipe.upscale_work((100, 60, 3))
    # 400x240 output, pixel-unshuffle x2 -> 200x120 latent, tiles of 8 overlapping by 4: 49 x 29.
    assert (work.latent_size, work.tiles) == ((120, 200), 29 * 49)
    assert work.transformer_calls == 3 * -(-29 * 49 // 4)


def test_rgba_arrays_and_images_are_composited_on_white(micro_model):
    pipe = DiT4SRPipeline(micro_model, PixelUnshuffleCodec(), SMALL)
    rgba = np.zeros((9, 9, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :4, 3] = 255          # left part opaque red, the rest fully transparent
    white = np.full((9, 9, 3), 255, np.uint8)
    white[:, :4] = (200, 0, 0)
    with pytest.warns(UserWarning, match="composited on a white background"):
        a = pipe.upscale(rgba)
    assert np.array_equal(a, pipe.upscale(white))
