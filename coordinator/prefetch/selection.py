"""Which experts to ship under a byte budget: a 0/1 knapsack of predicted use against compressed size.

Value is a predictor's score (expected share of tokens), weight is the expert's real compressed size in
bytes (experts differ once entropy-coded or pruned). Two solvers: an exact dynamic programme over sizes
rounded *up* to a granularity (exact when the granularity divides every size, feasible always), and the
greedy-by-value-density heuristic with the best-single-item fix (at least half the optimum).
"""

from __future__ import annotations

import math

import numpy as np


class SelectionError(ValueError):
    """Scores, sizes or budget are malformed, or the budget cannot hold what is required."""


MAX_DP_CELLS = 1 << 15  # capacity units of the DP table; beyond it sizes are rounded to a coarser granularity


def knapsack_dp(values: np.ndarray, weights: np.ndarray, capacity: int) -> np.ndarray:
    """Exact 0/1 knapsack over integer weights: the bool mask (n,) maximising value with weight <= capacity.

    Loops over items and vectorises over capacities: O(n * capacity) time and bits.
    """
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.int64)
    n = values.size
    best = np.zeros(capacity + 1)  # (capacity+1,) best value within each capacity
    take = np.zeros((n, capacity + 1), dtype=bool)  # (n, capacity+1) item i taken at that capacity
    for i in range(n):
        w, v = int(weights[i]), values[i]
        if w > capacity or v <= 0:
            continue
        with_i = best[: capacity + 1 - w] + v  # (capacity+1-w,) value if item i fills the last w units
        better = with_i > best[w:]
        take[i, w:] = better
        best[w:] = np.where(better, with_i, best[w:])
    chosen = np.zeros(n, dtype=bool)
    c = capacity
    for i in range(n - 1, -1, -1):
        if take[i, c]:
            chosen[i] = True
            c -= int(weights[i])
    return chosen


def knapsack_greedy(values: np.ndarray, weights: np.ndarray, capacity: float) -> np.ndarray:
    """Greedy 0/1 knapsack: items by value per byte, skipping those that no longer fit; then, if one item
    alone is worth more than the whole greedy pick, that item (which guarantees half the optimum)."""
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    density = np.where(weights > 0, values / np.where(weights > 0, weights, 1.0), np.inf)  # (n,)
    chosen = np.zeros(values.size, dtype=bool)
    left = float(capacity)
    for i in np.argsort(-density, kind="stable"):
        if values[i] > 0 and weights[i] <= left:
            chosen[i] = True
            left -= weights[i]
    fits = (weights <= capacity) & (values > 0)
    if fits.any():
        single = int(np.argmax(np.where(fits, values, -np.inf)))
        if values[single] > values[chosen].sum():
            chosen[:] = False
            chosen[single] = True
    return chosen


def _solve(values: np.ndarray, sizes: np.ndarray, budget: float, method: str, granularity: int | None) -> np.ndarray:
    if method == "greedy":
        return knapsack_greedy(values, sizes, budget)
    positive = sizes[sizes > 0].astype(np.int64)
    g = granularity or (math.gcd(*positive.tolist()) if positive.size else 1)
    if budget / g > MAX_DP_CELLS:
        g = max(g, math.ceil(budget / MAX_DP_CELLS))
    units = -(-sizes.astype(np.int64) // g)  # ceil: a rounded selection never exceeds the real budget
    return knapsack_dp(values, units, int(budget // g))


def select_experts(scores: np.ndarray, sizes: np.ndarray, budget_bytes: float, *, scope: str = "global",
                   method: str = "dp", granularity: int | None = None, min_per_block: int = 0) -> np.ndarray:
    """The experts to ship: mask (L, E) bool maximising summed score with summed size <= ``budget_bytes``.

    ``scores`` (L, E) predicted use (experts scoring <= 0 are never shipped); ``sizes`` (L, E) compressed
    bytes. ``scope="global"`` spends one budget over all blocks; ``"block"`` gives each block budget / L.
    ``method``: ``"dp"`` exact over sizes in units of ``granularity`` bytes (default: their gcd, coarsened
    so the table stays within MAX_DP_CELLS units; sizes round up, so the mask always fits), or ``"greedy"``.
    ``min_per_block`` experts of each block are taken first by score whatever their value (the substitute
    policy needs at least one installed expert per block).
    """
    scores = np.asarray(scores, dtype=np.float64)
    sizes = np.asarray(sizes)
    if scores.ndim != 2 or scores.shape != sizes.shape:
        raise SelectionError(f"scores and sizes must both be (L, E), got {scores.shape} and {sizes.shape}")
    if not np.all(np.isfinite(scores)):
        raise SelectionError("scores must be finite")
    if not np.issubdtype(sizes.dtype, np.integer) or (sizes < 0).any():
        raise SelectionError("sizes must be integer byte counts >= 0")
    if not budget_bytes >= 0:
        raise SelectionError(f"budget_bytes must be >= 0, got {budget_bytes!r}")
    if scope not in ("global", "block"):
        raise SelectionError(f"scope must be 'global' or 'block', got {scope!r}")
    if method not in ("dp", "greedy"):
        raise SelectionError(f"method must be 'dp' or 'greedy', got {method!r}")
    if granularity is not None and granularity < 1:
        raise SelectionError(f"granularity must be >= 1 byte, got {granularity!r}")
    L, E = scores.shape
    if not 0 <= min_per_block <= E:
        raise SelectionError(f"min_per_block must be in [0, {E}], got {min_per_block!r}")

    mask = np.zeros((L, E), dtype=bool)
    if min_per_block:
        top = np.argsort(-scores, axis=1, kind="stable")[:, :min_per_block]  # (L, min_per_block)
        np.put_along_axis(mask, top, True, axis=1)
    forced = sizes * mask  # (L, E)
    groups = [np.arange(L)] if scope == "global" else [np.array([b]) for b in range(L)]
    for rows in groups:
        budget = budget_bytes if scope == "global" else budget_bytes / L
        left = budget - forced[rows].sum()
        if left < 0:
            raise SelectionError(f"budget of {budget:.0f} bytes cannot hold the {min_per_block} required "
                                 f"expert(s) per block ({forced[rows].sum()} bytes)")
        free = ~mask[rows]  # (len(rows), E)
        picked = _solve(scores[rows][free], sizes[rows][free], left, method, granularity)
        sub = mask[rows]
        sub[free] = picked
        mask[rows] = sub
    return mask
