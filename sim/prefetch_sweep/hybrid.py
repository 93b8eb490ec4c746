"""The sweep's own predictor, ``hybrid``: the user's histogram shipped ahead, the run-ahead router's
difference at request time; and its transfers as events."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from coordinator.prefetch import (
    NodeLinks,
    RequestContext,
    RunAhead,
    ServedRequest,
    ServingConfig,
    select_experts,
    served_events,
    shipping_order,
)


class Hybrid(RunAhead):
    """Ship the user's smoothed histogram ahead; at request time swap in what the run-ahead router adds.

    Before the request, the experts the user's histogram selects under the budget are shipped (as the
    ``user`` predictor does). Once the prompt is in, the run-ahead posterior selects under the same budget;
    the experts it keeps are already installed, the ones it adds are shipped then, and the ones it drops are
    evicted to make room (the budget caps what a node holds at any time), so their bytes are wasted. Under
    the substitute policy the user's top expert of each block is never evicted, so no block is left empty
    while its replacements travel. At a budget that holds every expert nothing is left to swap. The node
    runs it (it needs the prompt's routes).

    Evaluation needs :meth:`wrap` around the node's links, which ships the ahead part ``lead_s`` before the
    request and the difference at it; ``evicted_bytes`` counts what was shipped ahead and then dropped.
    """

    name = "hybrid"

    def __init__(self, *, n_layers: int, n_experts: int, sizes: np.ndarray, budget_bytes: float,
                 config: ServingConfig, alpha: float = 64.0, kappa: float = 16.0, k: int = 16) -> None:
        super().__init__(n_layers=n_layers, n_experts=n_experts, alpha=alpha, kappa=kappa, k=k)
        self.sizes = np.asarray(sizes)
        self.budget_bytes = budget_bytes
        self.config = config
        self.ahead = np.zeros((n_layers, n_experts), dtype=bool)  # (L, E) shipped ahead of the current request
        self.ahead_scores = np.zeros((n_layers, n_experts))  # (L, E) the user histogram that chose them
        self.ahead_arrival = np.full((n_layers, n_experts), np.inf)  # (L, E)
        self.evicted_bytes = 0

    def predict(self, context: RequestContext) -> np.ndarray:
        """Choose the ahead part from the user's histogram, then score as run-ahead does, (L, E)."""
        self.ahead_scores = self.user_distribution(context.user)
        self.ahead = select_experts(self.ahead_scores, self.sizes, self.budget_bytes, scope=self.config.scope,
                                    method=self.config.method,
                                    min_per_block=1 if self.config.policy == "substitute" else 0)
        scores = super().predict(context)
        if self.config.policy == "substitute":
            # keep the user's top expert of each block through the swap, so no block is left empty (and
            # waiting) while its replacements travel: the forced pick goes to the block's highest score
            rows = np.arange(self.n_layers)
            top = np.argmax(np.where(self.ahead, self.ahead_scores, -np.inf), axis=1)  # (L,)
            scores[rows, top] = scores.max(axis=1) * (1 + 1e-9) + 1e-12
        return scores

    def wrap(self, links: NodeLinks, lead_s: float) -> NodeLinks:
        """``links`` whose ``ship`` sends the ahead part ``lead_s`` early and only the difference at ``at``."""
        def ship(order: Sequence[tuple[int, int]], sizes: np.ndarray, at: float) -> np.ndarray:
            ahead_order = shipping_order(self.ahead_scores, self.ahead)
            self.ahead_arrival = links.ship(ahead_order, sizes, at - lead_s)  # (L, E)
            later = [(b, e) for b, e in order if not self.ahead[b, e]]
            arrival = links.ship(later, sizes, at)  # (L, E)
            keep = np.zeros_like(self.ahead)
            if order:
                keep[tuple(np.array(order).T)] = True
            keep &= self.ahead  # (L, E) shipped ahead and kept
            arrival[keep] = self.ahead_arrival[keep]
            self.evicted_bytes += int(sizes[self.ahead & ~keep].sum())
            return arrival

        return dataclasses.replace(links, ship=ship)


def hybrid_events(served: ServedRequest, hybrid: Hybrid, sizes: np.ndarray, lead_s: float) -> list[dict]:
    """The hybrid's transfers: served_events with the ahead part's start moved back by ``lead_s``, plus the
    experts shipped ahead and evicted at request time (``evicted``: true)."""
    events = served_events(served, sizes)
    ahead_at = served.request.start_s - lead_s
    for ev in events:
        if ev["kind"] == "prefetch" and hybrid.ahead[ev["block"], ev["expert"]]:
            ev["start"] = ahead_at
    dropped = hybrid.ahead & ~served.mask
    r = served.request
    events += [{"kind": "prefetch", "node": r.node, "user": r.user, "bytes": int(sizes[b, e]), "start": ahead_at,
                "end": float(hybrid.ahead_arrival[b, e]), "block": int(b), "expert": int(e), "evicted": True}
               for b, e in zip(*np.nonzero(dropped))]
    return events
