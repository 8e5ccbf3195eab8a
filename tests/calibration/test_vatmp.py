"""VaTMP temporal bit scheduling against exhaustive search."""
import itertools
import math
import time

import numpy as np
import pytest

from qdit4sr.calibration.vatmp import (
    LayerSchedule,
    SharedSchedule,
    schedule_layer,
    schedule_shared,
)

# Gaussian MSE-optimal-clip distortion per unit variance, as supplied by the quantizer.
REALISTIC_KAPPA = {2: 0.19, 3: 0.043, 4: 0.0116, 5: 0.0032, 6: 0.00088, 7: 0.00024, 8: 6.5e-05}
SMALL_BITS = (2, 3, 4, 5)
ALL_BITS = tuple(range(2, 9))


def _random_kappa(rng, bits):
    """Random strictly decreasing coefficients keyed by bit-width."""
    return dict(zip(bits, np.cumprod(rng.uniform(0.1, 0.7, len(bits)))))


def _kappa_variants(rng, bits):
    return [
        _random_kappa(rng, bits),
        {b: 4.0**-b for b in bits},
        {b: REALISTIC_KAPPA[b] for b in bits},
    ]


def _cap(budget, steps):
    return math.floor(budget * steps + 1e-9)


def _runs(seqs):
    return 1 + np.sum(seqs[:, 1:] != seqs[:, :-1], axis=1)


def _exhaustive_layer(v, kappa, bits, budget, max_segments):
    """Least cost over every bit sequence within budget and run limit."""
    seqs = np.array(list(itertools.product(bits, repeat=v.size)))
    coef = np.vectorize(kappa.get)(seqs)
    feasible = seqs.sum(axis=1) <= _cap(budget, v.size)
    if max_segments is not None:
        feasible &= _runs(seqs) <= max_segments
    return float(np.min(np.where(feasible, coef @ v, np.inf)))


def _exhaustive_shared(v, kappa, bits, budget, segments):
    """Least total cost over every boundary set and every per-layer bit tuple."""
    steps = v.shape[1]
    tuples = np.array(list(itertools.product(bits, repeat=segments)))
    coef = np.vectorize(kappa.get)(tuples)  # [n_tuples, K]
    best = np.inf
    for inner in itertools.combinations(range(1, steps), segments - 1):
        bounds = (0, *inner, steps)
        lengths = np.diff(bounds)
        masses = np.stack([v[:, a:b].sum(axis=1) for a, b in zip(bounds[:-1], bounds[1:])], axis=1)  # [L, K]
        feasible = tuples @ lengths <= _cap(budget, steps)
        per_layer = np.where(feasible[None, :], masses @ coef.T, np.inf).min(axis=1)
        best = min(best, float(per_layer.sum()))
    return best


def _schedule_cost(v, kappa, bits_per_step):
    return float(np.sum(v * np.vectorize(kappa.get)(bits_per_step)))


# --------------------------------------------------------------------------- single layer


@pytest.mark.parametrize(
    "bits, max_steps, max_segments",
    [
        (SMALL_BITS, 6, None),
        (SMALL_BITS, 6, 1),
        (SMALL_BITS, 6, 2),
        (SMALL_BITS, 6, 3),
        (ALL_BITS, 4, None),
        (ALL_BITS, 4, 2),
        (ALL_BITS, 5, 3),
    ],
)
def test_schedule_layer_matches_exhaustive_search(bits, max_steps, max_segments):
    for seed in range(12):
        rng = np.random.default_rng(seed)
        steps = int(rng.integers(1, max_steps + 1))
        v = rng.uniform(0.0, 1.0, steps) ** 2
        budget = float(rng.uniform(bits[0], bits[-1] + 0.5))
        for kappa in _kappa_variants(rng, bits):
            result = schedule_layer(v, kappa, budget, bit_choices=bits, max_segments=max_segments)
            expected = _exhaustive_layer(v, kappa, bits, budget, max_segments)
            assert result.cost == pytest.approx(expected, rel=1e-12, abs=1e-300), (seed, kappa)
            assert result.bits.shape == (steps,)
            assert set(result.bits.tolist()) <= set(bits)
            assert result.bits.sum() <= _cap(budget, steps)
            if max_segments is not None:
                assert len(result.segments) <= max_segments
            assert _schedule_cost(v, kappa, result.bits) == pytest.approx(result.cost, rel=1e-12)


def test_kappa_accepts_mapping_array_and_callable():
    v = np.array([0.2, 1.0, 3.0, 0.5, 0.1])
    table = np.array([REALISTIC_KAPPA.get(b, 1.0) for b in range(9)])
    results = [
        schedule_layer(v, REALISTIC_KAPPA, 4.4, max_segments=3),
        schedule_layer(v, table, 4.4, max_segments=3),
        schedule_layer(v, lambda b: REALISTIC_KAPPA[b], 4.4, max_segments=3),
    ]
    for result in results[1:]:
        np.testing.assert_array_equal(result.bits, results[0].bits)
        assert result.cost == results[0].cost


def test_segments_property_lists_maximal_runs():
    schedule = LayerSchedule(bits=np.array([4, 4, 6, 6, 6, 3, 4]), cost=0.0)
    assert schedule.segments == [(0, 2, 4), (2, 5, 6), (5, 6, 3), (6, 7, 4)]
    assert LayerSchedule(bits=np.array([5]), cost=0.0).segments == [(0, 1, 5)]


def test_high_variance_steps_get_more_bits():
    steps = np.arange(20)
    v = np.exp(-(((steps - 9) / 4.0) ** 2)) + 0.01  # rise then fall
    result = schedule_layer(v, REALISTIC_KAPPA, 4.0)
    # Exchange argument: with kappa strictly decreasing an optimum never gives a
    # louder step fewer bits than a quieter one.
    louder = v[:, None] > v[None, :]
    assert not np.any(louder & (result.bits[:, None] < result.bits[None, :]))
    assert result.bits[9] > result.bits[0] and result.bits[9] > result.bits[-1]


@pytest.mark.parametrize("max_segments", [None, 1, 3])
def test_budget_at_max_bits_gives_max_everywhere(max_segments):
    v = np.random.default_rng(0).uniform(0.1, 1.0, 8)
    for budget in (8.0, 9.5):
        result = schedule_layer(v, REALISTIC_KAPPA, budget, max_segments=max_segments)
        np.testing.assert_array_equal(result.bits, np.full(8, 8))


def test_more_segments_never_cost_more():
    rng = np.random.default_rng(5)
    v = rng.uniform(0.0, 1.0, 12) ** 2
    costs = [schedule_layer(v, REALISTIC_KAPPA, 4.3, max_segments=k).cost for k in range(1, 13)]
    assert np.all(np.diff(costs) <= 1e-15)
    assert costs[-1] == pytest.approx(schedule_layer(v, REALISTIC_KAPPA, 4.3).cost, rel=1e-12)


# --------------------------------------------------------------------------- shared boundaries


@pytest.mark.parametrize("segments", [2, 3])
@pytest.mark.parametrize("bits", [SMALL_BITS, ALL_BITS])
def test_schedule_shared_matches_exhaustive_search(segments, bits):
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        v = rng.uniform(0.0, 1.0, (3, 6)) ** 2 * rng.uniform(0.1, 10.0, (3, 1))
        budget = float(rng.uniform(bits[0], bits[-1]))
        kappa = _random_kappa(rng, bits) if seed % 2 else {b: REALISTIC_KAPPA[b] for b in bits}
        result = schedule_shared(v, kappa, budget, num_segments=segments, bit_choices=bits)
        expected = _exhaustive_shared(v, kappa, bits, budget, segments)
        assert result.exact
        assert result.cost == pytest.approx(expected, rel=1e-12), seed
        _assert_consistent(result, v, kappa, budget, segments)


def _assert_consistent(result, v, kappa, budget, segments):
    steps = v.shape[1]
    assert result.boundaries[0] == 0 and result.boundaries[-1] == steps
    assert len(result.boundaries) == segments + 1
    assert np.all(np.diff(result.boundaries) > 0)
    assert result.bits.shape == (v.shape[0], segments)
    per_step = result.bits_per_step()
    assert per_step.shape == v.shape
    assert np.all(per_step.sum(axis=1) <= _cap(budget, steps))
    assert _schedule_cost(v, kappa, per_step) == pytest.approx(result.cost, rel=1e-12)


@pytest.mark.parametrize("segments", [2, 3])
def test_approximate_path_on_small_instances(segments):
    # With T = 6 the windows (one boundary anywhere, two within +-3) cover every
    # boundary set when K <= 3, so the local search must find the exact optimum.
    for seed in range(10):
        rng = np.random.default_rng(200 + seed)
        v = rng.uniform(0.0, 1.0, (3, 6)) ** 2
        budget = float(rng.uniform(2.0, 6.0))
        exact = schedule_shared(v, REALISTIC_KAPPA, budget, num_segments=segments)
        approx = schedule_shared(v, REALISTIC_KAPPA, budget, num_segments=segments, max_enumeration=1)
        assert exact.exact and not approx.exact
        _assert_consistent(approx, v, REALISTIC_KAPPA, budget, segments)
        assert approx.cost == pytest.approx(exact.cost, rel=1e-12)


def _peaked_profiles(rng, layers, steps):
    peak = rng.uniform(0, steps)
    width = rng.uniform(2.0, 6.0)
    scale = np.exp(rng.normal(0.0, 1.0, (layers, 1)))
    shape = np.exp(-(((np.arange(steps) - peak) / width) ** 2))[None, :]
    return scale * shape * rng.uniform(0.5, 1.5, (layers, steps))


def test_approximate_path_gap_on_larger_instances():
    # Here the windows no longer cover every boundary set.  Measured on these 40
    # seeded instances: 2 are suboptimal, the largest gap 0.41%, all others 0 (an
    # equal-length split alone is off by a median 10%).  The seeds are fixed; the
    # 2% bound leaves margin without hiding a broken search.
    gaps = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        layers, steps, segments = int(rng.integers(3, 30)), int(rng.integers(9, 15)), int(rng.integers(4, 7))
        v = rng.uniform(0.0, 1.0, (layers, steps)) ** 3 if seed % 2 else _peaked_profiles(rng, layers, steps)
        budget = float(rng.uniform(2.5, 6.0))
        exact = schedule_shared(v, REALISTIC_KAPPA, budget, num_segments=segments)
        approx = schedule_shared(v, REALISTIC_KAPPA, budget, num_segments=segments, max_enumeration=1)
        assert not approx.exact
        _assert_consistent(approx, v, REALISTIC_KAPPA, budget, segments)
        gaps.append(approx.cost / exact.cost - 1.0)
    gaps = np.array(gaps)
    assert gaps.min() >= -1e-12  # never better than the exact optimum
    assert gaps.max() <= 0.02


def test_one_segment_per_step_matches_independent_layers():
    rng = np.random.default_rng(3)
    v = rng.uniform(0.0, 1.0, (4, 7))
    shared = schedule_shared(v, REALISTIC_KAPPA, 4.5, num_segments=10)
    assert shared.boundaries == tuple(range(8))
    for layer in range(4):
        alone = schedule_layer(v[layer], REALISTIC_KAPPA, 4.5)
        np.testing.assert_array_equal(shared.bits[layer], alone.bits)


def test_single_segment_matches_constant_layer_schedules():
    rng = np.random.default_rng(4)
    v = rng.uniform(0.0, 1.0, (5, 9))
    shared = schedule_shared(v, REALISTIC_KAPPA, 3.7, num_segments=1)
    alone = sum(schedule_layer(row, REALISTIC_KAPPA, 3.7, max_segments=1).cost for row in v)
    assert shared.boundaries == (0, 9)
    assert shared.cost == pytest.approx(alone, rel=1e-12)


def test_shared_more_segments_never_cost_more_and_max_budget_saturates():
    rng = np.random.default_rng(6)
    v = _peaked_profiles(rng, 6, 10)
    costs = [schedule_shared(v, REALISTIC_KAPPA, 4.0, num_segments=k).cost for k in range(1, 6)]
    assert np.all(np.diff(costs) <= 1e-15 * costs[0])
    full = schedule_shared(v, REALISTIC_KAPPA, 8.0, num_segments=3)
    np.testing.assert_array_equal(full.bits, np.full((6, 3), 8))


def test_segment_of_step_and_bits_per_step():
    schedule = SharedSchedule(boundaries=(0, 2, 5, 6), bits=np.array([[3, 5, 4], [6, 2, 2]]), cost=0.0, exact=True)
    assert [schedule.segment_of_step(t) for t in range(6)] == [0, 0, 1, 1, 1, 2]
    np.testing.assert_array_equal(schedule.bits_per_step(), [[3, 3, 5, 5, 5, 4], [6, 6, 2, 2, 2, 2]])
    with pytest.raises(ValueError):
        schedule.segment_of_step(6)


def test_shared_runtime_for_dit_sized_problem():
    # 500 layers, 20 steps, 4 segments: C(19, 3) = 969 boundary sets, < 1 s measured.
    rng = np.random.default_rng(7)
    v = _peaked_profiles(rng, 500, 20)
    start = time.perf_counter()
    result = schedule_shared(v, REALISTIC_KAPPA, 4.0, num_segments=4)
    elapsed = time.perf_counter() - start
    assert result.exact
    assert np.all(result.bits_per_step().sum(axis=1) <= 80)
    assert elapsed < 30.0


# --------------------------------------------------------------------------- errors


def test_schedule_layer_rejects_bad_inputs():
    v = np.ones(4)
    with pytest.raises(ValueError):
        schedule_layer(v, REALISTIC_KAPPA, 1.9)  # below the smallest bit choice
    with pytest.raises(ValueError):
        schedule_layer(v, REALISTIC_KAPPA, float("nan"))
    with pytest.raises(ValueError):
        schedule_layer(np.ones((2, 4)), REALISTIC_KAPPA, 4.0)
    with pytest.raises(ValueError):
        schedule_layer(np.array([1.0, -0.1]), REALISTIC_KAPPA, 4.0)
    with pytest.raises(ValueError):
        schedule_layer(v, REALISTIC_KAPPA, 4.0, max_segments=0)
    with pytest.raises(ValueError):
        schedule_layer(v, {2: 0.1, 3: 0.01}, 4.0)  # kappa lacks bits 4..8
    with pytest.raises(ValueError):
        schedule_layer(v, REALISTIC_KAPPA, 4.0, bit_choices=())
    with pytest.raises(ValueError):
        schedule_layer(v, REALISTIC_KAPPA, 4.0, bit_choices=(2, 3.5))


def test_schedule_shared_rejects_bad_inputs():
    v = np.ones((2, 5))
    with pytest.raises(ValueError):
        schedule_shared(v, REALISTIC_KAPPA, 1.5)
    with pytest.raises(ValueError):
        schedule_shared(np.ones(5), REALISTIC_KAPPA, 4.0)
    with pytest.raises(ValueError):
        schedule_shared(-v, REALISTIC_KAPPA, 4.0)
    with pytest.raises(ValueError):
        schedule_shared(v, REALISTIC_KAPPA, 4.0, num_segments=0)
    with pytest.raises(ValueError):
        schedule_shared(v, REALISTIC_KAPPA, 4.0, max_enumeration=0)
    with pytest.raises(ValueError):
        schedule_shared(np.ones((2, 0)), REALISTIC_KAPPA, 4.0)
