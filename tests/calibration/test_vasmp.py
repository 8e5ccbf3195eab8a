"""VaSMP weight bit allocation against numeric optimisers and exhaustive search."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import optimize

from qdit4sr.calibration.vasmp import (
    VaSMPResult,
    allocate_bits,
    continuous_bits,
    layer_weight_variance,
    modelled_distortion,
)

MIN_BITS, MAX_BITS = 2, 8
# DiT4SR linear layers: attention projections (1536x1536) and MLP (1536x6144).
SMALL, LARGE = 1536 * 1536, 1536 * 6144


def _random_instance(rng, n_layers, weight_choices=(1.0, 4.0)):
    variances = 10.0 ** rng.uniform(-4.0, 0.0, n_layers)
    weights = rng.choice(np.asarray(weight_choices, dtype=np.float64), n_layers)
    return variances, weights


def _all_assignments(n_layers):
    return np.array(list(itertools.product(range(MIN_BITS, MAX_BITS + 1), repeat=n_layers)), dtype=np.float64)


def _brute_force(variances, weights, budget, fill_budget):
    """Least distortion over all assignments within budget.

    ``fill_budget`` first restricts to the largest achievable cost, which is the
    contract of the exact solver (meet the budget exactly whenever possible).
    """
    grid = _all_assignments(variances.size)
    cost = grid @ weights
    distortion = np.sum(weights * variances * 4.0 ** -grid, axis=1)
    feasible = cost <= budget * weights.sum() * (1.0 + 1e-9)
    if fill_budget:
        feasible &= cost >= cost[feasible].max() * (1.0 - 1e-12)
    best = int(np.argmin(np.where(feasible, distortion, np.inf)))
    return distortion[best], cost[best]


def _lattice_budget(rng, weights):
    """A budget B with B * sum(w) an integer, i.e. reachable in principle."""
    total = int(weights.sum())
    return int(rng.integers(MIN_BITS * total, MAX_BITS * total + 1)) / total


# --------------------------------------------------------------------------- variance


def test_layer_weight_variance_matches_per_row_definition():
    w = torch.randn(16, 64, dtype=torch.float32) * torch.linspace(0.1, 2.0, 16)[:, None]
    expected = np.mean([np.var(row, dtype=np.float64) for row in w.numpy().astype(np.float64)])
    assert layer_weight_variance(w) == pytest.approx(expected, rel=1e-12)
    assert layer_weight_variance(w.numpy()) == pytest.approx(expected, rel=1e-12)
    assert layer_weight_variance(w.to(torch.bfloat16)) == pytest.approx(expected, rel=1e-2)


def test_layer_weight_variance_rejects_vectors():
    with pytest.raises(ValueError):
        layer_weight_variance(np.ones(8))


# --------------------------------------------------------------------------- continuous optimum


@pytest.mark.parametrize("seed", range(12))
def test_continuous_bits_matches_slsqp(seed):
    rng = np.random.default_rng(seed)
    n_layers = int(rng.integers(3, 12))
    variances = 10.0 ** rng.uniform(-4.0, 0.0, n_layers)
    weights = rng.uniform(0.5, 5.0, n_layers)
    budget = float(rng.uniform(MIN_BITS, MAX_BITS))
    scale = modelled_distortion(variances, weights, np.full(n_layers, budget))  # O(1) objective for SLSQP

    def objective(b):
        return np.sum(weights * variances * 4.0**-b) / scale

    def gradient(b):
        return -math.log(4.0) * weights * variances * 4.0**-b / scale

    constraint = {
        "type": "eq",
        "fun": lambda b: (weights @ b - budget * weights.sum()) / weights.sum(),
        "jac": lambda b: weights / weights.sum(),
    }
    numeric = optimize.minimize(
        objective, np.full(n_layers, budget), jac=gradient, constraints=[constraint],
        method="SLSQP", options={"ftol": 1e-15, "maxiter": 500},
    )
    assert numeric.success
    closed = continuous_bits(variances, weights, budget)
    np.testing.assert_allclose(closed, numeric.x, atol=1e-4)
    assert weights @ closed / weights.sum() == pytest.approx(budget, abs=1e-9)


# --------------------------------------------------------------------------- exact integer path


def test_exact_allocation_matches_exhaustive_search():
    for seed in range(150):
        rng = np.random.default_rng(seed)
        variances, weights = _random_instance(rng, int(rng.integers(3, 6)))
        budget = _lattice_budget(rng, weights)
        result = allocate_bits(variances, weights, budget)
        best_distortion, best_cost = _brute_force(variances, weights, budget, fill_budget=True)
        assert result.exact
        assert result.distortion == pytest.approx(best_distortion, rel=1e-12), seed
        assert weights @ result.bits == best_cost, seed
        assert np.all((result.bits >= MIN_BITS) & (result.bits <= MAX_BITS))


def test_exact_allocation_meets_reachable_budget_exactly():
    # A unit-weight layer can absorb any remainder, so every lattice budget is reachable.
    for seed in range(60):
        rng = np.random.default_rng(1000 + seed)
        variances, weights = _random_instance(rng, 5)
        weights[0] = 1.0
        budget = _lattice_budget(rng, weights)
        result = allocate_bits(variances, weights, budget)
        assert int(weights @ result.bits) == round(budget * weights.sum())
        assert result.achieved == pytest.approx(budget, abs=1e-12)


@pytest.mark.parametrize("budget", [2.0, 3.0, 4.0, 4.25, 3.5, 5.125, 6.75, 8.0])
def test_dit4sr_like_budget_is_met_exactly(budget):
    # 96 attention-sized and 192 MLP-sized layers: sum of units 96 + 4 * 192 = 864,
    # a multiple of 8, so every budget above times sum(w) is a multiple of the unit.
    rng = np.random.default_rng(7)
    weights = np.array([SMALL] * 96 + [LARGE] * 192, dtype=np.float64)
    rng.shuffle(weights)
    variances = 10.0 ** rng.uniform(-5.0, -2.0, weights.size)
    result = allocate_bits(variances, weights, budget)
    assert result.exact
    assert int(weights @ result.bits) == budget * int(weights.sum())  # integer arithmetic: exact
    assert result.achieved == budget
    greedy = allocate_bits(variances, weights, budget, max_table_cells=0)
    assert result.distortion <= greedy.distortion * (1.0 + 1e-12)


# --------------------------------------------------------------------------- approximate path


def _approximate_gaps(weight_sampler, max_table_cells, seeds):
    gaps = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        n_layers = int(rng.integers(3, 6))
        variances = 10.0 ** rng.uniform(-4.0, 0.0, n_layers)
        weights = weight_sampler(rng, n_layers)
        budget = float(rng.uniform(MIN_BITS, MAX_BITS)) if seed % 2 else float(rng.integers(MIN_BITS, MAX_BITS + 1))
        options = {} if max_table_cells is None else {"max_table_cells": max_table_cells}
        result = allocate_bits(variances, weights, budget, **options)
        assert not result.exact
        assert weights @ result.bits <= budget * weights.sum() * (1.0 + 1e-9)
        best, _ = _brute_force(variances, weights, budget, fill_budget=False)
        gaps.append(result.distortion / best - 1.0)
    return np.array(gaps)


def test_float_weights_heuristic_is_near_exhaustive_optimum():
    # Rounded-up knapsack + polish: measured gap 0 on all 120 seeds; the bound leaves
    # room for the grid rounding (at most 6 L / 65536 of the budget is lost).
    gaps = _approximate_gaps(lambda rng, n: rng.uniform(0.5, 4.0, n), None, range(120))
    assert gaps.min() >= -1e-12  # never better than the optimum
    assert gaps.max() <= 0.03
    assert np.median(gaps) <= 1e-12


def test_pure_greedy_gap_is_bounded():
    # Greedy + single swaps ignores the knapsack structure: on these 120 seeded
    # instances (weights {1, 4}) the measured max gap is 0.68 with 9% of them
    # suboptimal. The seeds are fixed, so the bounds below only guard regressions.
    gaps = _approximate_gaps(lambda rng, n: rng.choice([1.0, 4.0], n), 0, range(120))
    assert gaps.min() >= -1e-12
    assert gaps.max() <= 0.75
    assert np.mean(gaps > 1e-9) <= 0.25


def test_allocate_bits_with_default_cells_on_float_weights():
    """Signature default for max_table_cells must work without the keyword."""
    rng = np.random.default_rng(3)
    variances = 10.0 ** rng.uniform(-4.0, 0.0, 40)
    weights = rng.uniform(0.5, 4.0, 40)
    result = allocate_bits(variances, weights, 4.3)
    assert isinstance(result, VaSMPResult)
    assert weights @ result.bits <= 4.3 * weights.sum() * (1.0 + 1e-9)
    assert result.distortion < modelled_distortion(variances, weights, np.full(40, 4.0))


# --------------------------------------------------------------------------- against uniform


def test_beats_uniform_when_variances_differ():
    rng = np.random.default_rng(11)
    weights = np.array([SMALL] * 40 + [LARGE] * 20, dtype=np.float64)
    variances = 10.0 ** rng.uniform(-5.0, -2.0, weights.size)
    result = allocate_bits(variances, weights, 4.0)
    assert result.achieved == 4.0
    assert result.uniform_distortion == pytest.approx(modelled_distortion(variances, weights, np.full(60, 4.0)))
    assert result.distortion < 0.9 * result.uniform_distortion


@pytest.mark.parametrize("budget", [3.0, 4.0, 6.0])
def test_equal_variances_give_uniform(budget):
    weights = np.array([SMALL, LARGE, SMALL, LARGE, LARGE], dtype=np.float64)
    result = allocate_bits(np.full(5, 0.02), weights, budget)
    np.testing.assert_array_equal(result.bits, np.full(5, int(budget)))
    assert result.distortion == pytest.approx(result.uniform_distortion, rel=1e-12)


def test_uniform_distortion_is_nan_for_fractional_budget():
    result = allocate_bits(np.array([1.0, 0.1]), np.array([1.0, 1.0]), 4.5)
    assert math.isnan(result.uniform_distortion)
    assert result.achieved == 4.5


def test_clipped_start_over_budget_is_repaired():
    # One dominant variance pushes the others below min_bits before clipping,
    # so the floored start overshoots the budget and bits must be shed.
    variances = np.array([1.0, 1e-12, 1e-12, 1e-12])
    weights = np.array([1.0, 1.3, 1.7, 2.1])
    result = allocate_bits(variances, weights, 2.5, max_table_cells=0)
    assert weights @ result.bits <= 2.5 * weights.sum() * (1.0 + 1e-9)
    assert result.bits[0] > MIN_BITS


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "variances, weights, budget",
    [
        ([1.0, 2.0], [1.0, 1.0], 1.5),  # below min_bits
        ([1.0, 2.0], [1.0, 1.0], 8.5),  # above max_bits
        ([1.0, 2.0], [1.0, 1.0], float("nan")),
        ([1.0, 2.0], [1.0], 4.0),  # shape mismatch
        ([1.0, 0.0], [1.0, 1.0], 4.0),  # zero variance
        ([1.0, -1.0], [1.0, 1.0], 4.0),
        ([1.0, 2.0], [1.0, 0.0], 4.0),  # zero weight
        ([], [], 4.0),
        ([[1.0, 2.0]], [[1.0, 1.0]], 4.0),  # not 1-D
    ],
)
def test_allocate_bits_rejects_bad_inputs(variances, weights, budget):
    with pytest.raises(ValueError):
        allocate_bits(np.asarray(variances), np.asarray(weights), budget)


def test_bad_bit_range_and_shapes_raise():
    with pytest.raises(ValueError):
        allocate_bits([1.0], [1.0], 4.0, min_bits=6, max_bits=4)
    with pytest.raises(ValueError):
        continuous_bits([1.0, 2.0], [1.0], 4.0)
    with pytest.raises(ValueError):
        modelled_distortion([1.0, 2.0], [1.0, 1.0], [4.0])
