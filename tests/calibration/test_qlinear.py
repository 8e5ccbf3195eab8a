import pytest
import torch

from qdit4sr.calibration.hadamard import apply_hadamard, rotate_weight
from qdit4sr.calibration.qlinear import NO_ACT_QUANT, QuantLinear, segment_scope
from qdit4sr.calibration.quantizer import WeightQuantConfig, fake_quantize_activation, quantize_weight
from qdit4sr.models.step_context import step_scope


def _layer(w, b, act_bits=(NO_ACT_QUANT,), scales=(1.0,), seg=(0, 0, 0), hadamard=True, bits=8, **branches):
    w_h = rotate_weight(w) if hadamard else w
    residual = quantize_weight(w_h, WeightQuantConfig(bits=bits, group_size=64))
    return QuantLinear(residual, b, hadamard=hadamard, act_bits=list(act_bits), act_scales=list(scales),
                       segment_of_step=list(seg), **branches), w_h


def test_reproduces_the_float64_formula():
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 128, generator=gen), torch.randn(96, generator=gen)
    down, up = torch.randn(8, 128, generator=gen), torch.randn(96, 8, generator=gen)
    sigma, u, v = torch.randn(3, 4, generator=gen), torch.randn(3, 4, 32, generator=gen), torch.randn(3, 4, 32, generator=gen)
    layer, w_h = _layer(w, b, act_bits=(4, 6), scales=(0.3, 0.05), seg=(0, 1, 1), bits=4, up=up, down=down,
                        block_sigma=sigma, block_u=u, block_v=v)
    x = torch.randn(2, 5, 128, generator=gen)
    dense_block = torch.einsum("pq,pqo,pqi->poqi", sigma, u, v).reshape(96, 128).double()
    x_h = apply_hadamard(x.double())
    for step, (bits, scale) in enumerate([(4, 0.3), (6, 0.05), (6, 0.05)]):
        ref = (fake_quantize_activation(x_h, bits, scale) @ layer.residual_weight.double().T + b.double()
               + x_h @ (up.double() @ down.double()).T + x_h @ dense_block.T)
        with step_scope(step):
            got = layer(x)
        assert torch.allclose(got.double(), ref, atol=1e-3 * ref.abs().max().item()), step


def test_high_precision_layer_matches_the_original_linear():
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(64, 128, generator=gen) * 0.1, torch.randn(64, generator=gen)
    layer, _ = _layer(w, b, bits=8)
    x = torch.randn(4, 128, generator=gen)
    ref = x @ w.T + b
    rel = ((layer(x) - ref).norm() / ref.norm()).item()
    assert rel < 0.01, rel


def test_segment_selection_and_errors():
    w = torch.randn(64, 64)
    layer, _ = _layer(w, None, act_bits=(2, 8), scales=(0.5, 0.01), seg=(0, 1))
    x = torch.randn(3, 64)
    with segment_scope(1):
        a = layer(x)
    with step_scope(1):
        b = layer(x)
    assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="outside the sampler"):
        layer(x)
    with step_scope(5), pytest.raises(RuntimeError, match="beyond"):
        layer(x)
