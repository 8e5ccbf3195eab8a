"""Symmetric uniform quantizer: packing, weight RTN / scale search, Gaussian clip and kappa."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from qdit4sr.calibration.quantizer import (
    QuantizedWeight,
    WeightQuantConfig,
    activation_scale,
    fake_quantize_activation,
    fake_quantize_weight,
    gaussian_clip_ratio,
    gaussian_kappa,
    gaussian_quant_mse,
    pack_int,
    qmax,
    quantize_weight,
    unpack_int,
)

ALL_BITS = list(range(2, 9))


# --------------------------------------------------------------------------- basics


@pytest.mark.parametrize("bits, expected", [(2, 1), (3, 3), (4, 7), (8, 127)])
def test_qmax(bits, expected):
    assert qmax(bits) == expected


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        qmax(bits)
    with pytest.raises(ValueError):
        WeightQuantConfig(bits=bits)
    with pytest.raises(ValueError):
        gaussian_kappa(bits)


@pytest.mark.parametrize("group_size", [0, -8, 2.5])
def test_bad_group_size_raises(group_size):
    with pytest.raises(ValueError, match="group_size"):
        WeightQuantConfig(group_size=group_size)


def test_config_is_frozen():
    cfg = WeightQuantConfig()
    assert (cfg.bits, cfg.group_size, cfg.scale_search) == (4, 64, False)
    with pytest.raises(Exception):
        cfg.bits = 8


def test_indivisible_group_raises():
    with pytest.raises(ValueError, match="divisible"):
        quantize_weight(torch.randn(4, 100), WeightQuantConfig(group_size=64))


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("length", [1, 7, 37, 1001])
def test_pack_round_trip(bits, length):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    q = torch.randint(lo, hi, (length,), dtype=torch.int8)
    q[0], q[-1] = lo, hi - 1  # make sure both range ends appear
    packed = pack_int(q, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(length * bits / 8)
    assert torch.equal(unpack_int(packed, bits, (length,)), q)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_pack_round_trip_2d(bits):
    q = torch.randint(-qmax(bits), qmax(bits) + 1, (5, 13), dtype=torch.int8)
    out = unpack_int(pack_int(q, bits), bits, q.shape)
    assert out.dtype == torch.int8 and torch.equal(out, q)


def test_int4_byte_layout():
    # First value in the low nibble, two's complement: 1 -> 0x1, -2 -> 0xE.
    assert pack_int(torch.tensor([1, -2]), 4).tolist() == [0xE1]
    assert pack_int(torch.tensor([-8, 7, -1]), 4).tolist() == [0x78, 0x0F]
    assert unpack_int(torch.tensor([0xE1], dtype=torch.uint8), 4, (2,)).tolist() == [1, -2]


def test_int8_is_plain_bytes():
    assert pack_int(torch.tensor([-1, 0, 127, -128]), 8).tolist() == [0xFF, 0x00, 0x7F, 0x80]


def _reference_bitstream(values, bits):
    """Pure-Python little-endian bit stream, one code after another."""
    acc, n_bits = 0, 0
    for v in values:
        acc |= (v & ((1 << bits) - 1)) << n_bits
        n_bits += bits
    return list(acc.to_bytes((n_bits + 7) // 8, "little"))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_pack_matches_python_bitstream(bits):
    # The 4- and 8-bit special layouts are the same little-endian stream as the generic path.
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (23,))
    assert pack_int(q, bits).tolist() == _reference_bitstream(q.tolist(), bits)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="range"):
        pack_int(torch.tensor([8]), 4)
    with pytest.raises(ValueError, match="range"):
        pack_int(torch.tensor([-3]), 2)


def test_unpack_rejects_short_buffer():
    with pytest.raises(ValueError, match="bytes"):
        unpack_int(torch.zeros(2, dtype=torch.uint8), 3, (8,))


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32, 64])
def test_rtn_error_bounded_by_half_step(bits, group_size):
    w = torch.randn(16, 128) * torch.rand(16, 1) * 3
    qw = quantize_weight(w, WeightQuantConfig(bits=bits, group_size=group_size))
    n_groups = 1 if group_size is None else 128 // group_size
    assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == (16, 128) and qw.shape == (16, 128)
    assert qw.scales.dtype == torch.float32 and qw.scales.shape == (16, n_groups)
    assert int(qw.qweight.abs().max()) <= qmax(bits)
    scale = qw.scales.repeat_interleave(128 // n_groups, dim=1)
    err = (qw.dequantize() - w).abs()
    # RTN clips at amax, so every weight is inside the clip range.
    assert torch.all(err <= scale / 2 * (1 + 1e-6))
    # The largest magnitude of each group maps exactly onto +-qmax.
    groups = qw.qweight.reshape(16, n_groups, -1)
    assert torch.all(groups.abs().amax(dim=-1) == qmax(bits))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_fp16_scales_give_the_nearest_codes_and_an_fp16_weight(bits):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(bits)) * 0.02
    qw = quantize_weight(w, WeightQuantConfig(bits=bits, group_size=64, scale_dtype=torch.float16))
    assert qw.scales.dtype == torch.float16
    scale = qw.scales.double().repeat_interleave(64, dim=1)
    # codes are the nearest ones for the stored (fp16) scale, clamped to the range
    expected = torch.clamp(torch.round(w.double() / scale), -qmax(bits), qmax(bits))
    assert torch.equal(qw.qweight.double(), expected)
    # dequantized like DequantizeLinear with an fp16 scale: the exact product rounded once to fp16
    assert torch.equal(qw.dequantize(), (qw.qweight.double() * scale).half().float())
    # the fp16 rounding of the scale costs little: error within the half step plus fp16 rounding
    err = (qw.dequantize().double() - w.double()).abs()
    assert torch.all(err <= scale / 2 * 1.002 + scale * qmax(bits) * 2.0 ** -11 + 1e-12)


def test_bad_scale_dtype_is_refused():
    with pytest.raises(ValueError, match="scale_dtype"):
        WeightQuantConfig(scale_dtype=torch.bfloat16)


def test_per_channel_scale_matches_amax():
    w = torch.randn(8, 96, dtype=torch.float64)
    qw = quantize_weight(w, WeightQuantConfig(bits=4, group_size=None))
    expected = (w.abs().amax(dim=1, keepdim=True) / 7).float()
    assert torch.allclose(qw.scales, expected, rtol=1e-6, atol=0)


def test_zero_group_is_finite():
    w = torch.randn(4, 128)
    w[1, :64] = 0
    qw = quantize_weight(w, WeightQuantConfig(bits=4, group_size=64))
    deq = qw.dequantize()
    assert torch.isfinite(qw.scales).all() and torch.all(qw.scales > 0)
    assert torch.equal(deq[1, :64], torch.zeros(64))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 64])
def test_scale_search_never_worse_per_group(bits, group_size):
    # Heavy tails make clipping worthwhile, so the search actually moves away from ratio 1.
    w = torch.distributions.StudentT(3.0).sample((32, 256))
    rtn = quantize_weight(w, WeightQuantConfig(bits=bits, group_size=group_size))
    searched = quantize_weight(w, WeightQuantConfig(bits=bits, group_size=group_size, scale_search=True))
    n_groups = rtn.scales.shape[1]

    def group_sse(qw):
        return (qw.dequantize().double() - w.double()).square().reshape(32, n_groups, -1).sum(-1)

    sse_rtn, sse_search = group_sse(rtn), group_sse(searched)
    assert torch.all(sse_search <= sse_rtn * (1 + 1e-6) + 1e-12)
    assert sse_search.sum() < 0.98 * sse_rtn.sum()
    ratio = searched.scales / rtn.scales
    assert torch.all(ratio >= 0.5 - 1e-6) and torch.all(ratio <= 1 + 1e-6)


def test_scale_search_matches_brute_force_grid():
    w = torch.randn(4, 64)
    searched = quantize_weight(w, WeightQuantConfig(bits=3, group_size=32, scale_search=True))
    best = torch.full((4, 2), math.inf, dtype=torch.float64)
    groups = w.double().reshape(4, 2, 32)
    amax = groups.abs().amax(-1)
    for r in np.linspace(0.5, 1.0, 20):
        for i in range(4):
            for g in range(2):
                s = amax[i, g] * r / 3
                deq = torch.clamp(torch.round(groups[i, g] / s), -3, 3) * s
                best[i, g] = min(best[i, g], float((deq - groups[i, g]).square().sum()))
    got = (searched.dequantize().double().reshape(4, 2, 32) - groups).square().sum(-1)
    assert torch.allclose(got, best, rtol=1e-5, atol=1e-9)


def test_fake_quantize_weight_dtype_and_values():
    w = torch.randn(8, 64, dtype=torch.float64)
    cfg = WeightQuantConfig(bits=4, group_size=32)
    fq = fake_quantize_weight(w, cfg)
    assert fq.dtype == torch.float64
    assert torch.equal(fq, quantize_weight(w, cfg).dequantize().double())


def test_dequantize_from_fields():
    qw = QuantizedWeight(
        qweight=torch.tensor([[1, -2, 3, 0]], dtype=torch.int8),
        scales=torch.tensor([[0.5, 2.0]]),
        bits=4,
        group_size=2,
    )
    assert qw.dequantize().tolist() == [[0.5, -1.0, 6.0, 0.0]]
    assert qw.shape == (1, 4)


# --------------------------------------------------------------------------- Gaussian clip / kappa


def _quantize_np(z, clip, bits):
    step = clip / qmax(bits)
    return np.clip(np.round(z / step), -qmax(bits), qmax(bits)) * step


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
@pytest.mark.parametrize("rel_clip", [0.7, 1.0, 1.4])
def test_closed_form_mse_matches_quadrature(bits, rel_clip):
    # Independent reference: adaptive quadrature cell by cell on the positive half-line.
    clip = rel_clip * gaussian_clip_ratio(bits)
    q, step = qmax(bits), clip / qmax(bits)
    edges = [0.0] + [(k + 0.5) * step for k in range(q)] + [np.inf]
    total = 0.0
    for k in range(q + 1):
        level = k * step
        total += integrate.quad(lambda z: (z - level) ** 2 * stats.norm.pdf(z), edges[k], edges[k + 1],
                                epsabs=1e-15, epsrel=1e-12)[0]
    assert gaussian_quant_mse(clip, bits) == pytest.approx(2 * total, rel=1e-8)


def _stratified_normal(n, seed):
    """N(0, 1) samples with one uniform draw per probability stratum of width 1/n.

    At the optimal clip the rare overload tail carries a large share of the error, so
    plain sampling has a ~4% standard error at 8 bits with 1e6 samples; stratifying
    guarantees the tails their expected share of samples.
    """
    rng = np.random.default_rng(seed)
    return special.ndtri((np.arange(n) + rng.random(n)) / n)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_kappa_matches_stratified_monte_carlo(bits):
    z = _stratified_normal(1_000_000, seed=bits)
    mse = np.mean((z - _quantize_np(z, gaussian_clip_ratio(bits), bits)) ** 2)
    assert mse == pytest.approx(gaussian_kappa(bits), rel=0.02)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_kappa_matches_plain_monte_carlo(bits):
    z = np.random.default_rng(100 + bits).standard_normal(1_000_000)
    err = (z - _quantize_np(z, gaussian_clip_ratio(bits), bits)) ** 2
    std_err = err.std() / math.sqrt(err.size)
    # Tolerance from the sample's own standard error (5 sigma), which grows with bits.
    assert abs(err.mean() - gaussian_kappa(bits)) < 5 * std_err
    assert std_err < 0.06 * gaussian_kappa(bits)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_kappa_not_beaten_by_grid(bits):
    clips = np.linspace(0.05, 12.0, 4000)
    grid_mse = gaussian_quant_mse(clips, bits)
    assert grid_mse.min() >= gaussian_kappa(bits) * (1 - 1e-12)
    # The best grid point sits next to the optimum: no other basin exists.
    assert abs(clips[np.argmin(grid_mse)] - gaussian_clip_ratio(bits)) < 2 * (clips[1] - clips[0])
    assert gaussian_quant_mse(gaussian_clip_ratio(bits), bits) == pytest.approx(gaussian_kappa(bits), rel=1e-12)


def test_kappa_two_bit_known_value():
    # Three-level (-1, 0, 1) uniform quantizer on N(0, 1): optimal step ~1.224, MSE ~0.190.
    assert gaussian_clip_ratio(2) == pytest.approx(1.224, abs=2e-3)
    assert gaussian_kappa(2) == pytest.approx(0.1902, abs=5e-4)


def test_kappa_decreasing_and_clip_increasing():
    kappas = [gaussian_kappa(b) for b in ALL_BITS]
    clips = [gaussian_clip_ratio(b) for b in ALL_BITS]
    assert all(a > b for a, b in zip(kappas, kappas[1:]))
    assert all(a < b for a, b in zip(clips, clips[1:]))
    # Each extra bit should cut the error by roughly 4x (between 3x and 4.5x here).
    ratios = [a / b for a, b in zip(kappas, kappas[1:])]
    assert all(3.0 < r < 4.5 for r in ratios[1:])


def test_kappa_high_rate_limit():
    step = gaussian_clip_ratio(8) / qmax(8)
    ratio = gaussian_kappa(8) / (step**2 / 12)
    assert 0.5 < ratio < 2.0


# --------------------------------------------------------------------------- activations


def test_activation_scale_formula():
    for bits in (4, 6, 8):
        expected = gaussian_clip_ratio(bits) * 3.0 / qmax(bits)
        assert activation_scale(9.0, bits) == pytest.approx(expected, rel=1e-14)
    assert activation_scale(0.0, 8) > 0
    with pytest.raises(ValueError):
        activation_scale(-1.0, 8)


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_fake_quant_reaches_kappa(bits):
    # With the calibrated scale, a N(0, v) activation incurs MSE ~ v * kappa(bits).
    v = 2.5
    x = torch.from_numpy(_stratified_normal(1_000_000, seed=bits)) * math.sqrt(v)
    xq = fake_quantize_activation(x, bits, activation_scale(v, bits))
    assert float((x - xq).square().mean()) == pytest.approx(v * gaussian_kappa(bits), rel=0.02)


def test_activation_fake_quant_values():
    x = torch.tensor([-10.0, -0.25, 0.25, 0.75, 1.0, 10.0])
    # Halves round to even (ONNX QuantizeLinear): 0.5 -> 0, 1.5 -> 2; out-of-range saturates at +-qmax.
    out = fake_quantize_activation(x, 3, 0.5)
    assert out.tolist() == [-1.5, -0.0, 0.0, 1.0, 1.0, 1.5]
    out_t = fake_quantize_activation(x, 3, torch.tensor(0.5, dtype=torch.float64))
    assert out_t.dtype == torch.float32 and torch.equal(out_t, out)
    with pytest.raises(ValueError):
        fake_quantize_activation(x, 3, 0.0)
