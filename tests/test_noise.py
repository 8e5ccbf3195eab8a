"""The portable noise generator: its spec checked by brute force, its statistics, its properties."""
import math

import numpy as np
import pytest
from scipy import stats

from qdit4sr.noise import GOLDEN_GAMMA, TWO_PI, gaussian_noise, stream_bits

MASK = (1 << 64) - 1


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def _reference(seed: int, n: int) -> list[float]:
    """The module docstring's spec in plain Python integers and math (glibc libm)."""
    key = _mix64(seed & MASK)
    out = []
    for p in range((n + 1) // 2):
        b1 = _mix64((key + (2 * p + 1) * GOLDEN_GAMMA) & MASK)
        b2 = _mix64((key + (2 * p + 2) * GOLDEN_GAMMA) & MASK)
        u1 = ((b1 >> 11) + 1) * 2.0 ** -53
        u2 = (b2 >> 11) * 2.0 ** -53
        r = math.sqrt(-2.0 * math.log(u1))
        out += [r * math.cos(TWO_PI * u2), r * math.sin(TWO_PI * u2)]
    return out[:n]


def test_stream_is_splitmix64():
    # splitmix64 started at state 0 (Vigna's reference implementation) begins with these outputs.
    assert _mix64(GOLDEN_GAMMA) == 0xE220A8397B1DCDAF
    assert _mix64(2 * GOLDEN_GAMMA & MASK) == 0x6E789E6AA1B965F4
    bits = stream_bits(42, 100)
    key = _mix64(42)
    assert [int(b) for b in bits] == [_mix64((key + (k + 1) * GOLDEN_GAMMA) & MASK) for k in range(100)]


@pytest.mark.parametrize("seed", [0, 1, 2**63 + 5, -3])
def test_values_follow_the_spec(seed):
    ref = np.array(_reference(seed, 2001), dtype=np.float64).astype(np.float32)
    np.testing.assert_array_equal(gaussian_noise((2001,), seed), ref)


def test_shape_prefix_and_seed_wrapping():
    a = gaussian_noise((2, 3, 4, 5), 9)
    assert a.shape == (2, 3, 4, 5) and a.dtype == np.float32
    np.testing.assert_array_equal(a.ravel(), gaussian_noise((120,), 9))
    np.testing.assert_array_equal(gaussian_noise((7,), 9), a.ravel()[:7])   # a function of (seed, index)
    np.testing.assert_array_equal(gaussian_noise((5,), -1), gaussian_noise((5,), 2**64 - 1))
    assert gaussian_noise((), 3).shape == ()
    with pytest.raises(ValueError, match="negative"):
        gaussian_noise((2, -1), 0)


def test_standard_normal_statistics():
    n = 400_000
    x = gaussian_noise((n,), 2024).astype(np.float64)
    assert abs(x.mean()) < 5 / math.sqrt(n) and abs(x.std() - 1) < 5 / math.sqrt(2 * n)
    assert stats.kstest(x, "norm").pvalue > 1e-3
    assert abs(stats.skew(x)) < 0.02 and abs(stats.kurtosis(x)) < 0.05
    # Neighbours (the cos/sin pair of one draw, and consecutive pairs) and other seeds are uncorrelated.
    assert abs(np.corrcoef(x[0::2], x[1::2])[0, 1]) < 5 / math.sqrt(n / 2)
    assert abs(np.corrcoef(x[:-2], x[2:])[0, 1]) < 5 / math.sqrt(n)
    y = gaussian_noise((n,), 2025).astype(np.float64)
    assert abs(np.corrcoef(x, y)[0, 1]) < 5 / math.sqrt(n)
