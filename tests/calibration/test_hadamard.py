"""Hadamard rotations: factorisation, orthonormality, fast application vs the dense matrix."""
import math

import pytest
import torch

from qdit4sr.calibration.hadamard import (
    apply_hadamard,
    apply_hadamard_transpose,
    hadamard_factor_matrices,
    hadamard_factors,
    hadamard_matrix,
    rotate_weight,
)

MODEL_SIZES = [1536, 6144, 4096, 256, 2048]
TEST_SIZES = [64, 128, 192, 512, 96, 80, 112]
ALL_SIZES = MODEL_SIZES + TEST_SIZES
# Sizes whose dense n x n matrix is cheap enough to build and multiply in a unit test.
DENSE_SIZES = [n for n in ALL_SIZES if n <= 1536]
# Sizes whose full n x n Gram matrix is cheap to form.
GRAM_SIZES = [n for n in ALL_SIZES if n <= 512]
TOL64 = 1e-10


def _eye(n):
    return torch.eye(n, dtype=torch.float64)


def _flat_deviation(t, n):
    """Largest deviation of |t| from 1/sqrt(n)."""
    return (t.abs() - 1 / math.sqrt(n)).abs().max().item()


@pytest.mark.parametrize(
    "n, expected",
    [(1536, (12, 128)), (6144, (12, 512)), (4096, (1, 4096)), (256, (1, 256)), (2048, (1, 2048)),
     (192, (12, 16)), (96, (12, 8)), (80, (20, 4)), (112, (28, 4)), (12, (12, 1)), (28, (28, 1)), (1, (1, 1))],
)
def test_factors(n, expected):
    assert hadamard_factors(n) == expected


@pytest.mark.parametrize("n", [0, -4, 3, 6, 10, 14, 36, 44, 60, 1000])
def test_unsupported_size_raises(n):
    with pytest.raises(ValueError, match=f"n={n}"):
        hadamard_factors(n)
    with pytest.raises(ValueError):
        hadamard_matrix(n)


def test_unsupported_last_axis_raises():
    with pytest.raises(ValueError, match="n=36"):
        apply_hadamard(torch.randn(2, 36))


# 2048 and 4096 are pure Sylvester sizes (the factor is the whole matrix); the row test covers them.
@pytest.mark.parametrize("n", [n for n in ALL_SIZES if n not in (2048, 4096)])
def test_factor_matrices_orthonormal_with_flat_entries(n):
    a, b = hadamard_factor_matrices(n)
    m, p = hadamard_factors(n)
    assert a.shape == (m, m) and b.shape == (p, p)
    assert a.dtype == torch.float64
    # Orthonormal factors make kron(a, b) orthonormal; +-1/sqrt(n) entries make it a Hadamard matrix.
    assert torch.allclose(a @ a.T, _eye(m), rtol=0, atol=TOL64)
    assert torch.allclose(b @ b.T, _eye(p), rtol=0, atol=TOL64)
    assert _flat_deviation(a, m) < TOL64
    assert _flat_deviation(b, p) < TOL64


@pytest.mark.parametrize("p", [1, 2, 64, 512])
def test_sylvester_factor_matches_closed_form(p):
    # Sylvester entries are (-1)^popcount(i & j) (independent of the recursive construction).
    _, b = hadamard_factor_matrices(p)
    i = torch.arange(p)
    ij = i[:, None] & i[None, :]
    parity = torch.zeros_like(ij)
    for bit in range(max(1, p.bit_length())):
        parity ^= (ij >> bit) & 1
    ref = (1 - 2 * parity).to(torch.float64) / math.sqrt(p)
    assert torch.allclose(b, ref, rtol=0, atol=TOL64)


@pytest.mark.parametrize("m", [12, 20, 28])
def test_paley_factor_is_integer_hadamard(m):
    a, _ = hadamard_factor_matrices(m)
    h = a * math.sqrt(m)
    assert torch.equal(h.round().abs(), torch.ones(m, m, dtype=torch.float64))
    assert torch.allclose(h.round() @ h.round().T, m * _eye(m), rtol=0, atol=0)


@pytest.mark.parametrize("n", GRAM_SIZES)
def test_dense_matrix_orthonormal(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert torch.allclose(h @ h.T, _eye(n), rtol=0, atol=TOL64)
    a, b = hadamard_factor_matrices(n)
    assert torch.allclose(h, torch.kron(a, b), rtol=0, atol=0)


@pytest.mark.parametrize("n", ALL_SIZES)
def test_rows_orthonormal_every_size(n):
    # Rows of H via the fast path (e_i @ H); a random subset keeps the large sizes cheap.
    idx = torch.randperm(n)[:32]
    rows = apply_hadamard(_eye(n)[idx])
    assert torch.allclose(rows @ rows.T, _eye(len(idx)), rtol=0, atol=TOL64)
    assert _flat_deviation(rows, n) < TOL64


@pytest.mark.parametrize("n", DENSE_SIZES)
def test_apply_matches_dense(n):
    x = torch.randn(2, 3, n, dtype=torch.float64)
    h = hadamard_matrix(n)
    ref = x @ h
    y = apply_hadamard(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert torch.allclose(y, ref, rtol=0, atol=TOL64)
    assert torch.allclose(apply_hadamard_transpose(x), x @ h.T, rtol=0, atol=TOL64)
    # float32 runs in float32 end to end; compare against the float64 product.
    y32 = apply_hadamard(x.float())
    assert y32.dtype == torch.float32
    assert (y32.double() - ref).norm() / ref.norm() < 1e-5


@pytest.mark.parametrize("n", [6144, 4096])
def test_apply_matches_kron_reference_large(n):
    # Dense n x n is too heavy here; compare with the explicit Kronecker sum y[k,l] = sum_ij A[i,k] X[i,j] B[j,l].
    x = torch.randn(2, 3, n, dtype=torch.float64)
    a, b = hadamard_factor_matrices(n)
    m, p = a.shape[0], b.shape[0]
    ref = torch.einsum("ik,...ij,jl->...kl", a, x.reshape(2, 3, m, p), b).reshape(x.shape)
    assert torch.allclose(apply_hadamard(x), ref, rtol=0, atol=TOL64)


@pytest.mark.parametrize("n", [n for n in ALL_SIZES if n != 4096])  # 4096 is a pure Sylvester case like 2048
@pytest.mark.parametrize("dtype, tol", [(torch.float64, TOL64), (torch.float32, 1e-5)])
def test_transpose_undoes_rotation(n, dtype, tol):
    x = torch.randn(2, 3, n, dtype=dtype)
    y = apply_hadamard(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=tol, atol=0)
    assert torch.allclose(apply_hadamard_transpose(y), x, rtol=0, atol=tol * 10)


@pytest.mark.parametrize("n", [96, 112, 256, 1536])
def test_rotate_weight_preserves_linear(n):
    x = torch.randn(5, n, dtype=torch.float64)
    w = torch.randn(7, n, dtype=torch.float64)
    w_rot = rotate_weight(w)
    assert w_rot.shape == w.shape and w_rot.dtype == w.dtype
    assert torch.allclose(apply_hadamard(x) @ w_rot.T, x @ w.T, rtol=0, atol=1e-9)


def test_rotate_weight_keeps_float32_dtype():
    x = torch.randn(5, 192)
    w = torch.randn(7, 192)
    w_rot = rotate_weight(w)
    assert w_rot.dtype == torch.float32
    ref = x.double() @ w.double().T
    rel = (apply_hadamard(x).double() @ w_rot.double().T - ref).norm() / ref.norm()
    assert rel < 1e-5


def test_rotate_weight_rejects_non_matrix():
    with pytest.raises(ValueError):
        rotate_weight(torch.randn(4, 4, 4, dtype=torch.float64))


def test_apply_uses_factors_not_dense_matmul(monkeypatch):
    # Every matmul operand must be a factor (m x m or p x p), never the n x n matrix.
    n = 1536
    m, p = hadamard_factors(n)
    seen = []
    real_matmul = torch.Tensor.__matmul__

    def spy(self, other):
        seen.append((tuple(self.shape[-2:]), tuple(other.shape[-2:])))
        return real_matmul(self, other)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    apply_hadamard(torch.randn(4, n, dtype=torch.float64))
    monkeypatch.undo()
    assert seen, "expected the factor matmuls to go through the @ operator"
    square = {s for pair in seen for s in pair if s[0] == s[1]}
    assert square <= {(m, m), (p, p)}
    assert all(max(s) < n for pair in seen for s in pair)


def test_cached_factors_are_not_aliased():
    a, b = hadamard_factor_matrices(192)
    a.mul_(0)
    b.mul_(0)
    h = hadamard_matrix(192)
    h.mul_(0)
    assert torch.allclose(hadamard_matrix(192) @ hadamard_matrix(192).T, _eye(192), rtol=0, atol=TOL64)


def test_integer_input_rejected():
    with pytest.raises(TypeError):
        apply_hadamard(torch.ones(2, 64, dtype=torch.int64))
