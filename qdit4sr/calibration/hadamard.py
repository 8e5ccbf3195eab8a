"""Orthonormal Hadamard rotations for the linear input sizes of a DiT4SR transformer.

A size n is factored as n = m * p with p a power of two (Sylvester factor) and
m in {1, 12, 20, 28} (Paley factor).  The rotation H = kron(H_m, H_p) / sqrt(n)
is orthonormal, so ``x @ w.T == (x @ H) @ (w @ H).T``: rotating activations and
weights together leaves a linear layer unchanged while spreading outliers
evenly over all channels, which is what makes low-bit quantization tolerable.

``apply_hadamard`` never materialises the dense n x n matrix: it reshapes the
last axis into (m, p) and applies the two small factors separately.  (For a pure
power of two, m = 1 and the Sylvester factor is the whole rotation.)
"""
from __future__ import annotations

import functools
import math

import torch

from ..checks import is_int

__all__ = [
    "PALEY_ORDERS",
    "hadamard_factors",
    "hadamard_factor_matrices",
    "hadamard_matrix",
    "apply_hadamard",
    "apply_hadamard_transpose",
    "rotate_weight",
]

# Non-power-of-two Hadamard orders we can build, mapped to (prime q, Paley construction).
_PALEY_SPECS: dict[int, tuple[int, int]] = {12: (11, 1), 20: (19, 1), 28: (13, 2)}
PALEY_ORDERS: tuple[int, ...] = tuple(sorted(_PALEY_SPECS))


def hadamard_factors(n: int) -> tuple[int, int]:
    """Split n into (m, p) with n = m * p, p the largest possible power of two, m in {1, 12, 20, 28}."""
    if not is_int(n) or n < 1:
        raise ValueError(f"Hadamard size must be a positive integer, got n={n!r}")
    p = n & -n  # largest power of two dividing n
    odd = n // p
    if odd == 1:
        return 1, n
    # Each Paley order is 4 * (odd part), so it absorbs two factors of two from n.
    m = 4 * odd
    if m in _PALEY_SPECS and p >= 4:
        return m, p // 4
    raise ValueError(
        f"no Hadamard rotation for n={n}: n must be 2**k or 12, 20 or 28 times 2**k "
        f"(odd part {odd}, power-of-two part {p})"
    )


def _legendre(a: int, q: int) -> int:
    """Legendre symbol (a / q) for an odd prime q."""
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> torch.Tensor:
    """Jacobsthal matrix Q[i, j] = chi(i - j) over GF(q)."""
    idx = torch.arange(q)
    diff = (idx[:, None] - idx[None, :]) % q
    chi = torch.tensor([_legendre(a, q) for a in range(q)], dtype=torch.float64)
    return chi[diff]


def _paley_conference(q: int, skew: bool) -> torch.Tensor:
    """Order q+1 conference matrix [[0, 1^T], [+-1, Q]] (skew for q = 3 mod 4, symmetric for q = 1 mod 4)."""
    ones = torch.ones(q, dtype=torch.float64)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = ones
    c[1:, 0] = -ones if skew else ones
    c[1:, 1:] = _jacobsthal(q)
    return c


def _paley_one(q: int) -> torch.Tensor:
    """Paley I: order q+1 for a prime q = 3 (mod 4)."""
    return torch.eye(q + 1, dtype=torch.float64) + _paley_conference(q, skew=True)


def _paley_two(q: int) -> torch.Tensor:
    """Paley II: order 2(q+1) for a prime q = 1 (mod 4)."""
    c = _paley_conference(q, skew=False)
    on_pm1 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    on_zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    # C has zeros exactly on its diagonal, so the two krons never overlap.
    return torch.kron(c, on_pm1) + torch.kron(torch.eye(q + 1, dtype=torch.float64), on_zero)


def _check_hadamard(h: torch.Tensor) -> torch.Tensor:
    """Raise unless h is a +-1 matrix with h @ h.T = order * I."""
    order = h.shape[0]
    gram = h @ h.T
    if not (torch.equal(h.abs(), torch.ones_like(h)) and torch.equal(gram, order * torch.eye(order, dtype=h.dtype))):
        raise RuntimeError(f"constructed matrix of order {order} is not a Hadamard matrix")
    return h


@functools.lru_cache(maxsize=None)
def _paley_matrix(m: int) -> torch.Tensor:
    """Unnormalised +-1 Hadamard matrix of Paley order m (cached, do not mutate)."""
    q, kind = _PALEY_SPECS[m]
    h = _paley_one(q) if kind == 1 else _paley_two(q)
    return _check_hadamard(h)


@functools.lru_cache(maxsize=None)
def _sylvester_matrix(p: int) -> torch.Tensor:
    """Unnormalised +-1 Sylvester Hadamard matrix of power-of-two order p (cached, do not mutate)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.kron(base, h)
    return h


@functools.lru_cache(maxsize=64)
def _normalised_factors(
    n: int, dtype: torch.dtype = torch.float64, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal (m x m, p x p) factors for size n, cast once per (dtype, device) (cached, do not mutate)."""
    m, p = hadamard_factors(n)
    h_m = _paley_matrix(m) if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    a = h_m / math.sqrt(m)
    b = _sylvester_matrix(p) / math.sqrt(p)
    return a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device)


def hadamard_factor_matrices(n: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal factors (A [m, m], B [p, p]) with kron(A, B) = hadamard_matrix(n); fresh tensors."""
    a, b = _normalised_factors(n)
    return a.to(dtype).clone(), b.to(dtype).clone()


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense orthonormal Hadamard matrix H [n, n] (H @ H.T = I); for references and small sizes."""
    a, b = _normalised_factors(n)
    return torch.kron(a, b).to(dtype)


def _factors_for(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not x.is_floating_point():
        raise TypeError(f"Hadamard rotation needs a floating point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("Hadamard rotation needs at least one dimension")
    return _normalised_factors(x.shape[-1], x.dtype, x.device)


def _apply_factors(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Return vec(left @ X @ right) where X is the last axis of x viewed as (m, p)."""
    m, p = left.shape[0], right.shape[0]
    y = x.reshape(*x.shape[:-1], m, p)
    # Order-1 factors are the identity; skipping them saves a pass over memory.
    if p > 1:
        y = y @ right
    if m > 1:
        y = left @ y
    return y.reshape(x.shape)


def apply_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Return x @ H along the last axis, using the (m, p) factorisation instead of a dense matmul."""
    a, b = _factors_for(x)
    # Row-major (i, j) indexing gives x @ kron(A, B) = vec(A^T X B).
    return _apply_factors(x, a.mT, b)


def apply_hadamard_transpose(x: torch.Tensor) -> torch.Tensor:
    """Return x @ H.T along the last axis, undoing ``apply_hadamard``."""
    a, b = _factors_for(x)
    return _apply_factors(x, a, b.mT)


def rotate_weight(w: torch.Tensor) -> torch.Tensor:
    """Return w @ H for a linear weight [out, in], so x @ w.T == apply_hadamard(x) @ rotate_weight(w).T."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D linear weight [out, in], got shape {tuple(w.shape)}")
    # float64 keeps the rotation itself from adding error before quantization.
    return apply_hadamard(w.to(torch.float64)).to(w.dtype)
