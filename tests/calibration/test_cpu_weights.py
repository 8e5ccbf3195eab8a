"""Residues in the cpu flavour's layout: exact where the layer already is per-channel INT8-representable,
otherwise within half an INT8 step of the portable weight; codes that cannot saturate non-VNNI kernels."""
import numpy as np
import pytest
import torch

from qdit4sr.calibration.cpu_weights import (MAX_CODE, code_bits, cpu_quant_linear, cpu_reference_, cpu_weight,
                                             requantize_per_channel)
from qdit4sr.calibration.hadamard import apply_hadamard, rotate_weight
from qdit4sr.calibration.qlinear import QuantLinear, segment_scope
from qdit4sr.calibration.quantizer import WeightQuantConfig, fake_quantize_activation, quantize_weight


def _layer(bits, group, scale_dtype=torch.float32, shape=(48, 128), seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    w = rotate_weight(torch.randn(*shape, generator=gen) * 0.1)
    residual = quantize_weight(w, WeightQuantConfig(bits=bits, group_size=group, scale_dtype=scale_dtype))
    return QuantLinear(residual, torch.randn(shape[0], generator=gen), hadamard=True, act_bits=[4], act_scales=[0.3],
                       segment_of_step=[0], **kw)


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_per_channel_layers_with_float32_scales_are_kept_exactly(bits):
    layer = _layer(bits, None)
    cw = cpu_weight(layer)
    assert cw.exact and torch.equal(cw.codes, layer.qweight) and cw.scale.dtype == torch.float32
    assert torch.equal(cw.dequantize(), layer.residual_weight)
    assert cpu_quant_linear(layer, cw) is layer


@pytest.mark.parametrize("bits,group,scale_dtype", [(4, 64, torch.float16), (4, 64, torch.float32),
                                                    (3, 32, torch.float16), (8, None, torch.float32),
                                                    (4, None, torch.float16)])
def test_other_layers_are_reexpressed_within_half_a_step(bits, group, scale_dtype):
    """group-wise grids, 8-bit codes (beyond 63) and fp16 per-channel products that float32 scales cannot hit."""
    layer = _layer(bits, group, scale_dtype)
    cw = cpu_weight(layer)
    assert not cw.exact and cw.codes.dtype == torch.int8 and cw.scale.dtype == torch.float32
    assert int(cw.codes.abs().max()) == MAX_CODE  # the row maximum lands on the end of the range
    w = layer.residual_weight.double()
    err = (cw.codes.double() * cw.scale.double()[:, None] - w).abs()
    step = cw.scale.double()[:, None]
    assert (err <= cw.bound().double()[:, None]).all() and (cw.bound() < 0.5001 * cw.scale).all()
    if group is not None:  # the bound is not loose: some weights of a group-wise grid sit near mid-step
        assert (err / step).max() > 0.45


@pytest.mark.parametrize("bits,group", [(4, None), (4, 64)])
def test_reading_a_layer_for_the_cpu_layout_caches_no_float32_copy(bits, group):
    """The export reads every layer once: a cached float32 residue per layer would hold 2x the bf16 model."""
    layer = _layer(bits, group, torch.float16)
    cw = cpu_weight(layer)
    assert layer._dequantized is None
    reference = cpu_weight(_layer(bits, group, torch.float16))
    _ = layer.residual_weight   # the forward's cache, once made, is what both read
    assert layer._dequantized is not None and layer.dequantized_residual() is layer._dequantized
    for again in (cw, cpu_weight(layer)):
        assert torch.equal(again.codes, reference.codes) and torch.equal(again.scale, reference.scale)
        assert again.exact == reference.exact


def test_reexpression_matches_a_float64_brute_force():
    """For each weight the chosen code is the nearest grid point (ties aside)."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    cw = requantize_per_channel(w)
    grid = torch.arange(-MAX_CODE, MAX_CODE + 1, dtype=torch.float64)
    dist = (grid[None, None, :] * cw.scale.double()[:, None, None] - w.double()[..., None]).abs()
    assert torch.equal(cw.codes.long(), grid[dist.argmin(-1)].long())
    zero = requantize_per_channel(torch.zeros(2, 8))
    assert torch.equal(zero.codes, torch.zeros(2, 8, dtype=torch.int8)) and (zero.scale > 0).all()


def _pair_saturating_dot(a_u8: np.ndarray, w_s8: np.ndarray) -> np.ndarray:
    """The u8 x s8 dot product of kernels without VNNI (vpmaddubsw, then vpmaddwd with ones): products of
    adjacent pairs are summed into an int16 with saturation before the int32 accumulation."""
    prod = a_u8.astype(np.int32)[:, None, :] * w_s8.astype(np.int32)[None, :, :]
    pairs = np.clip(prod[..., 0::2] + prod[..., 1::2], -32768, 32767)
    return pairs.sum(-1)


@pytest.mark.parametrize("act_bits", [4, 6, 8])
def test_codes_cannot_saturate_pairwise_int16_sums(act_bits):
    """onnxruntime feeds the int8 activation codes as u8 (shifted by 128): worst case 255 for 8 bits."""
    q = 2 ** (act_bits - 1) - 1
    a = np.concatenate([np.full((1, 64), 128 + q), np.full((1, 64), 128 - q),
                        np.random.default_rng(0).integers(128 - q, 128 + q + 1, (6, 64))]).astype(np.uint8)
    w = requantize_per_channel(torch.randn(32, 64, generator=torch.Generator().manual_seed(0))).codes.numpy()
    w[0] = MAX_CODE  # the worst rows: every code at the end of the range
    w[1] = -MAX_CODE
    exact = a.astype(np.int64) @ w.T.astype(np.int64)
    assert np.array_equal(_pair_saturating_dot(a, w), exact)
    full = np.full((1, 64), 127, dtype=np.int8)  # full-range int8 weights saturate, whatever the width (the u8 shift)
    saturates = not np.array_equal(_pair_saturating_dot(a, full), a.astype(np.int64) @ full.T.astype(np.int64))
    assert saturates


def test_cpu_reference_swaps_every_layer_and_stays_within_the_bound():
    model = torch.nn.Sequential(_layer(4, 64, torch.float16, shape=(64, 128), seed=1),
                                _layer(5, None, shape=(128, 64), seed=2))
    originals = list(model)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), segment_scope(0):
        portable = originals[0](x)
        weights = cpu_reference_(model)
        got = model[0](x)
    assert list(weights) == ["0", "1"] and not weights["0"].exact and weights["1"].exact
    assert model[1] is originals[1] and model[0] is not originals[0]
    assert model[0].weight_bits == code_bits(MAX_CODE) == 7
    # |y_cpu - y_portable| <= sum_k |x_q[k]| * s_n / 2: both layers quantize the same activations
    x_q = fake_quantize_activation(apply_hadamard(x), 4, 0.3).double()
    bound = x_q.abs().sum(-1, keepdim=True) * weights["0"].bound().double()[None, :]
    diff = (got.double() - portable.double()).abs()
    assert (diff <= bound + 1e-5 * got.abs().max()).all()  # plus float32 reordering
    assert diff.max() > 1e-3 * bound.max()  # not trivially equal
