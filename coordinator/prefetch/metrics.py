"""Prefetch metrics over a routing trace: recall@k per block, hit rate with arrival times, bytes per token."""

from __future__ import annotations

import numpy as np


class MetricError(ValueError):
    """Metric inputs of inconsistent shapes or out-of-range values."""


def used_mask(routes: np.ndarray, n_experts: int) -> np.ndarray:
    """Which experts a trace uses: routes (L, T) -> (L, E) bool."""
    routes = np.asarray(routes)
    mask = np.zeros((routes.shape[0], n_experts), dtype=bool)
    np.put_along_axis(mask, routes, True, axis=1)
    return mask


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """The k highest-scoring experts of each block, (L, E) bool; ties go to the lower expert id."""
    scores = np.asarray(scores)
    if not 1 <= k <= scores.shape[1]:
        raise MetricError(f"k must be in [1, {scores.shape[1]}], got {k}")
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, np.argsort(-scores, axis=1, kind="stable")[:, :k], True, axis=1)
    return mask


def recall_at_k(scores: np.ndarray, routes: np.ndarray, k: int, *, weighted: bool = False) -> np.ndarray:
    """Per block (L,): the share of the experts the trace used that are among the k top-scored.

    ``weighted=True`` counts tokens instead of distinct experts (the share of tokens whose expert is in the
    top k: SiDA's "top-k accuracy"). A block that used nothing has recall 1.
    """
    scores = np.asarray(scores)
    routes = np.asarray(routes)
    if routes.ndim != 2 or routes.shape[0] != scores.shape[0]:
        raise MetricError(f"routes must be (L={scores.shape[0]}, T), got {routes.shape}")
    top = top_k_mask(scores, k)  # (L, E)
    if weighted:
        if routes.shape[1] == 0:
            return np.ones(routes.shape[0])
        return np.take_along_axis(top, routes, axis=1).mean(axis=1)
    used = used_mask(routes, scores.shape[1])
    n_used = used.sum(axis=1)
    return np.where(n_used > 0, (used & top).sum(axis=1) / np.maximum(n_used, 1), 1.0)


def hit_rate(routes: np.ndarray, mask: np.ndarray, arrival_s: np.ndarray | None = None,
             need_s: np.ndarray | None = None) -> float:
    """Share of (block, token) expert uses whose expert was shipped and had arrived when the token needed it.

    ``routes`` (L, T); ``mask`` (L, E) shipped; ``arrival_s`` (L, E) arrival times (None: installed before);
    ``need_s`` (T,) or (L, T) when each use happens. Arrival times count only when both are given; then a
    prefetch that arrives after its token needs it is a miss.
    """
    routes = np.asarray(routes)
    mask = np.asarray(mask, dtype=bool)
    if routes.ndim != 2 or routes.shape[0] != mask.shape[0]:
        raise MetricError(f"routes must be (L={mask.shape[0]}, T), got {routes.shape}")
    if routes.size == 0:
        return 1.0
    hit = np.take_along_axis(mask, routes, axis=1)  # (L, T)
    if arrival_s is not None and need_s is not None:
        arrived = np.take_along_axis(np.asarray(arrival_s, dtype=np.float64), routes, axis=1)  # (L, T)
        hit &= arrived <= np.broadcast_to(np.asarray(need_s, dtype=np.float64), routes.shape)
    return float(hit.mean())


def byte_metrics(routes: np.ndarray, mask: np.ndarray, sizes: np.ndarray) -> dict[str, float]:
    """Bytes a shipped ``mask`` costs over a trace: shipped, wasted (shipped, never used) and per token."""
    routes = np.asarray(routes)
    mask = np.asarray(mask, dtype=bool)
    sizes = np.asarray(sizes)
    if mask.shape != sizes.shape or routes.shape[0] != mask.shape[0]:
        raise MetricError(f"mask and sizes must be (L, E) and routes (L, T); got {mask.shape}, {sizes.shape}, "
                          f"{routes.shape}")
    shipped = int(sizes[mask].sum())
    wasted = int(sizes[mask & ~used_mask(routes, mask.shape[1])].sum())
    tokens = max(routes.shape[1], 1)
    return {"bytes_shipped": shipped, "bytes_wasted": wasted,
            "bytes_shipped_per_token": shipped / tokens, "bytes_wasted_per_token": wasted / tokens}
