"""Replay requests through a predictor, a byte budget and a miss policy: one row of report.json's ``prefetch``.

For each request in order: the predictor scores experts from what it may see, the knapsack picks what
fits the budget, the experts are shipped (ahead of the request, or once its prompt is in for predictors
that need it), the request is served under the miss policy, and only then does the predictor learn from
its routing. Each request is planned as if the node were cold, so bytes are per request; caching across
requests is what the LRU and LFU predictors stand for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from model.fractal_moe import FractalMoE

from .metrics import byte_metrics, recall_at_k
from .policies import POLICIES, RequestOutcome, TransferTime, link_time, remote_time, simulate_request, stream_arrivals
from .predictors import Predictor, RequestContext, RoutingTrace, visible_context, visible_trace
from .quality import segmented_substitution_ppl
from .selection import select_experts

# (order of (block, expert), sizes (L, E), at_s) -> arrival times (L, E), inf where not shipped
ShipFn = Callable[[Sequence[tuple[int, int]], np.ndarray, float], np.ndarray]


class EvaluationError(ValueError):
    """Bad serving options or requests that do not fit the sizes."""


@dataclass(frozen=True, kw_only=True)
class Request:
    """One request served at a node, with the routing the full model gives it."""

    user: str
    token_ids: np.ndarray  # (T,)
    routes: np.ndarray  # (L, T) the full model's experts, e.g. quality.route_trace(model, token_ids)[0]
    prompt_len: int  # the first tokens, known when the request arrives (the prefill step)
    start_s: float = 0.0  # virtual arrival time
    node: str = ""
    prompt_routes: np.ndarray | None = None  # (L, P) the router run ahead on the node; default routes[:, :P]
    prompt_hidden: np.ndarray | None = None  # (L, P, C) MoE inputs on the prompt (next-block predictor)

    def __post_init__(self) -> None:
        T = np.shape(self.token_ids)[0]
        if np.ndim(self.routes) != 2 or np.shape(self.routes)[1] != T:
            raise EvaluationError(f"request of {self.user!r}: routes must be (L, T={T}), got {np.shape(self.routes)}")
        if not 1 <= self.prompt_len <= T:
            raise EvaluationError(f"request of {self.user!r}: prompt_len must be in [1, {T}], got {self.prompt_len}")

    def context(self) -> RequestContext:
        """Everything known at planning time; ``visible_context`` strips what a predictor may not see."""
        P = self.prompt_len
        return RequestContext(
            user=self.user, prompt_ids=np.asarray(self.token_ids)[:P],
            prompt_routes=np.asarray(self.routes)[:, :P] if self.prompt_routes is None else self.prompt_routes,
            prompt_hidden=self.prompt_hidden, routes=self.routes)

    def trace(self) -> RoutingTrace:
        """What the request routed to, for predictors to learn from once it is served."""
        return RoutingTrace(user=self.user, routes=np.asarray(self.routes), token_ids=np.asarray(self.token_ids))


@dataclass(frozen=True, kw_only=True)
class NodeLinks:
    """How long things take for one node: shipping planned experts, fetching on demand, remote calls."""

    ship: ShipFn
    fetch: TransferTime
    remote: TransferTime


class _Link(Protocol):
    """What the idle links read of a link profile (read-only: a frozen profile qualifies)."""

    @property
    def down_bps(self) -> float: ...
    @property
    def up_bps(self) -> float: ...
    @property
    def rtt_s(self) -> float: ...


def idle_links(node: _Link, peer: _Link) -> NodeLinks:
    """NodeLinks for a node alone on its link (no contention), from two link profiles (e.g.
    ``sim.network.LinkProfile``): the node's, and that of the peer that answers remote expert calls."""
    return NodeLinks(
        ship=lambda order, sizes, at: stream_arrivals(order, sizes, at, rtt_s=node.rtt_s, bps=node.down_bps),
        fetch=link_time(rtt_s=node.rtt_s, bps=node.down_bps),
        remote=remote_time(rtt_s=node.rtt_s + peer.rtt_s, up_bps=min(node.up_bps, peer.down_bps),
                           down_bps=min(peer.up_bps, node.down_bps)))


@dataclass(frozen=True, kw_only=True)
class ServingConfig:
    """How requests are planned and served in an evaluation."""

    policy: str = "wait"  # miss policy: wait, substitute, remote or auto
    scope: str = "global"  # budget over all blocks, or split evenly per block
    method: str = "dp"  # knapsack solver: dp (exact) or greedy
    lead_s: float = math.inf  # how early "ahead" predictors ship before a request (inf: installed already)
    step_s: float = 0.0  # compute per step (prefill, then each token), virtual seconds
    activation_bytes: int = 0  # one token's hidden state on the wire, e.g. d_model * 4 (float32)
    recall_k: tuple[int, ...] = (1, 2, 4, 8)
    ppl_passes: int = 8  # forward passes per request at most when experts arrive mid-request (substitute)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise EvaluationError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.scope not in ("global", "block") or self.method not in ("dp", "greedy"):
            raise EvaluationError(f"scope must be global/block and method dp/greedy, got {self.scope!r}, "
                                  f"{self.method!r}")
        if not self.lead_s >= 0 or not (self.step_s >= 0 and math.isfinite(self.step_s)):
            raise EvaluationError(f"lead_s and step_s must be >= 0, got {self.lead_s!r}, {self.step_s!r}")
        if self.policy in ("remote", "auto") and self.activation_bytes <= 0:
            raise EvaluationError(f"policy {self.policy!r} needs activation_bytes > 0 (d_model * 4)")
        if not self.recall_k or min(self.recall_k) < 1:
            raise EvaluationError(f"recall_k must be ks >= 1, got {self.recall_k!r}")
        if self.ppl_passes < 1:
            raise EvaluationError(f"ppl_passes must be >= 1, got {self.ppl_passes!r}")


@dataclass
class _Totals:
    uses: int = 0
    hits: int = 0
    tokens: int = 0
    prefetched: int = 0
    wasted: int = 0
    fetched: int = 0
    remote: int = 0
    stall: float = 0.0
    nll_full: float = 0.0
    nll_sub: float = 0.0
    predicted: int = 0
    recall: dict[int, list[np.ndarray]] = field(default_factory=dict)
    ttft: dict[str, list[float]] = field(default_factory=dict)
    chosen: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ServedRequest:
    """Everything about one request served in an evaluation, for logs and events."""

    request: Request
    scores: np.ndarray  # (L, E) the predictor's scores
    mask: np.ndarray  # (L, E) the experts shipped for it
    order: list[tuple[int, int]]  # shipping order
    ship_at: float | None  # when shipping was requested; None when installed before the request
    arrival: np.ndarray  # (L, E) arrival times (-inf installed before, inf not shipped)
    outcome: RequestOutcome


def served_events(served: ServedRequest, sizes: np.ndarray) -> list[dict[str, Any]]:
    """The request's transfers as events.jsonl lines (kind, node, bytes, start, end, ...), virtual seconds.

    Prefetches (one per shipped expert, unless installed before the request), on-demand fetches and
    remote expert calls; times come from the NodeLinks the evaluation used.
    """
    r, sizes = served.request, np.asarray(sizes)
    common = {"node": r.node, "user": r.user}
    events: list[dict[str, Any]] = []
    if served.ship_at is not None:
        events += [{"kind": "prefetch", **common, "bytes": int(sizes[b, e]), "start": served.ship_at,
                    "end": float(served.arrival[b, e]), "block": b, "expert": e} for b, e in served.order]
    events += [{"kind": "fetch", **common, "bytes": n, "start": t0, "end": t1, "block": b, "expert": e}
               for b, e, n, t0, t1 in served.outcome.fetches]
    events += [{"kind": "remote", **common, "bytes": 2 * n, "start": t0, "end": t1, "block": b}
               for b, n, t0, t1 in served.outcome.remote_calls]
    return sorted(events, key=lambda ev: (ev["end"], ev["start"]))


def plan(predictor: Predictor, request: Request, sizes: np.ndarray, budget_bytes: float,
         config: ServingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Scores (L, E) for ``request`` from what ``predictor`` may see, and the mask (L, E) that fits the budget."""
    scores = np.asarray(predictor.predict(visible_context(predictor, request.context())), dtype=np.float64)
    mask = select_experts(scores, sizes, budget_bytes, scope=config.scope, method=config.method,
                          min_per_block=1 if config.policy == "substitute" else 0)
    return scores, mask


def shipping_order(scores: np.ndarray, mask: np.ndarray) -> list[tuple[int, int]]:
    """The selected experts, highest score first (ties: lower block, then lower expert id)."""
    b, e = np.nonzero(mask)
    keep = np.lexsort((e, b, -scores[b, e]))
    return [(int(b[i]), int(e[i])) for i in keep]


def evaluate_prefetch(predictor: Predictor, requests: Sequence[Request], *, sizes: np.ndarray,
                      budget_bytes: float, links: NodeLinks | Mapping[str, NodeLinks],
                      config: ServingConfig = ServingConfig(), model: FractalMoE | None = None,
                      history: Sequence[Request] = (),
                      on_request: Callable[[ServedRequest], None] | None = None,
                      ) -> dict[str, Any]:
    """Replay ``requests`` (in order) through ``predictor`` under a byte budget; returns a report row.

    ``sizes`` (L, E) compressed bytes per expert; ``links`` one NodeLinks for all, or one per request.node;
    ``history`` requests are only observed (the predictor's past); ``model`` measures perplexity under the
    substitute policy (exact policies report ppl_ratio 1.0). ``on_request(served)`` sees every request
    served, e.g. to log its transfers with ``served_events``.

    The row: predictor, budget, policy, hit_rate, bytes_shipped, ppl_ratio, recall_at_k ({k: per block}),
    recall_at_k_tokens, bytes_shipped_per_token, bytes_wasted_per_token, stall_seconds, ttft (mean) and
    ttft_by_user, plus the totals they come from.
    """
    sizes = np.asarray(sizes)
    for r in history:
        predictor.observe(visible_trace(predictor, r.trace()))
    tot = _Totals(recall={k: [] for k in config.recall_k}, ttft={})
    weighted: dict[int, list[np.ndarray]] = {k: [] for k in config.recall_k}
    for r in requests:
        node_links = links if isinstance(links, NodeLinks) else links[r.node]
        routes = np.asarray(r.routes)
        if routes.shape[0] != sizes.shape[0] or routes.max(initial=0) >= sizes.shape[1]:
            raise EvaluationError(f"request of {r.user!r}: routes do not fit sizes of shape {sizes.shape}")
        scores, mask = plan(predictor, r, sizes, budget_bytes, config)
        order = shipping_order(scores, mask)
        at: float | None = None
        if predictor.plans_at == "ahead" and math.isinf(config.lead_s):
            arrival = np.where(mask, -np.inf, np.inf)  # (L, E) installed before the request arrives
        else:
            at = r.start_s - config.lead_s if predictor.plans_at == "ahead" else r.start_s
            arrival = node_links.ship(order, sizes, at)
        outcome = simulate_request(routes, mask, arrival, policy=config.policy, sizes=sizes, start_s=r.start_s,
                                   prompt_len=r.prompt_len, step_s=config.step_s, fetch=node_links.fetch,
                                   remote=node_links.remote, activation_bytes=config.activation_bytes)
        if on_request is not None:
            on_request(ServedRequest(request=r, scores=scores, mask=mask, order=order, ship_at=at,
                                     arrival=arrival, outcome=outcome))
        spent = byte_metrics(routes, mask, sizes)
        tot.uses += outcome.uses
        tot.hits += outcome.hits
        tot.tokens += routes.shape[1]
        tot.prefetched += int(spent["bytes_shipped"])  # whole bytes; the dict also holds per-token means
        tot.wasted += int(spent["bytes_wasted"])
        tot.fetched += outcome.fetched_bytes
        tot.remote += outcome.remote_bytes
        tot.stall += outcome.stall_s
        tot.ttft.setdefault(r.user, []).append(outcome.ttft_s)
        tot.chosen[outcome.policy] = tot.chosen.get(outcome.policy, 0) + 1
        for k in config.recall_k:
            kk = min(k, sizes.shape[1])
            tot.recall[k].append(recall_at_k(scores, routes, kk))
            weighted[k].append(recall_at_k(scores, routes, kk, weighted=True))
        if model is not None and config.policy == "substitute" and routes.shape[1] >= 2:
            cmp = segmented_substitution_ppl(model, np.asarray(r.token_ids), outcome.segments,
                                             max_passes=config.ppl_passes)
            tot.nll_full += cmp.nll_full
            tot.nll_sub += cmp.nll_substituted
            tot.predicted += cmp.tokens
        predictor.observe(visible_trace(predictor, r.trace()))
    return _row(predictor, budget_bytes, config, tot, weighted, measured_ppl=model is not None)


def _row(predictor: Predictor, budget_bytes: float, config: ServingConfig, tot: _Totals,
         weighted: dict[int, list[np.ndarray]], *, measured_ppl: bool) -> dict[str, Any]:
    tokens = max(tot.tokens, 1)
    shipped = tot.prefetched + tot.fetched
    if config.policy != "substitute":
        ppl_ratio: float | None = 1.0  # wait and remote serve the full model's output exactly
    elif measured_ppl and tot.predicted:
        ppl_ratio = math.exp((tot.nll_sub - tot.nll_full) / tot.predicted)
    else:
        ppl_ratio = None
    ttfts = [t for ts in tot.ttft.values() for t in ts]
    return {
        "predictor": predictor.name,
        "budget": budget_bytes,
        "budget_bytes": budget_bytes,
        "policy": config.policy,
        "hit_rate": tot.hits / tot.uses if tot.uses else 1.0,
        "bytes_shipped": shipped,
        "ppl_ratio": ppl_ratio,
        "recall_at_k": {str(k): np.mean(v, axis=0).tolist() if v else [] for k, v in tot.recall.items()},
        "recall_at_k_tokens": {str(k): np.mean(v, axis=0).tolist() if v else [] for k, v in weighted.items()},
        "bytes_prefetched": tot.prefetched,
        "bytes_fetched_on_demand": tot.fetched,
        "bytes_wasted": tot.wasted,
        "bytes_shipped_per_token": shipped / tokens,
        "bytes_wasted_per_token": tot.wasted / tokens,
        "remote_bytes": tot.remote,
        "remote_bytes_per_token": tot.remote / tokens,
        "stall_seconds": tot.stall,
        "ttft": float(np.mean(ttfts)) if ttfts else 0.0,
        "ttft_by_user": {u: float(np.mean(ts)) for u, ts in sorted(tot.ttft.items())},
        "policy_chosen": dict(sorted(tot.chosen.items())),
        "requests": sum(len(ts) for ts in tot.ttft.values()),
        "tokens": tot.tokens,
        "ppl_full": math.exp(tot.nll_full / tot.predicted) if tot.predicted else None,
    }
