"""The sampler's initial noise: a portable Gaussian generator that every runtime reproduces bit for bit.

`torch.randn` cannot be reproduced outside torch, so the Python pipeline and the C++ runtime
(`serving/cpp/src/noise.cpp`) both draw the initial latent from this generator. Specification:

    mix64(z)      = z ^= z >> 30;  z *= 0xBF58476D1CE4E5B9;  z ^= z >> 27;  z *= 0x94D049BB133111EB;  z ^ (z >> 31)
                    (the splitmix64 finaliser; all arithmetic modulo 2^64)
    key           = mix64(seed mod 2^64)
    bits(k)       = mix64(key + (k + 1) * 0x9E3779B97F4A7C15)          (the splitmix64 stream started at key)
    value i       (i = 0 .. n-1, in C order of the tensor shape) comes from the pair p = i // 2:
        u1        = ((bits(2p) >> 11) + 1) * 2^-53                     in (0, 1]
        u2        =  (bits(2p + 1) >> 11) * 2^-53                      in [0, 1)
        r         = sqrt(-2 ln u1),  theta = 6.283185307179586 * u2    (Box-Muller, in float64)
        value 2p  = float32(r cos theta),  value 2p + 1 = float32(r sin theta)   (round to nearest)

Every step is exact integer arithmetic or one correctly rounded float64 operation, except ln, cos and
sin, whose libm results may differ in the last float64 bit between implementations (numpy's SIMD
loops vs glibc). Rounding to float32 hides that unless the float64 value lies within one float64 ulp
of a float32 rounding boundary: about one value in 2^28, so runtimes agree bit for bit in practice.
The values are a function of (seed, position) only: the noise of a smaller tensor is a prefix of a
larger one's, and no global state is touched.
"""
from __future__ import annotations

import numpy as np

GOLDEN_GAMMA = 0x9E3779B97F4A7C15
TWO_PI = 6.283185307179586
_MASK64 = (1 << 64) - 1


def _mix64(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def stream_bits(seed: int, count: int) -> np.ndarray:
    """bits(0 .. count-1) of the spec: `count` uint64 values of the splitmix64 stream of `seed`."""
    key = _mix64(np.array([int(seed) & _MASK64], dtype=np.uint64))[0]
    counters = np.arange(1, count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix64(key + counters * np.uint64(GOLDEN_GAMMA))


def gaussian_noise(shape: tuple[int, ...] | list[int], seed: int) -> np.ndarray:
    """Standard normal float32 values of the given shape, a function of (seed, index) only (see the module doc)."""
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape {shape} has a negative size")
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    pairs = (n + 1) // 2
    bits = stream_bits(seed, 2 * pairs).reshape(pairs, 2)
    u1 = ((bits[:, 0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53
    u2 = (bits[:, 1] >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    r = np.sqrt(-2.0 * np.log(u1))
    theta = TWO_PI * u2
    values = np.empty((pairs, 2), dtype=np.float64)
    values[:, 0] = r * np.cos(theta)
    values[:, 1] = r * np.sin(theta)
    return values.reshape(-1)[:n].astype(np.float32).reshape(shape)
