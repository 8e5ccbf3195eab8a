"""8-bit softmax input: the explicit attention path, the calibrated logit range, the quantizer's error bound,
and how quantize_ / the bit plan carry it."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from qdit4sr.calibration.api import quantize_
from qdit4sr.calibration.plan import BitPlan, QDiT4SRConfig
from qdit4sr.calibration.qlinear import segment_scope
from qdit4sr.calibration.qsoftmax import (LogitRecorder, QuantSoftmax, attention_cores, quantized_softmaxes,
                                          softmax_scale)
from qdit4sr.calibration.quantizer import qmax
from qdit4sr.models.transformer import AttentionCore
from tests.calibration.conftest import fresh_model
from tests.helpers.micro import micro_inputs


def _heads(seed: int, tokens: int = 37, dim: int = 32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, tokens, dim, generator=gen) for _ in range(3)]


def test_explicit_attention_matches_sdpa():
    q, k, v = _heads(0)
    core = AttentionCore()
    fused = core(q, k, v)
    core.softmax = LogitRecorder(lambda logits: None)
    explicit = core(q, k, v)
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v.double()
    assert (explicit.double() - ref).abs().max() < 1e-5
    assert (fused.double() - ref).abs().max() < 1e-5


def test_quant_softmax_equals_the_formula_in_float64():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    s = 0.05
    got = QuantSoftmax([s], [0])(logits)
    codes = torch.clamp(torch.round(logits / s), -127, 127)
    assert torch.allclose(got, torch.softmax(codes * s, -1), atol=1e-15)
    # codes really saturate: a logit beyond 127 s is clipped
    big = torch.tensor([[0.0, 100.0]], dtype=torch.float64)
    assert torch.allclose(QuantSoftmax([s], [0])(big), torch.softmax(torch.tensor([[0.0, 127 * s]]).double(), -1))


@pytest.mark.parametrize("scale", [0.01, 0.05, 0.2])
def test_quantization_error_stays_within_the_rounding_bound(scale):
    """Logits moved by at most s/2 each change every probability by a factor within [e^-s, e^s]."""
    logits = torch.rand(8, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 100 * scale
    p, p_q = torch.softmax(logits, -1), QuantSoftmax([scale], [0])(logits)
    ratio = p_q / p
    assert ratio.max() <= math.exp(scale) * (1 + 1e-12) and ratio.min() >= math.exp(-scale) * (1 - 1e-12)
    assert (ratio - 1).abs().max() > 0.1 * (math.exp(scale) - 1)  # the bound is not vacuous for this input


def test_softmax_scale_is_min_max_and_never_zero():
    assert softmax_scale(127.0) == 1.0 and softmax_scale(12.7, bits=8) == pytest.approx(0.1)
    assert softmax_scale(7.0, bits=4) == 1.0
    assert 0 < softmax_scale(0.0) < 1e-30  # a constant-zero range still gives a valid Q/DQ scale


def test_bad_scales_and_bits_are_refused():
    with pytest.raises(ValueError, match="positive"):
        QuantSoftmax([0.1, 0.0], [0, 1])
    with pytest.raises(ValueError, match="2..8"):
        QuantSoftmax([0.1], [0], bits=12)
    with pytest.raises(ValueError, match="softmax input bits"):
        QDiT4SRConfig(softmax_bits=9)


def test_calibrated_logit_range_matches_a_float64_recomputation(calibrated):
    """Recompute max |q k^T / sqrt(d)| per (core, step) from the cores' inputs, in float64, over the same run."""
    from qdit4sr.calibration.layers import example_inputs, used_linears
    from qdit4sr.calibration.stats import CalibrationConfig, collect_activation_stats
    from qdit4sr.models.latents import PixelUnshuffleCodec
    from qdit4sr.models.pipeline import DiT4SRPipeline
    from qdit4sr.models.step_context import current_step
    from tests.calibration.conftest import CALIBRATION_PIPE

    _, _, stats = calibrated
    model = fresh_model(calibrated)
    cores = attention_cores(model)
    assert stats.softmax_sites and set(stats.softmax_sites) == set(cores)
    seen = np.zeros((len(stats.softmax_sites), len(stats.timesteps)))
    index = {name: i for i, name in enumerate(stats.softmax_sites)}

    def hook(name):
        def fn(mod, args):
            if current_step() is None:  # the forward that lists the used layers
                return
            q, k, _ = (a.double() for a in args)
            logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            i, t = index[name], current_step()
            seen[i, t] = max(seen[i, t], float(logits.abs().max()))
        return fn

    handles = [core.register_forward_pre_hook(hook(name)) for name, core in cores.items()]
    pipe = DiT4SRPipeline(model, PixelUnshuffleCodec(), CALIBRATION_PIPE)
    again = collect_activation_stats(pipe, used_linears(model, example_inputs(model)),
                                     CalibrationConfig(num_images=4, lr_crop=4, batch_size=4), progress=False)
    for h in handles:
        h.remove()
    np.testing.assert_allclose(again.softmax_amax, stats.softmax_amax, rtol=0, atol=0)  # deterministic
    np.testing.assert_allclose(stats.softmax_amax, seen, rtol=1e-5)
    assert all(core.softmax is None for core in cores.values())  # recorders removed: back to SDPA


def test_quantize_puts_an_8_bit_softmax_in_every_core(calibrated):
    _, _, stats = calibrated
    model = fresh_model(calibrated)
    plan = quantize_(model, QDiT4SRConfig.preset("qdit4sr", "w4a4", num_segments=3), stats, progress=False)
    softmaxes = quantized_softmaxes(model)
    assert set(softmaxes) == set(attention_cores(model)) == {s.name for s in plan.softmax}
    index = {name: i for i, name in enumerate(stats.softmax_sites)}
    for site in plan.softmax:
        assert site.bits == 8 and len(site.scales) == len(plan.segments)
        for (start, end), scale in zip(plan.segments, site.scales):  # min-max scale over the segment's steps
            assert scale * qmax(8) == pytest.approx(stats.softmax_amax[index[site.name], start:end].max())
    again = BitPlan.from_json(plan.to_json())
    assert again.softmax == plan.softmax


def test_softmax_quantization_costs_little_at_8_bits(calibrated):
    """Only the softmax input quantized (weights and activations FP): the output stays close to FP."""
    config, _, stats = calibrated
    ref, model = fresh_model(calibrated), fresh_model(calibrated)
    plan = quantize_(model, QDiT4SRConfig.preset("rtn", "w8a8", storage_dtype="float32"), stats, progress=False)
    for name, layer in model.named_modules():  # undo the linears: keep only the softmax quantizer
        if type(layer).__name__ == "QuantLinear":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, ref.get_submodule(name))
    inputs = micro_inputs(config)
    with torch.no_grad():
        out, fp = model(*inputs), ref(*inputs)
        coarse = fresh_model(calibrated)
        for core in attention_cores(coarse).values():  # the same quantizer with 16x wider steps: worse
            core.softmax = QuantSoftmax([s * 16 for s in plan.softmax[0].scales], [0])
        worse = coarse(*inputs)
    err = float((out - fp).norm() / fp.norm())
    assert 0 < err < 0.01, err
    assert float((worse - fp).norm() / fp.norm()) > 2 * err


def test_softmax_can_be_left_in_full_precision(calibrated):
    _, _, stats = calibrated
    for config in (QDiT4SRConfig.preset("rtn", "w4a16"), QDiT4SRConfig.preset("rtn", "w4a8", softmax_bits=16)):
        model = fresh_model(calibrated)
        plan = quantize_(model, config, stats, progress=False)
        assert plan.softmax == [] and quantized_softmaxes(model) == {}


def test_statistics_without_logit_ranges_are_refused(calibrated):
    _, _, stats = calibrated
    bare = dataclasses.replace(stats, softmax_sites=[], softmax_amax=None)
    with pytest.raises(ValueError, match="attention-logit ranges"):
        quantize_(fresh_model(calibrated), QDiT4SRConfig.preset("rtn", "w8a8"), bare, progress=False)


def test_plan_validation_rejects_bad_softmax_entries(calibrated):
    _, _, stats = calibrated
    plan = quantize_(fresh_model(calibrated), QDiT4SRConfig.preset("rtn", "w8a8"), stats, progress=False)
    plan.softmax[0].scales = [-1.0]
    with pytest.raises(ValueError, match="positive scales"):
        BitPlan.from_json(plan.to_json())


def test_segment_scope_selects_the_softmax_scale():
    sm = QuantSoftmax([0.5, 0.01], [0, 0, 1])
    logits = torch.tensor([[0.0, 0.3]])
    with segment_scope(0):
        coarse = sm(logits)
    with segment_scope(1):
        fine = sm(logits)
    assert torch.allclose(coarse, torch.softmax(torch.tensor([[0.0, 0.5]]), -1))
    assert torch.allclose(fine, torch.softmax(torch.tensor([[0.0, 0.3]]), -1))
    with pytest.raises(RuntimeError, match="outside the sampler"):
        sm(logits)
