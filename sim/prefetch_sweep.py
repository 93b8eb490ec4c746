"""The prefetch sweep: every predictor against every expert budget, on the federation's own model and users.

A scenario switches it on with a non-empty ``[prefetch] budgets`` (see scenarios/prefetch_sweep.toml);
`sim.run` then calls :func:`run_sweep` after the workload, on the live federation. For each predictor and
budget (experts per block, out of the model's 16) it replays the users' held-out requests through
``coordinator.prefetch.evaluate_prefetch``:

* the model is the federation's base (``fed.suite.base()``), which gives each request's true routing
  (the oracle's), the prompt's hidden states (next-block) and the substitution perplexity;
* expert sizes are the payload bytes of the codec the bundles actually ship (``model.expert_codec``);
* requests are windows of each known user's held-out text, dealt round-robin over users and served at
  the node that holds the user; the predictors' history is windows of the same users' training text;
* each node's link is the scenario's (``sim.network.assign_links``), idle (no contention between
  requests), with a fibre peer answering remote expert calls;
* the LRU and LFU caches are one per node (:class:`PerNode`), every other predictor one per row;
* perplexity under substitution is measured batched over a row's requests (:class:`QualityMeter`).

The report gains ``report["prefetch"]`` (rows: predictor, budget, hit_rate, bytes_shipped, ppl_ratio,
recall@k per block, bytes per token, stall, TTFT, ...; and ``goal``: the issue's target at half the
experts), the served transfers are appended to the run's events.jsonl, and :func:`write_plots` draws the
bandwidth/quality frontier.

Besides the predictors of ``coordinator.prefetch`` the sweep has ``hybrid`` (:class:`Hybrid`): the
user's histogram shipped ahead of the request, the run-ahead router's difference at request time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.prefetch import (NodeLinks, Predictor, Request, RequestContext, RunAhead, ServedRequest,
                                  ServingConfig, build_predictor, coarsen_segments, evaluate_prefetch, idle_links,
                                  route_trace, router_weights, select_experts, served_events, shipping_order)
from model.codecs import encode_state_dict
from model.fractal_moe import FractalMoE, expert_of

from .network import assign_links, get_link
from .scenario import Scenario

GOAL_HIT_RATE = 0.95  # issue 5's goal at half the experts materialised
GOAL_PPL_RATIO = 1.02  # perplexity within 2% of the full model
REMOTE_PEER = "fibre"  # the link of the node that answers remote expert calls
SOURCE = "prefetch-sweep"  # the ``source`` of this sweep's lines in events.jsonl


class SweepError(ValueError):
    """The sweep cannot run as the scenario asks (e.g. requests longer than the model's context)."""


# ---------------------------------------------------------------------------------------------- inputs

def expert_sizes(state: dict[str, torch.Tensor], *, expert_codec: str) -> np.ndarray:
    """Each expert's compressed size, (L, E) int64: the payload bytes of its tensors under ``expert_codec``.

    Encodes the expert tensors with the same codec the bundles ship (``model.codecs``), so entropy-coded
    or pruned experts get their real, unequal sizes.
    """
    experts = {k: v for k, v in state.items() if expert_of(k) is not None}
    if not experts:
        raise SweepError("the model's state holds no expert tensors")
    where = [expert_of(k) for k in experts]
    L = 1 + max(b for b, _ in where)
    E = 1 + max(e for _, e in where)
    sizes = np.zeros((L, E), dtype=np.int64)  # (L, E)
    for enc in encode_state_dict(experts, expert_codec=expert_codec):
        b, e = expert_of(enc.name)
        sizes[b, e] += len(enc.payload)
    return sizes


def windows(ids: torch.Tensor, length: int, count: int) -> list[np.ndarray]:
    """Up to ``count`` consecutive, non-overlapping windows of ``length`` tokens from the start of ``ids``."""
    n = min(count, len(ids) // length)
    return [ids[i * length:(i + 1) * length].numpy() for i in range(n)]


def interleave(per_user: dict[str, list[np.ndarray]], total: int) -> list[tuple[str, np.ndarray]]:
    """(user, window) pairs dealt round-robin over users (each user's windows in order), the first ``total``."""
    rounds = itertools.zip_longest(*([(u, w) for w in ws] for u, ws in per_user.items()))
    return [pair for rnd in rounds for pair in rnd if pair is not None][:total]


def build_requests(model: FractalMoE, pairs: Sequence[tuple[str, np.ndarray]], user_node: dict[str, str], *,
                   prompt_len: int, gap_s: float, hidden: bool) -> list[Request]:
    """Requests for ``pairs`` (user, tokens (T,)), the i-th arriving at ``(i + 1) * gap_s``, with the full
    model's routes (L, T) and, with ``hidden``, the prompt's MoE inputs (L, P, C) for next-block."""
    out = []
    for i, (user, ids) in enumerate(pairs):
        routes, states = route_trace(model, ids, hidden=hidden)  # (L, T), (L, T, C) | None
        out.append(Request(user=user, token_ids=ids, routes=routes, prompt_len=prompt_len,
                           prompt_hidden=None if states is None else states[:, :prompt_len],
                           start_s=(i + 1) * gap_s, node=user_node[user]))
    return out


def node_links(scn: Scenario, node_ids: Sequence[str]) -> dict[str, NodeLinks]:
    """Each node's idle links from the scenario's link profiles; remote calls go to a fibre peer."""
    profiles = assign_links(len(node_ids), default=scn.network.default_link, ranges=scn.network.links,
                            profiles=scn.network.profiles)
    peer = get_link(REMOTE_PEER)
    return {nid: idle_links(p, peer) for nid, p in zip(node_ids, profiles)}


# ---------------------------------------------------------------------------------------------- quality

TOKENS_PER_PASS = 1 << 22  # logits cells (rows * T * V) per batched forward pass: bounds its memory


def masked_nll(model: FractalMoE, tokens: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Next-token NLL (B, T-1) of ``tokens`` (B, T), row i served with only the experts ``masks[i]`` (L, E)
    installed (a missed expert is substituted by the installed one the router scores highest).

    One forward pass serves many masks at once: the installed experts are given per token (``model.serving``),
    which the router's masked argmax broadcasts over; this is what lets the sweep score every request and
    arrival segment of a row in a few passes rather than one pass per segment. The model is restored after.
    """
    t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)  # (B, T)
    m = torch.as_tensor(np.asarray(masks), dtype=torch.bool)  # (B, L, E)
    B, T = t.shape
    if m.shape != (B, model.cfg.n_layers, model.cfg.n_experts) or not m.any(dim=2).all():
        raise SweepError(f"masks must be (B={B}, L, E) with an installed expert in every block, got {tuple(m.shape)}")
    out = torch.empty(B, T - 1, dtype=torch.float64)  # (B, T-1)
    step = max(1, TOKENS_PER_PASS // (T * model.cfg.vocab_size))
    with torch.no_grad():
        for lo in range(0, B, step):
            chunk = t[lo:lo + step]  # (b, T)
            per_token = m[lo:lo + step].repeat_interleave(T - 1, dim=0).transpose(0, 1)  # (L, b*(T-1), E)
            with model.serving(available=per_token):
                logp = model(chunk[:, :-1]).logits.double().log_softmax(dim=-1)  # (b, T-1, V)
            out[lo:lo + step] = -logp.gather(-1, chunk[:, 1:, None])[..., 0]
    return out.numpy()


def covers(mask: np.ndarray, routes: np.ndarray) -> bool:
    """Whether ``mask`` (L, E) holds every expert ``routes`` (L, t) use: then, over those positions, the model
    served with ``mask`` computes exactly what the full model does (each block sees the same input, so its
    router picks the same, installed, expert), and no forward pass is needed."""
    return bool(np.take_along_axis(np.asarray(mask, dtype=bool), np.asarray(routes), axis=1).all())


class QualityMeter:
    """Substitution perplexity of the sweep's requests, batched across requests and arrival segments.

    The full model's NLL of each request is computed once for the whole sweep. A segment (positions
    first..end-1 served with one installed set; at most ``max_passes`` per request, merged pessimistically
    as ``coordinator.prefetch.coarsen_segments`` does) is scored by a pass over the whole request with its
    mask (causal: later positions do not change earlier ones), skipped when the mask covers the full
    model's routes up to ``end``. Same figures as ``coordinator.prefetch.segmented_substitution_ppl``.
    """

    def __init__(self, model: FractalMoE, requests: Sequence[Request], *, max_passes: int) -> None:
        self.model = model
        self.requests = list(requests)
        self.max_passes = max_passes
        L, E = model.cfg.n_layers, model.cfg.n_experts
        tokens = np.stack([np.asarray(r.token_ids) for r in self.requests])  # (R, T)
        self.full = masked_nll(model, tokens, np.ones((len(self.requests), L, E), dtype=bool))  # (R, T-1)

    def nll(self, segments: dict[int, Sequence[tuple[int, int, np.ndarray]]]) -> tuple[float, float, int]:
        """(full NLL, substituted NLL, predicted tokens) summed over requests {index: outcome segments}."""
        jobs: list[tuple[int, int, int, np.ndarray]] = []  # (request, first, end, mask) needing a pass
        sub = {i: self.full[i].copy() for i in segments}
        for i, segs in segments.items():
            routes = np.asarray(self.requests[i].routes)
            n = self.full.shape[1]
            for first, end, mask in coarsen_segments(segs, self.max_passes):
                end = min(end, n)
                if first < end and not covers(mask, routes[:, :end]):
                    jobs.append((i, first, end, mask))
        if jobs:
            tokens = np.stack([np.asarray(self.requests[i].token_ids) for i, *_ in jobs])
            nll = masked_nll(self.model, tokens, np.stack([m for *_, m in jobs]))  # (J, T-1)
            for (i, first, end, _), row in zip(jobs, nll):
                sub[i][first:end] = row[first:end]
        full = float(sum(self.full[i].sum() for i in segments))
        return full, float(sum(v.sum() for v in sub.values())), int(sum(v.size for v in sub.values()))


# ---------------------------------------------------------------------------------------------- hybrid

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


def _hybrid_events(served: ServedRequest, hybrid: Hybrid, sizes: np.ndarray, lead_s: float) -> list[dict]:
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


# ---------------------------------------------------------------------------------------------- sweep

NODE_CACHES = ("lru", "lfu")  # cache baselines: each node's cache sees only its own users' requests


class PerNode:
    """One predictor per node, chosen by the request's user: a node's LRU or LFU cache learns from the
    requests that node served, not from the whole federation's (which would make LFU the global predictor)."""

    def __init__(self, make: Callable[[], Predictor], user_node: dict[str, str]) -> None:
        self.make = make
        self.user_node = dict(user_node)
        self.inner: dict[str, Predictor] = {}
        first = make()
        self.name, self.runs_on, self.plans_at = first.name, first.runs_on, first.plans_at

    def _of(self, user: str) -> Predictor:
        try:
            node = self.user_node[user]
        except KeyError:
            raise SweepError(f"user {user!r} is held by no node") from None
        if node not in self.inner:
            self.inner[node] = self.make()
        return self.inner[node]

    def observe(self, trace) -> None:
        """Learn from ``trace`` on the node that holds its user."""
        self._of(trace.user).observe(trace)

    def predict(self, context: RequestContext) -> np.ndarray:
        """The scores of the node that holds the request's user, (L, E)."""
        return self._of(context.user).predict(context)


@dataclass(frozen=True, kw_only=True)
class SweepSetup:
    """What every row of a sweep shares."""

    model: FractalMoE
    requests: list[Request]
    history: list[Request]
    sizes: np.ndarray  # (L, E) compressed bytes per expert
    links: dict[str, NodeLinks]  # by node id
    config: ServingConfig
    warmup_tokens: int  # run-ahead's k
    lead_s: float
    seed: int
    quality: QualityMeter | None = None  # substitution perplexity (None: not measured)


def make_predictor(name: str, setup: SweepSetup, budget_bytes: float) -> Predictor:
    """A fresh predictor ``name`` for one row of the sweep (they learn online, so never reused)."""
    L, E = setup.sizes.shape
    if name == "hybrid":
        return Hybrid(n_layers=L, n_experts=E, sizes=setup.sizes, budget_bytes=budget_bytes, config=setup.config,
                      k=setup.warmup_tokens)
    if name in NODE_CACHES:
        user_node = {r.user: r.node for r in (*setup.history, *setup.requests)}
        return PerNode(lambda: build_predictor(name, n_layers=L, n_experts=E), user_node)
    options = {"k": setup.warmup_tokens} if name == "run-ahead" else {}
    return build_predictor(name, n_layers=L, n_experts=E, vocab_size=setup.model.cfg.vocab_size,
                           router_weights=router_weights(setup.model), seed=setup.seed, **options)


def sweep_row(name: str, budget: int, setup: SweepSetup,
              on_events: Callable[[list[dict]], None] | None = None) -> dict[str, Any]:
    """One report row: ``name`` at ``budget`` experts per block, replayed over ``setup.requests``."""
    L, E = setup.sizes.shape
    budget_bytes = int(setup.sizes.sum() * budget // E)
    predictor = make_predictor(name, setup, budget_bytes)
    links: dict[str, NodeLinks] = setup.links
    if isinstance(predictor, Hybrid):
        links = {nid: predictor.wrap(nl, setup.lead_s) for nid, nl in links.items()}

    index = {id(r): i for i, r in enumerate(setup.requests)}
    segments: dict[int, Sequence[tuple[int, int, np.ndarray]]] = {}

    def log(served: ServedRequest) -> None:
        segments[index[id(served.request)]] = served.outcome.segments
        if on_events is None:
            return
        evs = (_hybrid_events(served, predictor, setup.sizes, setup.lead_s) if isinstance(predictor, Hybrid)
               else served_events(served, setup.sizes))
        on_events([{**ev, "source": SOURCE, "predictor": name, "budget": budget} for ev in evs])

    # perplexity is measured here, batched over the row's requests, rather than one request at a time
    row = evaluate_prefetch(predictor, setup.requests, sizes=setup.sizes, budget_bytes=budget_bytes, links=links,
                            config=setup.config, history=setup.history, on_request=log)
    if setup.config.policy == "substitute" and setup.quality is not None:
        full, sub, n = setup.quality.nll(segments)
        row["ppl_ratio"] = math.exp((sub - full) / n) if n else 1.0
        row["ppl_full"] = math.exp(full / n) if n else None
        row["ppl_substituted"] = math.exp(sub / n) if n else None
    if isinstance(predictor, Hybrid):  # shipped ahead, evicted at the request: shipped and wasted
        extra = predictor.evicted_bytes
        for key in ("bytes_shipped", "bytes_prefetched", "bytes_wasted"):
            row[key] += extra
        tokens = max(row["tokens"], 1)
        row["bytes_shipped_per_token"] = row["bytes_shipped"] / tokens
        row["bytes_wasted_per_token"] = row["bytes_wasted"] / tokens
        row["bytes_evicted"] = extra
    row["predictor"] = name
    row["budget"] = budget
    row["budget_share"] = budget / E
    row["plans_at"] = predictor.plans_at
    return row


def run_rows(setup: SweepSetup, predictors: Sequence[str], budgets: Sequence[int],
             on_events: Callable[[list[dict]], None] | None = None) -> list[dict[str, Any]]:
    """Every (predictor, budget) row, predictors in the given order, budgets ascending."""
    return [sweep_row(name, k, setup, on_events) for name in predictors for k in sorted(budgets)]


def goal(rows: Sequence[dict[str, Any]], n_experts: int) -> dict[str, Any]:
    """The issue's goal, computed: at half the experts, hit rate >= 0.95 and ppl within 2% for the best
    predictor (by hit rate, then ppl ratio; the oracle is the ceiling, not a contender).

    Also gives the oracle's figures at that budget (what no predictor can beat) and, per predictor, the
    smallest budget at which the goal's two conditions hold.
    """
    half = n_experts // 2
    ok = lambda r: (r["hit_rate"] >= GOAL_HIT_RATE and r["ppl_ratio"] is not None  # noqa: E731
                    and r["ppl_ratio"] <= GOAL_PPL_RATIO)
    out: dict[str, Any] = {"budget": half, "of_experts": n_experts, "hit_rate_target": GOAL_HIT_RATE,
                           "ppl_ratio_target": GOAL_PPL_RATIO}
    first_ok = {}
    for name in dict.fromkeys(r["predictor"] for r in rows):
        hits = [r["budget"] for r in rows if r["predictor"] == name and ok(r)]
        first_ok[name] = min(hits) if hits else None
    out["smallest_budget_meeting_goal"] = first_ok
    at_half = [r for r in rows if r["budget"] == half]
    oracle = [r for r in at_half if r["predictor"] == "oracle"]
    if oracle:
        out["oracle"] = {"hit_rate": oracle[0]["hit_rate"], "ppl_ratio": oracle[0]["ppl_ratio"],
                         "meets_goal": ok(oracle[0])}  # if not, no predictor can meet it
    contenders = [r for r in at_half if r["predictor"] != "oracle"]
    if not contenders:
        out.update(met=False, evaluated=False,
                   reason=f"no predictor other than the oracle was swept at budget {half}")
        return out
    best = max(contenders, key=lambda r: (r["hit_rate"], -(r["ppl_ratio"] or math.inf)))
    out.update(evaluated=True, predictor=best["predictor"], hit_rate=best["hit_rate"], ppl_ratio=best["ppl_ratio"],
               hit_rate_ok=best["hit_rate"] >= GOAL_HIT_RATE,
               ppl_ok=best["ppl_ratio"] is not None and best["ppl_ratio"] <= GOAL_PPL_RATIO, met=ok(best))
    return out


def setup_for(fed, *, progress: bool = False) -> SweepSetup:
    """The sweep's shared inputs for a running ``sim.federation.LocalFederation``."""
    scn: Scenario = fed.scn
    pf = scn.prefetch
    suite = fed.suite
    model = suite.base()
    cfg = model.cfg
    T = pf.request_tokens or cfg.context
    if T > cfg.context:
        raise SweepError(f"prefetch.request_tokens: {T} is longer than the model's context ({cfg.context})")
    if pf.warmup_tokens >= T:
        raise SweepError(f"prefetch.warmup_tokens: {pf.warmup_tokens} leaves no token to generate in {T}")
    user_node = {u: p.node_id for p in fed.plans for u in p.users}
    if not user_node:
        raise SweepError("no node holds a user: the sweep replays users' requests")
    per_user = {u: windows(suite.ids(u, "eval"), T, math.ceil(pf.requests / len(user_node))) for u in user_node}
    pairs = interleave(per_user, pf.requests)
    if not pairs:
        raise SweepError(f"no user's held-out text holds a request of {T} tokens")
    requests = build_requests(model, pairs, user_node, prompt_len=pf.warmup_tokens, gap_s=pf.lead_s,
                              hidden="next-block" in pf.predictors)
    hist_pairs = [(u, w) for u in user_node for w in windows(suite.ids(u, "train"), T, pf.history_requests)]
    history = [Request(user=u, token_ids=w, routes=route_trace(model, w)[0], prompt_len=pf.warmup_tokens,
                       node=user_node[u]) for u, w in hist_pairs]
    config = ServingConfig(policy=pf.miss_policy, step_s=pf.step_ms / 1000, lead_s=pf.lead_s,
                           activation_bytes=4 * cfg.d_model)
    sizes = expert_sizes(suite.base_state(), expert_codec=scn.model.expert_codec)
    quality = QualityMeter(model, requests, max_passes=config.ppl_passes) if pf.miss_policy == "substitute" else None
    return SweepSetup(model=model, requests=requests, history=history, sizes=sizes,
                      links=node_links(scn, [p.node_id for p in fed.plans]), config=config,
                      warmup_tokens=pf.warmup_tokens, lead_s=pf.lead_s, seed=scn.federation.seed, quality=quality)


def sweep_section(setup: SweepSetup, predictors: Sequence[str], budgets: Sequence[int],
                  on_events: Callable[[list[dict]], None] | None = None) -> dict[str, Any]:
    """report["prefetch"]: the rows, the goal, and what they were measured on."""
    rows = run_rows(setup, predictors, budgets, on_events)
    L, E = setup.sizes.shape
    tokens = [len(r.token_ids) for r in setup.requests]
    distinct = [np.mean([len(np.unique(blk)) for blk in np.asarray(r.routes)]) for r in setup.requests]
    return {
        "rows": rows,
        "goal": goal(rows, E),
        "setup": {"requests": len(setup.requests), "tokens_per_request": max(tokens),
                  "prompt_tokens": setup.requests[0].prompt_len, "history_requests": len(setup.history),
                  "users": len({r.user for r in setup.requests}), "policy": setup.config.policy,
                  "distinct_experts_per_block": float(np.mean(distinct)),
                  "step_s": setup.config.step_s, "lead_s": setup.lead_s, "experts": [L, E],
                  "expert_bytes_total": int(setup.sizes.sum()), "expert_bytes_mean": float(setup.sizes.mean()),
                  "model": "base", "note": "budgets are experts per block (global byte budget = that share of "
                                           "all expert bytes); bytes are per request, each planned on a cold node"},
    }


async def run_sweep(fed, report: dict) -> None:
    """`sim.run`'s extra: add ``report["prefetch"]`` and append the sweep's transfers to the run's events.

    The sweep is CPU work for minutes at ``small``; it runs in a worker thread so the coordinator's event
    loop (heartbeats, shutdown) stays responsive meanwhile.
    """
    pf = fed.scn.prefetch
    events: list[dict] = []

    def work() -> dict[str, Any]:
        return sweep_section(setup_for(fed), pf.predictors, pf.budgets, events.extend)

    report["prefetch"] = await asyncio.to_thread(work)
    if isinstance(report.get("_events"), list):
        report["_events"].extend(events)
    else:  # the report's events were already written: keep ours beside them
        from .network import write_events

        write_events(fed.workdir.parent / "prefetch_events.jsonl", events)


# ---------------------------------------------------------------------------------------------- report

def write_plots(section: dict[str, Any], out: Path) -> list[str]:
    """prefetch_frontier.png (bytes shipped per token against ppl ratio, or stall seconds under an exact
    policy; one line per predictor) and prefetch_hit_rate.png (hit rate against budget); their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = section.get("rows") or []
    if not rows:
        return []
    names = list(dict.fromkeys(r["predictor"] for r in rows))
    by_name = {n: sorted((r for r in rows if r["predictor"] == n), key=lambda r: r["budget"]) for n in names}
    policy = rows[0]["policy"]
    g = section.get("goal", {})
    budgets = sorted({r["budget"] for r in rows})
    if policy == "substitute":
        quality = lambda r: r["ppl_ratio"]  # noqa: E731
        ylabel, target = "perplexity / full model's (missed experts substituted)", ("ppl ratio", GOAL_PPL_RATIO)
    else:  # exact policies pay in time instead
        quality = lambda r: r["stall_seconds"] / max(r["requests"], 1)  # noqa: E731
        ylabel, target = f"stall per request, virtual s ({policy} on a miss)", None
    _lines(plt, out / "prefetch_frontier.png", by_name, lambda r: r["bytes_shipped_per_token"] / 1000, quality,
           xlabel="KB shipped per token (prefetched + fetched on demand)", ylabel=ylabel, target=target,
           title=f"Bandwidth/quality frontier of expert prefetching (budgets {budgets[0]}..{budgets[-1]} experts "
                 f"per block; {g.get('budget')} labelled)", mark=g.get("budget"))
    _lines(plt, out / "prefetch_hit_rate.png", by_name, lambda r: r["budget"], lambda r: r["hit_rate"],
           xlabel="budget: experts per block materialised", target=("hit rate", GOAL_HIT_RATE),
           ylabel="hit rate (prefetched and arrived before its block ran)", title="Expert hit rate against budget",
           vline=g.get("budget"))
    return ["prefetch_frontier.png", "prefetch_hit_rate.png"]


def _lines(plt, path: Path, by_name: dict[str, list[dict]], x: Callable[[dict], float], y: Callable[[dict], float], *,
           xlabel: str, ylabel: str, title: str, target: tuple[str, float] | None, mark: int | None = None,
           vline: float | None = None) -> None:
    """One line per predictor (the oracle dashed), a dotted goal line, the ``mark`` budget's points labelled."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, rs in by_name.items():
        xs, ys = [x(r) for r in rs], [y(r) for r in rs]
        ax.plot(xs, ys, marker="o", ms=3, label=name, ls="--" if name == "oracle" else "-")
        for r, px, py in zip(rs, xs, ys):
            if r["budget"] == mark:
                ax.annotate(str(mark), (px, py), fontsize=6, alpha=0.7)
    if target is not None:
        ax.axhline(target[1], color="grey", lw=0.8, ls=":", label=f"goal: {target[0]} {target[1]}")
    if vline is not None:
        ax.axvline(vline, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(section: dict[str, Any]) -> list[str]:
    """report.md's prefetch section: the goal, then one table row per (predictor, budget)."""
    rows = section.get("rows") or []
    s = section.get("setup", {})
    g = section.get("goal", {})
    lines = ["## Prefetch", ""]
    if s:
        lines += [f"{s['requests']} held-out requests of {s['tokens_per_request']} tokens ({s['prompt_tokens']}-token "
                  f"prompt) from {s['users']} users, replayed per row on the base model after "
                  f"{s['history_requests']} history requests; miss policy `{s['policy']}`, "
                  f"{1000 * s['step_s']:.0f} ms per step, ahead predictors ship {s['lead_s']:.0f} s early. "
                  f"All experts: {s['expert_bytes_total'] / 1e6:.2f} MB ({s['expert_bytes_mean'] / 1e3:.1f} KB each). "
                  f"A request uses {s['distinct_experts_per_block']:.1f} distinct experts per block on average "
                  f"(of {s['experts'][1]}). "
                  f"{s['note'].capitalize()}.", ""]
    if g.get("evaluated"):
        verdict = "**met**" if g["met"] else "**not met**"
        lines.append(f"Goal at {g['budget']} of {g['of_experts']} experts per block (hit rate >= "
                     f"{g['hit_rate_target']}, ppl ratio <= {g['ppl_ratio_target']}): {verdict} by the best "
                     f"predictor, `{g['predictor']}`: hit rate {g['hit_rate']:.3f}, ppl ratio "
                     f"{_num(g['ppl_ratio'])}.")
        if "oracle" in g:
            o = g["oracle"]
            lines.append(f"The oracle (the routing actually taken) reaches hit rate {o['hit_rate']:.3f}, ppl ratio "
                         f"{_num(o['ppl_ratio'])} at that budget, the ceiling for every predictor" +
                         ("." if o["meets_goal"] else ": the goal is out of any predictor's reach at this budget, "
                          "because a request uses more experts per block than the budget holds."))
        first = {k: v for k, v in g["smallest_budget_meeting_goal"].items() if v is not None}
        lines.append("Smallest budget meeting both conditions: " +
                     (", ".join(f"{k} {v}" for k, v in first.items()) if first else "none swept") + ".")
    elif g:
        lines.append(f"Goal not evaluated: {g.get('reason', '')}.")
    lines += ["", "| predictor | budget | hit rate | ppl ratio | top-1 acc | top-4 acc | top-8 acc | "
                  "KB/token shipped | KB/token wasted | stall s | TTFT s |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        rec = {k: (f"{np.mean(v):.3f}" if v else "") for k, v in r["recall_at_k_tokens"].items()}
        lines.append(f"| {r['predictor']} | {r['budget']} | {r['hit_rate']:.3f} | {_num(r['ppl_ratio'])} | "
                     f"{rec.get('1', '')} | {rec.get('4', '')} | {rec.get('8', '')} | "
                     f"{r['bytes_shipped_per_token'] / 1e3:.2f} | {r['bytes_wasted_per_token'] / 1e3:.2f} | "
                     f"{r['stall_seconds']:.2f} | {r['ttft']:.3f} |")
    lines.append("")
    lines.append("top-k acc: share of (token, block) expert uses whose expert is among the predictor's top k of "
                 "its block (SiDA's top-k accuracy), mean over blocks. report.json has it per block "
                 "(`recall_at_k_tokens`) beside recall@k over distinct experts (`recall_at_k`).")
    return lines


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
