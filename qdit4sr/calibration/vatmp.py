"""VaTMP: temporal activation bit scheduling by dynamic programming.

Activation statistics of a diffusion transformer drift over the sampler steps, so
a fixed activation bit-width wastes bits on quiet steps and starves loud ones.
With ``v[l, t]`` the activation second moment of layer ``l`` at step ``t`` and a
caller-supplied coefficient ``kappa(b)`` (the Gaussian distortion per unit
variance at ``b`` bits), the modelled distortion is ``v[l, t] * kappa(b)``.

Every layer gets an average budget of ``B`` bits per step:
``sum_t b_t <= floor(B * T)``.  Schedules are piecewise constant because each
distinct bit-width segment needs its own deployed engine.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..checks import check_int

__all__ = [
    "DEFAULT_BIT_CHOICES",
    "LayerSchedule",
    "SharedSchedule",
    "schedule_layer",
    "schedule_shared",
]

DEFAULT_BIT_CHOICES: tuple[int, ...] = tuple(range(2, 9))

# Absorbs float error in budget * T (e.g. 4.1 * 10 = 40.99999...).
_BUDGET_EPS = 1e-9

Kappa = Mapping[int, float] | Sequence[float] | np.ndarray | Callable[[int], float]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LayerSchedule:
    """Bit-width per sampler step of one layer and its modelled distortion."""

    bits: np.ndarray  # [T] int
    cost: float

    @property
    def segments(self) -> list[tuple[int, int, int]]:
        """Maximal runs of equal bits as ``(start, end, bits)`` with ``end`` exclusive."""
        runs = []
        start = 0
        for t in range(1, self.bits.size + 1):
            if t == self.bits.size or self.bits[t] != self.bits[start]:
                runs.append((start, t, int(self.bits[start])))
                start = t
        return runs


@dataclass(frozen=True)
class SharedSchedule:
    """Segment boundaries shared by all layers and one bit-width per (layer, segment)."""

    boundaries: tuple[int, ...]  # 0 = t0 < t1 < ... < tK = T
    bits: np.ndarray  # [L, K] int
    cost: float
    exact: bool  # False when the boundaries came from the local-search approximation

    def segment_of_step(self, t: int) -> int:
        """Index k of the segment with ``t_k <= t < t_{k+1}``."""
        if not 0 <= t < self.boundaries[-1]:
            raise ValueError(f"step {t} outside [0, {self.boundaries[-1]})")
        return bisect.bisect_right(self.boundaries, t) - 1

    def bits_per_step(self) -> np.ndarray:
        """[L, T] bit-width of every layer at every step."""
        return np.repeat(self.bits, np.diff(self.boundaries), axis=1)


# --------------------------------------------------------------------------- inputs


def _bit_array(bit_choices) -> np.ndarray:
    """Sorted unique candidate bit-widths as int64."""
    bits = np.asarray(list(bit_choices))
    if bits.ndim != 1 or bits.size == 0:
        raise ValueError("bit_choices must be a non-empty sequence of integers")
    if not np.all(np.equal(np.mod(bits, 1), 0)) or np.any(bits < 1):
        raise ValueError(f"bit_choices must be positive integers, got {tuple(bit_choices)}")
    return np.unique(bits.astype(np.int64))


def _kappa_table(kappa: Kappa, bits: np.ndarray) -> np.ndarray:
    """Coefficients aligned with ``bits`` from a mapping, an array indexed by bits, or a callable."""
    try:
        if isinstance(kappa, Mapping):
            coeffs = [kappa[int(b)] for b in bits]
        elif callable(kappa):
            coeffs = [kappa(int(b)) for b in bits]
        else:
            table = np.asarray(kappa, dtype=np.float64)
            if table.ndim != 1:
                raise ValueError("a kappa array must be 1-D and indexed by bit-width")
            coeffs = table[bits]
    except (KeyError, IndexError) as err:
        raise ValueError(f"kappa has no coefficient for one of the bit choices {bits.tolist()}") from err
    coeffs = np.asarray(coeffs, dtype=np.float64)
    if not (np.all(np.isfinite(coeffs)) and np.all(coeffs >= 0)):
        raise ValueError("kappa coefficients must be finite and non-negative")
    return coeffs


def _variance_array(v, ndim: int) -> np.ndarray:
    arr = np.asarray(v, dtype=np.float64)
    if arr.ndim != ndim or arr.size == 0:
        raise ValueError(f"expected a non-empty {ndim}-D variance array, got shape {arr.shape}")
    if not (np.all(np.isfinite(arr)) and np.all(arr >= 0)):
        raise ValueError("variances must be finite and non-negative")
    return arr


def _extra_capacity(budget: float, steps: int, bits: np.ndarray) -> int:
    """Bit-sum allowed above the all-minimum schedule (capped where all-maximum fits)."""
    if not math.isfinite(budget):
        raise ValueError(f"budget must be finite, got {budget!r}")
    total = math.floor(budget * steps + _BUDGET_EPS)
    if total < bits[0] * steps:
        raise ValueError(f"budget {budget} is below the smallest bit choice {int(bits[0])}")
    return int(min(total, bits[-1] * steps) - bits[0] * steps)


# --------------------------------------------------------------------------- single layer


def _per_step_dp(v: np.ndarray, coef: np.ndarray, extra: np.ndarray, cap: int) -> np.ndarray:
    """Optimal choice index per step with no segment limit: DP over (step, extra bit-sum).

    O(T * |bits| * cap) work vectorised over the bit-sum axis.
    """
    steps = v.size
    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0
    choice = np.zeros((steps, cap + 1), dtype=np.int64)
    for t in range(steps):
        new = np.full(cap + 1, np.inf)
        for c, e in enumerate(extra):
            if e > cap:
                break
            candidate = dp[: cap + 1 - e] + coef[c] * v[t]
            better = candidate < new[e:]
            new[e:][better] = candidate[better]
            choice[t, e:][better] = c
        dp = new
    picks = np.empty(steps, dtype=np.int64)
    used = int(np.argmin(dp))
    for t in range(steps - 1, -1, -1):
        picks[t] = choice[t, used]
        used -= int(extra[picks[t]])
    return picks


def _segment_dp(v: np.ndarray, coef: np.ndarray, extra: np.ndarray, cap: int, max_segments: int) -> np.ndarray:
    """Optimal choice index per step using at most ``max_segments`` constant runs.

    State (segments used k, end step j, extra bit-sum s); a transition appends the
    segment [i, j) at one bit-width with SegCost = kappa(b) * (P[j] - P[i]) from
    prefix sums.  Adjacent segments may repeat a bit-width, so "exactly k pieces"
    covers "at most k runs".  O(K * T^2 * |bits| * cap) work vectorised over s.
    """
    steps = v.size
    prefix = np.concatenate(([0.0], np.cumsum(v)))
    dp = np.full((max_segments + 1, steps + 1, cap + 1), np.inf)
    dp[0, 0, 0] = 0.0
    parent_start = np.zeros(dp.shape, dtype=np.int64)
    parent_choice = np.zeros(dp.shape, dtype=np.int64)
    for k in range(1, max_segments + 1):
        for j in range(k, steps + 1):
            for i in range(k - 1, j):
                previous = dp[k - 1, i]
                mass = prefix[j] - prefix[i]
                for c, e in enumerate(extra):
                    shift = int(e) * (j - i)
                    if shift > cap:
                        break
                    candidate = previous[: cap + 1 - shift] + coef[c] * mass
                    better = candidate < dp[k, j, shift:]
                    dp[k, j, shift:][better] = candidate[better]
                    parent_start[k, j, shift:][better] = i
                    parent_choice[k, j, shift:][better] = c
    k, used = np.unravel_index(int(np.argmin(dp[:, steps, :])), (max_segments + 1, cap + 1))
    picks = np.empty(steps, dtype=np.int64)
    end = steps
    while end > 0:
        start = int(parent_start[k, end, used])
        c = int(parent_choice[k, end, used])
        picks[start:end] = c
        used -= int(extra[c]) * (end - start)
        end, k = start, k - 1
    return picks


def schedule_layer(
    v: np.ndarray,
    kappa: Kappa,
    budget: float,
    bit_choices: Sequence[int] = DEFAULT_BIT_CHOICES,
    max_segments: int | None = None,
) -> LayerSchedule:
    """Exact least-distortion piecewise-constant schedule of one layer.

    Minimises ``sum_t v_t kappa(b_t)`` subject to ``sum_t b_t <= floor(B T)`` and at
    most ``max_segments`` runs of equal bits (None: unlimited, solved by the cheaper
    per-step DP).
    """
    v = _variance_array(v, 1)
    bits = _bit_array(bit_choices)
    coef = _kappa_table(kappa, bits)
    cap = _extra_capacity(budget, v.size, bits)
    extra = bits - bits[0]
    if max_segments is None or check_int("max_segments", max_segments) >= v.size:
        picks = _per_step_dp(v, coef, extra, cap)
    else:
        picks = _segment_dp(v, coef, extra, cap, int(max_segments))
    return LayerSchedule(bits=bits[picks], cost=float(coef[picks] @ v))


# --------------------------------------------------------------------------- shared boundaries


@dataclass(frozen=True)
class _Problem:
    """Shared-schedule data prepared once: prefix sums over steps and the bit table."""

    prefix: np.ndarray  # [T + 1, L] step-major, so a segment mass is one row difference
    coef: np.ndarray  # [n_bits]
    extra: np.ndarray  # [n_bits] bits - min bit
    cap: int  # extra bit-sum allowed per layer

    def mass(self, start: int, end: int) -> np.ndarray:
        """[L] sum of v over steps [start, end)."""
        return self.prefix[end] - self.prefix[start]

    def empty_table(self) -> np.ndarray:
        """[cap + 1, L] least cost per extra bit-sum before any segment: 0 at sum 0."""
        table = np.full((self.cap + 1, self.prefix.shape[1]), np.inf)
        table[0] = 0.0
        return table


def _advance(problem: _Problem, table: np.ndarray, start: int, end: int) -> np.ndarray:
    """Knapsack table after appending segment [start, end) at each layer's best bit-width."""
    mass = problem.mass(start, end)
    cap = problem.cap
    new = np.full_like(table, np.inf)
    for c, e in enumerate(problem.extra):
        shift = int(e) * (end - start)
        if shift > cap:
            break
        np.minimum(new[shift:], table[: cap + 1 - shift] + problem.coef[c] * mass, out=new[shift:])
    return new


def _close(problem: _Problem, table: np.ndarray, start: int, end: int, tail: np.ndarray | None = None) -> float:
    """Total least cost over layers once segment [start, end) and then ``tail`` are added.

    ``tail`` is the least cost of the segments after ``end`` per bit-sum still
    available (None: nothing follows).  Without a tail the last segment is folded in
    through a running minimum (the budget need not be used up): one gather instead of
    a full shift-and-min pass.
    """
    if tail is not None:
        joined = _advance(problem, tail, start, end)
        return float((table + joined[::-1]).min(axis=0).sum())
    best_below = np.minimum.accumulate(table, axis=0)
    shifts = problem.extra * (end - start)
    fits = shifts <= problem.cap
    candidates = best_below[problem.cap - shifts[fits]] + problem.coef[fits, None] * problem.mass(start, end)
    return float(candidates.min(axis=0).sum())


def _close_two(problem: _Problem, table: np.ndarray, start: int, end: int, cuts: np.ndarray) -> np.ndarray:
    """[len(cuts)] total least cost when the last two segments are [start, cut) and [cut, end).

    Every (bits, bits) pair of the two segments is one gather from the running
    minimum of ``table``, vectorised over pairs, cuts and layers, which replaces a
    table update per cut in the exhaustive search.
    """
    best_below = np.minimum.accumulate(table, axis=0)
    first_mass = problem.prefix[cuts] - problem.prefix[start]  # [P, L]
    second_mass = problem.prefix[end] - problem.prefix[cuts]
    shifts = (problem.extra[:, None, None] * (cuts - start)[None, None, :]
              + problem.extra[None, :, None] * (end - cuts)[None, None, :])  # [n_bits, n_bits, P]
    fits = shifts <= problem.cap
    costs = best_below[np.where(fits, problem.cap - shifts, 0)]  # [n_bits, n_bits, P, L]
    costs += problem.coef[:, None, None, None] * first_mass + problem.coef[None, :, None, None] * second_mass
    costs[~fits] = np.inf
    return costs.min(axis=(0, 1)).sum(axis=-1)


def _head_table(problem: _Problem, boundaries: Sequence[int]) -> np.ndarray:
    """Exact-bit-sum table after the segments between consecutive ``boundaries``."""
    table = problem.empty_table()
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        table = _advance(problem, table, start, end)
    return table


def _tail_table(problem: _Problem, boundaries: Sequence[int]) -> np.ndarray | None:
    """At-most-bit-sum table of the segments between consecutive ``boundaries`` (None if there are none).

    Starting from zeros (nothing to pay whatever is left) keeps it non-increasing in
    the bit-sum, so the same shift-and-min update builds it back to front.
    """
    if len(boundaries) < 2:
        return None
    table = np.zeros_like(problem.empty_table())
    for start, end in zip(boundaries[-2::-1], boundaries[:0:-1]):
        table = _advance(problem, table, start, end)
    return table


def _boundaries_cost(problem: _Problem, boundaries: tuple[int, ...]) -> float:
    """Total least cost for fixed boundaries (layers solved independently, vectorised)."""
    return _close(problem, _head_table(problem, boundaries[:-1]), boundaries[-2], boundaries[-1])


def _knapsack_choices(problem: _Problem, boundaries: tuple[int, ...]) -> np.ndarray:
    """[L, K] optimal choice indices for fixed boundaries (the same DP, with backtracking)."""
    n_layers = problem.prefix.shape[1]
    cap = problem.cap
    table = problem.empty_table()
    choice = np.zeros((len(boundaries) - 1, cap + 1, n_layers), dtype=np.int64)
    for k, (start, end) in enumerate(zip(boundaries[:-1], boundaries[1:])):
        mass = problem.mass(start, end)
        new = np.full_like(table, np.inf)
        for c, e in enumerate(problem.extra):
            shift = int(e) * (end - start)
            if shift > cap:
                break
            candidate = table[: cap + 1 - shift] + problem.coef[c] * mass
            better = candidate < new[shift:]
            new[shift:][better] = candidate[better]
            choice[k, shift:][better] = c
        table = new
    layers = np.arange(n_layers)
    used = np.argmin(table, axis=0)
    picks = np.empty((n_layers, len(boundaries) - 1), dtype=np.int64)
    for k in range(len(boundaries) - 2, -1, -1):
        picks[:, k] = choice[k, used, layers]
        used = used - problem.extra[picks[:, k]] * (boundaries[k + 1] - boundaries[k])
    return picks


def _best_placement(
    problem: _Problem,
    head: np.ndarray,
    low: int,
    high: int,
    count: int,
    tail: np.ndarray | None,
    ranges: Sequence[tuple[int, int]] | None = None,
) -> tuple[float, tuple[int, ...]]:
    """Best positions for ``count`` boundaries strictly between ``low`` and ``high``.

    ``head`` holds the segments before ``low``, ``tail`` those after ``high``;
    ``ranges`` optionally confines boundary i to ``ranges[i]`` (inclusive).
    Depth-first over partial placements, so all candidates sharing their leading
    boundaries share those table updates; the last boundary (with nothing after
    ``high``) is scored for all its positions in one vectorised fold.
    """
    best: list = [np.inf, ()]

    def search(table: np.ndarray, placed: tuple[int, ...]) -> None:
        last = placed[-1] if placed else low
        if len(placed) == count:
            cost = _close(problem, table, last, high, tail)
            if cost < best[0]:
                best[:] = [cost, placed]
            return
        first, final = last + 1, high - (count - len(placed))  # leave one step per later segment
        if ranges is not None:
            first, final = max(first, ranges[len(placed)][0]), min(final, ranges[len(placed)][1])
        if len(placed) == count - 1 and tail is None and first <= final:
            cuts = np.arange(first, final + 1)
            costs = _close_two(problem, table, last, high, cuts)
            pick = int(np.argmin(costs))
            if costs[pick] < best[0]:
                best[:] = [float(costs[pick]), (*placed, int(cuts[pick]))]
            return
        for position in range(first, final + 1):
            search(_advance(problem, table, last, position), (*placed, position))

    search(head, ())
    return best[0], best[1]


def _exhaustive_boundaries(problem: _Problem, steps: int, segments: int) -> tuple[int, ...]:
    """Best of all C(T-1, K-1) boundary sets."""
    _, inner = _best_placement(problem, problem.empty_table(), 0, steps, segments - 1, None)
    return (0, *inner, steps)


def _equal_length_boundaries(steps: int, segments: int) -> tuple[int, ...]:
    return tuple(int(round(k * steps / segments)) for k in range(segments + 1))


def _equal_mass_boundaries(total: np.ndarray, segments: int) -> tuple[int, ...]:
    """Boundaries splitting the layer-summed variance into equal shares, kept strictly increasing."""
    steps = total.size
    cumulative = np.cumsum(total)
    if cumulative[-1] <= 0:
        return _equal_length_boundaries(steps, segments)
    cuts = [0]
    for k in range(1, segments):
        t = int(np.searchsorted(cumulative, k * cumulative[-1] / segments)) + 1
        # Leave room for the remaining segments on both sides.
        cuts.append(min(max(t, cuts[-1] + 1), steps - (segments - k)))
    return (*cuts, steps)


def _bit_prices(v: np.ndarray, coef: np.ndarray, bits: np.ndarray, total_bits: int) -> np.ndarray:
    """[L] smallest price per bit at which each layer's per-step relaxation fits its budget.

    With price lam every step independently picks argmin_b kappa(b) v_t + lam b; the
    bit-sum falls as lam grows, so a log-space bisection finds the price.
    """

    def bit_sum(lam: np.ndarray) -> np.ndarray:
        score = coef[None, None, :] * v[:, :, None] + lam[:, None, None] * bits[None, None, :]
        return bits[np.argmin(score, axis=2)].sum(axis=1)

    scale = float(coef.max() * max(v.max(), 1e-300))
    low = np.full(v.shape[0], -60.0)  # log10 price; 10^-60 * scale makes bits free
    high = np.full(v.shape[0], 2.0)  # 100 * scale exceeds any distortion saving
    for _ in range(60):
        mid = 0.5 * (low + high)
        fits = bit_sum(scale * 10.0**mid) <= total_bits
        high = np.where(fits, mid, high)
        low = np.where(fits, low, mid)
    return scale * 10.0**high


def _priced_boundaries(problem: _Problem, v: np.ndarray, bits: np.ndarray, segments: int) -> tuple[int, ...]:
    """Exact boundary DP for the priced problem sum_l [kappa(b) mass + lam_l b n], budgets dropped.

    With a price per bit for each layer the budgets leave the objective, every
    segment's cost is separable, and the best K-segment split is an O(K T^2) DP.
    """
    steps = v.shape[1]
    prices = _bit_prices(v, problem.coef, bits, int(problem.cap + bits[0] * steps))
    seg_cost = np.full((steps + 1, steps + 1), np.inf)
    for start in range(steps):
        for end in range(start + 1, steps + 1):
            distortion = problem.coef[:, None] * problem.mass(start, end)[None, :]
            seg_cost[start, end] = (distortion + np.outer(bits * (end - start), prices)).min(axis=0).sum()
    best = np.full((segments + 1, steps + 1), np.inf)
    best[0, 0] = 0.0
    parent = np.zeros((segments + 1, steps + 1), dtype=np.int64)
    for k in range(1, segments + 1):
        for end in range(k, steps + 1):
            totals = best[k - 1, :end] + seg_cost[:end, end]
            parent[k, end] = int(np.argmin(totals))
            best[k, end] = totals[parent[k, end]]
    cuts = [steps]
    for k in range(segments, 0, -1):
        cuts.append(int(parent[k, cuts[-1]]))
    return tuple(reversed(cuts))


def _improve_window(
    problem: _Problem, current: tuple[int, ...], cost: float, first: int, width: int, reach: int | None
) -> tuple[tuple[int, ...], float]:
    """Re-place boundaries ``first .. first+width-1`` optimally (within ``reach`` steps of now, if given)."""
    low, high = current[first - 1], current[first + width]
    ranges = None if reach is None else [(p - reach, p + reach) for p in current[first : first + width]]
    head = _head_table(problem, current[:first])
    tail = _tail_table(problem, current[first + width :])
    trial_cost, inner = _best_placement(problem, head, low, high, width, tail, ranges)
    if trial_cost < cost * (1.0 - 1e-12):
        return (*current[:first], *inner, *current[first + width :]), trial_cost
    return current, cost


def _local_search(
    problem: _Problem, start: tuple[int, ...], moves: Sequence[tuple[int, int | None]]
) -> tuple[tuple[int, ...], float]:
    """Sweep the window ``moves`` (width, reach) in order, restarting from the first after any gain."""
    current, cost = start, _boundaries_cost(problem, start)
    level = 0
    while level < len(moves):
        width, reach = moves[level]
        before = cost
        for first in range(1, len(current) - width):
            current, cost = _improve_window(problem, current, cost, first, width, reach)
        level = 0 if cost < before else level + 1
    return current, cost


# Local-search neighbourhoods as (width, reach): one boundary anywhere between its
# neighbours, then two adjacent boundaries within +-3 steps, then three within +-2.
# Wider moves escape most single-move optima; the reach keeps each sweep O(K * 125)
# table updates.  On random test instances this closed all but one gap (< 1%).
_MOVES = ((1, None), (2, 3), (3, 2))


def _descent_boundaries(problem: _Problem, v: np.ndarray, bits: np.ndarray, segments: int) -> tuple[int, ...]:
    """Local search from the equal-length, equal-variance-share and priced starts; best end point."""
    steps = v.shape[1]
    starts = {
        _equal_length_boundaries(steps, segments),
        _equal_mass_boundaries(v.sum(axis=0), segments),
        _priced_boundaries(problem, v, bits, segments),
    }
    ends = [_local_search(problem, start, _MOVES) for start in sorted(starts)]
    return min(ends, key=lambda end: end[1])[0]


def schedule_shared(
    v: np.ndarray,
    kappa: Kappa,
    budget: float,
    num_segments: int = 4,
    bit_choices: Sequence[int] = DEFAULT_BIT_CHOICES,
    max_enumeration: int = 20000,
) -> SharedSchedule:
    """Least total distortion with K segment boundaries shared by all layers.

    Deployment builds one engine per segment, so K stays small.  Each layer picks
    one bit-width per segment under its own budget ``sum_k n_k b_{l,k} <= floor(B T)``.

    Exact (``exact=True``) when ``C(T-1, K-1) <= max_enumeration``: all boundary sets
    are enumerated depth-first; for given boundaries each layer's choice is a small
    knapsack over (segment, extra bit-sum), solved by DP vectorised over layers.  Sets
    sharing leading boundaries share their tables and the last boundary is scored for
    all positions at once, so the work is about C(T-1, K-2) table updates of
    O(|bits| * cap * L) plus C(T-1, K-1) folds of O(|bits|^2 * L), with
    cap <= (max bit - min bit) * T.  K >= T gives one segment per step.

    Otherwise (``exact=False``) a local search runs from three starts -- equal
    lengths, equal shares of the layer-summed variance, and the exact optimum of a
    priced relaxation (each layer pays a per-bit price that makes its per-step
    relaxation fit its budget, which removes the budgets and makes the boundary choice
    an O(K T^2) DP) -- re-placing windows of 1 (anywhere), 2 (within +-3 steps) and 3
    (within +-2) adjacent boundaries until no window improves; each evaluation reuses
    the tables of the fixed head and tail.  The per-layer bits are still optimal for
    the boundaries found, but the boundaries carry no optimality guarantee.
    """
    v = _variance_array(v, 2)
    segments = min(check_int("num_segments", num_segments), v.shape[1])
    max_enumeration = check_int("max_enumeration", max_enumeration)
    bits = _bit_array(bit_choices)
    coef = _kappa_table(kappa, bits)
    steps = v.shape[1]
    problem = _Problem(
        prefix=np.concatenate((np.zeros((1, v.shape[0])), np.cumsum(v.T, axis=0)), axis=0),
        coef=coef,
        extra=bits - bits[0],
        cap=_extra_capacity(budget, steps, bits),
    )
    exact = math.comb(steps - 1, segments - 1) <= max_enumeration
    if exact:
        boundaries = _exhaustive_boundaries(problem, steps, segments)
    else:
        boundaries = _descent_boundaries(problem, v, bits, segments)
    picks = _knapsack_choices(problem, boundaries)
    masses = np.stack([problem.mass(a, b) for a, b in zip(boundaries[:-1], boundaries[1:])], axis=1)
    cost = float(np.sum(coef[picks] * masses))
    return SharedSchedule(boundaries=boundaries, bits=bits[picks], cost=cost, exact=exact)
