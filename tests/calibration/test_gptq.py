"""GPTQ error compensation: against a textbook reference, and lower output error than RTN on real activations."""
import numpy as np
import pytest
import torch

from qdit4sr.calibration.gptq import damped_gram, dequantize_codes, group_scale, gptq_quantize, output_error
from qdit4sr.calibration.quantizer import WeightQuantConfig, qmax, quantize_weight


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _correlated_inputs(n_tokens, n_in, seed=0):
    """Tokens with a decaying, rotated covariance (as layer inputs have), float64."""
    mix = _randn(n_in, n_in, seed=seed + 1) * (1.0 + torch.arange(n_in, dtype=torch.float64)) ** -0.7
    return _randn(n_tokens, n_in, seed=seed) @ mix


def reference_gptq(w, gram, config, damp):
    """Textbook sequential GPTQ/OBQ: quantize column i, push its error onto the later columns with the
    current inverse Hessian, then remove column i from that inverse (H^-1 -= h_i h_i^T / h_ii)."""
    w = w.double().clone()
    out, n = w.shape
    gs = config.group_size or n
    h_inv = torch.linalg.inv(damped_gram(gram, damp))
    q = qmax(config.bits)
    codes = torch.zeros(out, n, dtype=torch.float64)
    scales = torch.zeros(out, n // gs, dtype=torch.float64)
    for i in range(n):
        if i % gs == 0:
            scales[:, i // gs] = group_scale(w[:, i:i + gs], config.bits, config)
        s = scales[:, i // gs]
        codes[:, i] = torch.clamp(torch.round(w[:, i] / s), -q, q)
        e = (w[:, i] - dequantize_codes(codes[:, i], s, config)) / h_inv[i, i]
        w[:, i:] -= e[:, None] * h_inv[i, i:][None, :]
        h_inv = h_inv - h_inv[:, i:i + 1] @ h_inv[i:i + 1, :] / h_inv[i, i]
    return codes, scales


@pytest.mark.parametrize("group_size", [16, None])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [3, 4])
def test_matches_textbook_reference(group_size, scale_dtype, bits):
    w = _randn(12, 48, seed=1) * 0.1
    x = _correlated_inputs(200, 48, seed=2)
    gram = x.T @ x / x.shape[0]
    config = WeightQuantConfig(bits=bits, group_size=group_size, scale_dtype=scale_dtype)
    got = gptq_quantize(w, gram, config, damp=0.01)
    codes, scales = reference_gptq(w, gram, config, damp=0.01)
    assert got.qweight.shape == (12, 48) and got.scales.dtype == scale_dtype
    assert torch.equal(got.qweight.double(), codes)
    assert torch.allclose(got.scales.double(), scales.to(scale_dtype).double(), rtol=1e-12, atol=0)


def test_blocked_float32_path_matches_reference_across_blocks():
    # 256 inputs: two lazy-update blocks of 128; float32 work, so allow a few codes at rounding ties.
    w = _randn(16, 256, seed=3).float() * 0.05
    x = _correlated_inputs(600, 256, seed=4)
    gram = x.T @ x / x.shape[0]
    config = WeightQuantConfig(bits=4, group_size=64)
    got = gptq_quantize(w, gram, config)
    codes, _ = reference_gptq(w.double(), gram, config, damp=0.01)
    assert (got.qweight.double() != codes).double().mean().item() < 0.01


def test_identity_gram_is_rtn():
    # With H proportional to I no column's error can be compensated by another: GPTQ reduces to RTN.
    w = _randn(8, 64, seed=5).float()
    config = WeightQuantConfig(bits=4, group_size=32)
    got = gptq_quantize(w, torch.eye(64, dtype=torch.float64), config)
    assert torch.equal(got.qweight, quantize_weight(w, config).qweight)


def test_lowers_output_error_vs_rtn_on_correlated_inputs():
    w = _randn(32, 128, seed=6).float() * 0.05
    x = _correlated_inputs(1000, 128, seed=7)
    gram = x.T @ x / x.shape[0]
    config = WeightQuantConfig(bits=4, group_size=64)
    rtn = output_error(w, quantize_weight(w, config).dequantize(), gram)
    gptq = output_error(w, gptq_quantize(w, gram, config).dequantize(), gram)
    assert gptq < 0.7 * rtn, (gptq, rtn)


def test_lowers_output_error_on_calibration_activations(calibrated):
    """On the micro model's real calibration Gram matrices, per layer, at 4 and 3 bits."""
    from qdit4sr.calibration.hadamard import rotate_weight
    from qdit4sr.models.transformer import DiT4SRTransformer2DModel

    config, state, stats = calibrated
    assert stats.gram is not None and set(stats.gram) == set(stats.layers)
    model = DiT4SRTransformer2DModel(**config)
    model.load_state_dict(state)
    ratios = []
    for name in stats.layers:
        w = rotate_weight(model.get_submodule(name).weight.detach().double()).float()
        gram = torch.from_numpy(stats.gram[name])
        for bits in (3, 4):
            wq = WeightQuantConfig(bits=bits, group_size=16)
            rtn = output_error(w, quantize_weight(w, wq).dequantize(), gram)
            gptq = output_error(w, gptq_quantize(w, gram, wq).dequantize(), gram)
            ratios.append(gptq / rtn)
    ratios = np.array(ratios)
    # Not guaranteed per layer (GPTQ is greedy), but it should win on the vast majority and on average.
    assert (ratios < 1).mean() > 0.9 and ratios.mean() < 0.9, ratios


def test_damped_gram_handles_dead_inputs():
    g = torch.diag(torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64))
    h = damped_gram(g, 0.1)
    # The dead input gets a unit diagonal before damping; damping adds 0.1 * mean diag (of 2, 1, 4).
    assert torch.allclose(torch.diagonal(h), torch.tensor([2.0, 1.0, 4.0], dtype=torch.float64) + 0.7 / 3)
    with pytest.raises(ValueError, match="damp"):
        damped_gram(g, 0.0)
    with pytest.raises(ValueError, match="square"):
        damped_gram(torch.zeros(2, 3), 0.1)


def test_rejects_mismatched_gram():
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(torch.zeros(4, 16), torch.eye(8), WeightQuantConfig(bits=4, group_size=8))


def test_activation_noise_target_is_the_least_squares_solution():
    from qdit4sr.calibration.gptq import activation_noise_target

    w = _randn(6, 16, seed=8)
    x = _correlated_inputs(4000, 16, seed=9)
    noise = 0.05 * _randn(4000, 16, seed=10)
    gram = x.T @ x / x.shape[0]
    target, gram_q = activation_noise_target(w, gram, 0.05 ** 2)
    # Least squares of W x on x_q = x + n, with the sample noise replaced by its expectation.
    xq = x + noise
    lstsq = torch.linalg.lstsq(xq, x @ w.T).solution.T
    assert torch.allclose(gram_q, gram + 0.05 ** 2 * torch.eye(16, dtype=torch.float64))
    assert ((target - lstsq).norm() / lstsq.norm()).item() < 0.05
    assert torch.equal(activation_noise_target(w, gram, 0.0)[0], w) or \
        torch.allclose(activation_noise_target(w, gram, 0.0)[0], w, atol=1e-10)


def test_activation_aware_gptq_lowers_error_with_quantized_inputs():
    from qdit4sr.calibration.gptq import activation_noise_target
    from qdit4sr.calibration.quantizer import fake_quantize_activation

    w = (_randn(32, 64, seed=11) * 0.05).float()
    x = _correlated_inputs(4000, 64, seed=12)
    gram = x.T @ x / x.shape[0]
    bits, scale = 4, float(2.5 * x.std() / 7)
    xq = fake_quantize_activation(x, bits, scale)
    config = WeightQuantConfig(bits=4, group_size=32)

    def err(q):
        return float((x @ w.double().T - xq @ q.dequantize().double().T).square().mean())

    plain = err(gptq_quantize(w, gram, config))
    target, gram_q = activation_noise_target(w, gram, scale ** 2 / 12)
    aware = err(gptq_quantize(target, gram_q, config))
    assert aware < plain, (aware, plain)


def test_reverse_cholesky_factors_the_inverse_hessian():
    from qdit4sr.calibration.gptq import reverse_cholesky

    x = _correlated_inputs(300, 40, seed=13)
    h = damped_gram(x.T @ x / x.shape[0])
    v = reverse_cholesky(h)
    assert torch.equal(v, torch.triu(v)) and (torch.diagonal(v) > 0).all()
    assert torch.allclose(v @ v.T, h, rtol=0, atol=1e-10 * h.abs().max().item())
    # V^-1 is the upper Cholesky factor of H^-1, the one textbook GPTQ uses.
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    assert torch.allclose(torch.linalg.inv(v), u, rtol=0, atol=1e-8 * u.abs().max().item())


def test_zero_activation_noise_keeps_the_weights():
    from qdit4sr.calibration.gptq import activation_noise_target

    w = _randn(4, 8, seed=14).float()
    singular = torch.zeros(8, 8, dtype=torch.float64)   # a dead layer: nothing to solve for
    target, h_q = activation_noise_target(w, singular, 0.0)
    assert target is w and torch.equal(h_q, singular.float())


def test_float32_path_matches_float64_on_calibration_activations(calibrated):
    """The float32 factorizations move the objective E||W x - Q x_q||^2 (summed over the micro model's
    layers, 4-bit activation noise) by under 0.1% against float64, as a float32 Gram alone does."""
    from qdit4sr.calibration.gptq import activation_noise_target
    from qdit4sr.calibration.hadamard import rotate_weight
    from qdit4sr.models.transformer import DiT4SRTransformer2DModel

    config, state, stats = calibrated
    model = DiT4SRTransformer2DModel(**config)
    model.load_state_dict(state)
    wq = WeightQuantConfig(bits=4, group_size=16)
    totals = {torch.float32: 0.0, torch.float64: 0.0}
    for name in stats.layers:
        w = rotate_weight(model.get_submodule(name).weight.detach().double())
        gram = torch.from_numpy(stats.gram[name]).double()
        noise = 0.01 * gram.diagonal().mean().item()
        for dtype in totals:
            target, h_q = activation_noise_target(w.to(dtype), gram, noise)
            q = gptq_quantize(target, h_q, wq).dequantize().double()
            totals[dtype] += output_error(w, q, gram) + noise * q.square().sum().item() / w.shape[0]
    assert abs(totals[torch.float32] / totals[torch.float64] - 1) < 1e-3, totals
