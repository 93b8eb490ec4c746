"""The sweep on a live federation: its shared inputs, the report section, and `sim.run`'s entry point."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from coordinator.prefetch import Request, ServingConfig, route_trace

from ..network import write_events
from ..scenario import Scenario
from ..sections import LivePart, Section, add_section
from .inputs import SweepError, build_requests, expert_sizes, interleave, node_links, windows
from .quality import QualityMeter
from .report import markdown, write_plots
from .rows import SweepSetup, goal, run_rows

KEY = "prefetch"  # the run report's key of this section


def setup_for(fed, *, progress: bool = False) -> SweepSetup:
    """The sweep's shared inputs for a running ``sim.federation.LocalFederation``."""
    scn: Scenario = fed.scn
    pf = scn.prefetch
    suite = fed.suite
    model = suite.base()
    cfg = model.cfg
    T = pf.request_tokens or cfg.context
    if cfg.context < T:
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

    add_section(report, Section(KEY, await asyncio.to_thread(work), markdown, write_plots))
    if isinstance(report.get("_events"), list):
        report["_events"].extend(events)
    else:  # the report's events were already written: keep ours beside them
        write_events(fed.workdir.parent / "prefetch_events.jsonl", events)


def wanted(scn: Scenario) -> bool:
    """Whether the scenario asks for the sweep: any budget to sweep."""
    return bool(scn.prefetch.budgets)


LIVE_PART = LivePart(KEY, wanted, run_sweep)
