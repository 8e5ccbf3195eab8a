"""VaSMP: data-free inter-layer weight bit allocation.

After a Hadamard rotation the weights of every linear layer are close to Gaussian,
so the high-rate model of uniform quantization gives the distortion of layer ``l``
at ``b`` bits as

    D_l(b) = w_l * var_l * 4^{-b},

where ``w_l = N_l`` is the number of weights (also the storage cost of one extra
bit) and ``var_l`` is the mean per-output-channel weight variance.  VaSMP
minimises ``sum_l D_l(b_l)`` subject to the weighted budget
``sum_l w_l b_l = B * sum_l w_l`` with integer ``b_l`` in ``[min_bits, max_bits]``.
No calibration data is needed: only the weights themselves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..checks import check_int

__all__ = [
    "layer_weight_variance",
    "continuous_bits",
    "modelled_distortion",
    "VaSMPResult",
    "allocate_bits",
]

# Relative slack on the weighted budget for float weights: sums of ~1e3 products
# carry rounding error far below this, while a real overshoot of one bit is far above.
_BUDGET_RTOL = 1e-9

# Default size limit (layers x budget units) of the knapsack table; DiT4SR
# (units 1 and 4, a few hundred layers) needs ~1e6 cells.
_MAX_TABLE_CELLS = 20_000_000

# Budget resolution of the rounded-weight DP used for non-integer weights.
_MAX_GRID_CELLS = 1 << 16


# --------------------------------------------------------------------------- inputs


def _as_float64(x) -> np.ndarray:
    # Duck-typed torch support keeps this module importable without torch.
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _layer_arrays(variances, weights) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D float64 copies of per-layer variances and weights."""
    var = _as_float64(variances)
    w = _as_float64(weights)
    if var.ndim != 1 or var.size == 0:
        raise ValueError(f"variances must be a non-empty 1-D array, got shape {var.shape}")
    if w.shape != var.shape:
        raise ValueError(f"weights shape {w.shape} does not match variances shape {var.shape}")
    if not (np.all(np.isfinite(var)) and np.all(var > 0)):
        raise ValueError("variances must be finite and strictly positive")
    if not (np.all(np.isfinite(w)) and np.all(w > 0)):
        raise ValueError("weights must be finite and strictly positive")
    return var, w


def _check_bit_range(budget: float, min_bits: int, max_bits: int) -> None:
    for name, value in (("min_bits", min_bits), ("max_bits", max_bits)):
        check_int(name, value)
    if min_bits > max_bits:
        raise ValueError(f"min_bits={min_bits} exceeds max_bits={max_bits}")
    if not math.isfinite(budget) or not min_bits <= budget <= max_bits:
        raise ValueError(f"budget {budget!r} is infeasible for bits in [{min_bits}, {max_bits}]")


# --------------------------------------------------------------------------- model


def layer_weight_variance(w_h) -> float:
    """Mean over output channels of the per-output-channel variance of ``w_h`` [out, in].

    Trailing dimensions (e.g. a conv kernel) are flattened into the input axis.
    """
    arr = _as_float64(w_h)
    if arr.ndim < 2 or arr.shape[0] == 0 or arr[0].size == 0:
        raise ValueError(f"expected a non-empty weight matrix [out, in], got shape {arr.shape}")
    rows = arr.reshape(arr.shape[0], -1)
    return float(rows.var(axis=1).mean())


def continuous_bits(variances, weights, budget: float) -> np.ndarray:
    """Real-valued optimum ``b_l* = B + 0.5 * (log2 var_l - mean_w(log2 var))``.

    Lagrangian ``sum w var 4^-b + lam (sum w b - B W)``: setting the derivative to
    zero gives ``ln4 * var_l 4^-b_l = lam`` for every layer, i.e.
    ``b_l = 0.5 log2 var_l + c``; the weighted budget fixes ``c = B - 0.5 mean_w(log2 var)``.
    """
    var, w = _layer_arrays(variances, weights)
    if not math.isfinite(budget):
        raise ValueError(f"budget must be finite, got {budget!r}")
    log_var = np.log2(var)
    weighted_mean = float(np.sum(w * log_var) / np.sum(w))
    return budget + 0.5 * (log_var - weighted_mean)


def modelled_distortion(variances, weights, bits) -> float:
    """High-rate distortion ``sum_l w_l var_l 4^{-b_l}``."""
    var, w = _layer_arrays(variances, weights)
    b = _as_float64(bits)
    if b.shape != var.shape:
        raise ValueError(f"bits shape {b.shape} does not match variances shape {var.shape}")
    return float(np.sum(w * var * np.power(4.0, -b)))


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class VaSMPResult:
    """Integer allocation plus the quantities needed to judge it."""

    bits: np.ndarray  # [L] int
    continuous: np.ndarray  # [L] real-valued optimum before rounding
    budget: float  # requested weighted mean bits B
    achieved: float  # weighted mean of ``bits``
    distortion: float  # modelled distortion of ``bits``
    uniform_distortion: float  # all layers at round(B) when B is an integer, else NaN
    exact: bool = False  # True when solved by the exact knapsack, False for the approximate path


# --------------------------------------------------------------------------- knapsack DP


def _lattice_units(w: np.ndarray) -> np.ndarray | None:
    """Weights divided by their gcd, or None when they are not all integers."""
    rounded = np.round(w)
    if np.any(np.abs(w - rounded) > 1e-9 * np.maximum(1.0, w)) or rounded.max() > 2.0**53:
        return None
    ints = rounded.astype(np.int64)
    return ints // np.gcd.reduce(ints)


def _lattice_capacity(units: np.ndarray, budget: float, min_bits: int) -> int:
    """Budget above the all-``min_bits`` start, in lattice units (floored, so never exceeded)."""
    total = int(units.sum())
    return math.floor(budget * total + 1e-9) - min_bits * total


def _level_distortion(var: np.ndarray, scale: np.ndarray, min_bits: int, max_bits: int) -> np.ndarray:
    """[L, levels] table of ``scale_l * var_l * 4^-b`` for b = min_bits..max_bits."""
    levels = np.arange(min_bits, max_bits + 1, dtype=np.float64)
    return scale[:, None] * var[:, None] * np.power(4.0, -levels)[None, :]


def _knapsack_levels(distortion: np.ndarray, units: np.ndarray, cap: int, fill_budget: bool) -> np.ndarray:
    """Per-layer level index (bits - min_bits) minimising distortion with ``sum units * level <= cap``.

    ``dp[c]`` is the least distortion of the layers seen so far whose extra cost is
    exactly ``c`` units.  With ``fill_budget`` the answer takes the largest reachable
    ``c`` (so the budget is met exactly whenever any assignment meets it) and the
    least distortion at that cost; otherwise simply the least distortion.
    Time O(L * levels * cap) vectorised over cap, memory O(L * cap) for backtracking.
    """
    n_layers, n_levels = distortion.shape
    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0
    choice = np.zeros((n_layers, cap + 1), dtype=np.int8)
    for layer in range(n_layers):
        new = np.full(cap + 1, np.inf)
        for level in range(n_levels):
            shift = level * int(units[layer])
            if shift > cap:
                break
            candidate = dp[: cap + 1 - shift] + distortion[layer, level]
            better = candidate < new[shift:]
            new[shift:][better] = candidate[better]
            choice[layer, shift:][better] = level
        dp = new
    used = int(np.flatnonzero(np.isfinite(dp))[-1]) if fill_budget else int(np.argmin(dp))
    levels = np.empty(n_layers, dtype=np.int64)
    for layer in range(n_layers - 1, -1, -1):
        levels[layer] = choice[layer, used]
        used -= int(levels[layer]) * int(units[layer])
    return levels


# --------------------------------------------------------------------------- heuristic moves


def _step_down_loss(var: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Distortion added per unit cost by removing one bit: (D(b-1) - D(b)) / w = 3 var 4^-b."""
    return 3.0 * var * np.power(4.0, -bits.astype(np.float64))


def _step_up_gain(var: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Distortion saved per unit cost by adding one bit: (D(b) - D(b+1)) / w = 0.75 var 4^-b."""
    return 0.75 * var * np.power(4.0, -bits.astype(np.float64))


def _remove_until_within(bits, var, w, limit, min_bits) -> np.ndarray:
    """Clipping up to ``min_bits`` can push the floored start over budget: shed the cheapest-loss bits."""
    bits = bits.copy()
    while float(w @ bits) > limit:
        loss = np.where(bits > min_bits, _step_down_loss(var, bits), np.inf)
        bits[int(np.argmin(loss))] -= 1
    return bits


def _add_while_fits(bits, var, w, limit, max_bits) -> np.ndarray:
    """Give one bit at a time to the layer with the largest gain per unit cost that still fits."""
    bits = bits.copy()
    while True:
        slack = limit - float(w @ bits)
        fits = (bits < max_bits) & (w <= slack)
        if not fits.any():
            return bits
        gain = np.where(fits, _step_up_gain(var, bits), -np.inf)
        bits[int(np.argmax(gain))] += 1


def _improve_by_moves(bits, var, w, limit, min_bits, max_bits) -> np.ndarray:
    """Local search over single adds and single swaps (one bit from layer i to layer j).

    Each round applies the move that lowers the distortion most while staying within
    the budget; it stops when no move helps.  The distortion strictly decreases, so
    this terminates; the round cap only bounds the worst case.
    """
    bits = bits.copy()
    off_diagonal = ~np.eye(bits.size, dtype=bool)
    for _ in range(4 * bits.size * (max_bits - min_bits) + 16):
        slack = limit - float(w @ bits)
        gain = np.where(bits < max_bits, w * _step_up_gain(var, bits), -np.inf)
        loss = np.where(bits > min_bits, w * _step_down_loss(var, bits), np.inf)
        add_delta = np.where(w <= slack, -gain, np.inf)
        swap_fits = (w[None, :] - w[:, None] <= slack) & off_diagonal
        swap_delta = np.where(swap_fits, loss[:, None] - gain[None, :], np.inf)
        best_add = int(np.argmin(add_delta))
        best_swap = np.unravel_index(int(np.argmin(swap_delta)), swap_delta.shape)
        current = float(np.sum(w * var * np.power(4.0, -bits.astype(np.float64))))
        threshold = -1e-12 * current
        if add_delta[best_add] <= swap_delta[best_swap] and add_delta[best_add] < threshold:
            bits[best_add] += 1
        elif swap_delta[best_swap] < threshold:
            bits[best_swap[0]] -= 1
            bits[best_swap[1]] += 1
        else:
            break
    return bits


def _polish(bits, var, w, limit, min_bits, max_bits) -> np.ndarray:
    """Spend any leftover budget greedily, then apply improving adds and swaps."""
    bits = _add_while_fits(bits, var, w, limit, max_bits)
    return _improve_by_moves(bits, var, w, limit, min_bits, max_bits)


# --------------------------------------------------------------------------- solvers


def _exact_allocation(var, units, budget, min_bits, max_bits) -> np.ndarray:
    """Globally optimal bits on the integer weight lattice (budget filled as far as reachable)."""
    cap = _lattice_capacity(units, budget, min_bits)
    distortion = _level_distortion(var, units.astype(np.float64), min_bits, max_bits)
    return min_bits + _knapsack_levels(distortion, units, cap, fill_budget=True)


def _greedy_allocation(var, w, continuous, limit, min_bits, max_bits) -> np.ndarray:
    """Continuous optimum -> clip -> floor -> shed overshoot -> greedy adds -> move polish."""
    bits = np.floor(np.clip(continuous, min_bits, max_bits)).astype(np.int64)
    bits = _remove_until_within(bits, var, w, limit, min_bits)
    return _polish(bits, var, w, limit, min_bits, max_bits)


def _rounded_lattice_allocation(var, w, budget, min_bits, max_bits, cells: int) -> np.ndarray:
    """Knapsack DP on weights rounded *up* to a grid of ``cells`` steps, then move polish.

    Rounding costs up keeps every DP answer feasible for the true weights; the polish
    spends the slack the rounding left.  The grid error shrinks as ``cells`` grows.
    """
    extra_budget = (budget - min_bits) * float(w.sum())
    quantum = extra_budget / cells
    units = np.ceil(w / quantum).astype(np.int64)
    distortion = _level_distortion(var, w, min_bits, max_bits)
    bits = min_bits + _knapsack_levels(distortion, units, cells, fill_budget=False)
    limit = budget * float(w.sum()) * (1.0 + _BUDGET_RTOL)
    return _polish(bits, var, w, limit, min_bits, max_bits)


def _approximate_allocation(var, w, continuous, budget, min_bits, max_bits, max_table_cells) -> np.ndarray:
    """Best of the greedy, the rounded-lattice DP (if its table fits) and, for integer B, polished uniform.

    Rounding weights up makes the DP miss optima that spend the budget to the last
    bit, the uniform allocation among them; seeding it keeps the heuristic from ever
    losing to uniform.
    """
    limit = budget * float(w.sum()) * (1.0 + _BUDGET_RTOL)
    candidates = [_greedy_allocation(var, w, continuous, limit, min_bits, max_bits)]
    cells = min(max_table_cells // var.size - 1, _MAX_GRID_CELLS)
    if cells >= 1 and budget > min_bits:
        candidates.append(_rounded_lattice_allocation(var, w, budget, min_bits, max_bits, cells))
    if abs(budget - round(budget)) <= 1e-9:
        uniform = np.full(var.size, int(round(budget)), dtype=np.int64)
        candidates.append(_improve_by_moves(uniform, var, w, limit, min_bits, max_bits))
    scores = [float(np.sum(w * var * np.power(4.0, -b.astype(np.float64)))) for b in candidates]
    return candidates[int(np.argmin(scores))]


# --------------------------------------------------------------------------- public solver


def allocate_bits(
    variances,
    weights,
    budget: float,
    min_bits: int = 2,
    max_bits: int = 8,
    *,
    max_table_cells: int = _MAX_TABLE_CELLS,
) -> VaSMPResult:
    """Integer bit-widths per layer minimising the modelled distortion under the weighted budget.

    Solver choice (``result.exact`` says which one ran):

    * Exact: when all weights are integers (parameter counts) they are divided by
      their gcd and the problem is a knapsack over that lattice, solved by DP when
      ``L * (C + 1) <= max_table_cells`` (C = budget above ``min_bits`` in lattice
      units).  The result is globally optimal, never exceeds the budget and meets it
      exactly whenever any assignment does (otherwise it uses the largest reachable
      amount, then the least distortion).  DiT4SR layers hold 1536*1536 or 1536*6144
      weights, i.e. units 1 and 4, so this path always applies there.
    * Approximate otherwise: the best of (a) the greedy -- continuous optimum, clip
      to ``[min_bits, max_bits]``, floor, shed bits from the cheapest-loss layers if
      the start overshoots, then repeatedly add the bit with the largest gain per unit
      cost that still fits; (b) the same knapsack DP on weights rounded up to a grid
      (skipped when the table would not fit); (c) for integer B the uniform
      allocation.  All finish with a local search over single adds and single swaps
      ``i -> j``.  Never exceeds the budget (up to a relative 1e-9 for float
      rounding) but is not guaranteed optimal.  ``max_table_cells=0`` drops both DPs.
    """
    var, w = _layer_arrays(variances, weights)
    _check_bit_range(budget, min_bits, max_bits)
    continuous = continuous_bits(var, w, budget)
    units = _lattice_units(w)
    exact = units is not None and var.size * (_lattice_capacity(units, budget, min_bits) + 1) <= max_table_cells
    if exact:
        bits = _exact_allocation(var, units, budget, min_bits, max_bits)
    else:
        bits = _approximate_allocation(var, w, continuous, budget, min_bits, max_bits, max_table_cells)
    uniform = float(round(budget))
    uniform_distortion = (
        modelled_distortion(var, w, np.full(var.size, uniform)) if abs(budget - uniform) <= 1e-9 else math.nan
    )
    return VaSMPResult(
        bits=bits,
        continuous=continuous,
        budget=float(budget),
        achieved=float(w @ bits / w.sum()),
        distortion=modelled_distortion(var, w, bits),
        uniform_distortion=uniform_distortion,
        exact=exact,
    )
