"""The live prefetch part of a run: partial nodes per (policy, budget), requests, heartbeats, the rows."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
import torch

from coordinator.prefetch import NodeLinks, idle_links
from coordinator.prefetch_live import LivePlanner, NodeBudget
from model.codecs import decode_tensor
from model.fractal_moe import FractalMoE
from model.staged import router_prior, staged_forward
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.auth_metadata import bearer_metadata
from proto.bundle import read_bundle_verified

from ..network import LinkProfile, get_link, resolve_link
from ..prefetch_sweep import REMOTE_PEER, QualityMeter, SweepSetup, setup_for, sweep_row
from ..scenario import Scenario
from ..sections import LivePart, Section, add_section
from .report import markdown, write_plots

KEY = "prefetch_live"


def node_id_of(policy: str, budget: int, unit: str, beta: float = 0.0) -> str:
    """The partial node of one configuration, e.g. ``pf-wait-8e`` (8 experts per block), ``pf-auto-90000b``,
    ``pf-substitute-8e-prior0.3`` (with a router prior of strength 0.3)."""
    return f"pf-{policy}-{budget}{unit}" + (f"-prior{beta:g}" if beta else "")


def configs(scn: Scenario) -> list[tuple[str, int, str, float]]:
    """(policy, budget, unit, prior beta) of every partial node: unit "e" experts per block, "b" bytes over
    all blocks; beta 0: no router prior."""
    pf = scn.prefetch
    budgets = [(k, "e") for k in pf.live_budgets] + [(n, "b") for n in pf.live_budget_bytes]
    return [(p, k, u, float(b)) for b in pf.live_prior_betas for k, u in budgets for p in pf.live_policies]


def decoded_model(fed, name: str) -> FractalMoE:
    """The shipped bundle ``name`` decoded into a FractalMoE (what every node serves), for references."""
    data = fed.bundles[name].path.read_bytes()
    model = FractalMoE(fed.suite.preset.model)
    model.load_state_dict({r.name: decode_tensor(r) for r in read_bundle_verified([data]).records})
    return model.eval()


def with_prior_logps(model: FractalMoE, ids: np.ndarray, usage: Sequence[float] | None, beta: float) -> np.ndarray:
    """Log-probs (n-1,) of ``ids`` (n,) on the fully materialised ``model`` whose router is biased by the prior
    a partial node recorded for the request (``usage`` L*E values; None: no prior)."""
    L, E = model.cfg.n_layers, model.cfg.n_experts
    bias = None if usage is None else router_prior(torch.tensor(usage, dtype=torch.float32).view(L, E), beta)
    x = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    with torch.no_grad():
        gen = staged_forward(model, x[:-1], torch.ones(L, E, dtype=torch.bool), router_bias=bias)
        try:
            next(gen)
            raise AssertionError("a fully materialised model never misses")
        except StopIteration as stop:
            logits = stop.value[0]  # (n-1, V)
    return torch.log_softmax(logits.double(), -1).gather(1, x[1:, None])[:, 0].numpy()


def stall_seconds(record: dict, links: NodeLinks) -> float:
    """Virtual seconds one request waited, block by block as the node resolved its misses: a block's
    on-demand fetches as one transfer (they run concurrently) and its remote calls as one round trip
    (hidden states up, outputs down), on the node's idle link; blocks in turn."""
    t = 0.0
    for b in sorted({f[0] for f in record["fetched"]} | {r[0] for r in record["remote"]}):
        end = t
        fetch = sum(int(n) for blk, _, n in record["fetched"] if blk == b)
        up = sum(int(u) for blk, _, u, _ in record["remote"] if blk == b)
        if fetch:
            end = max(end, links.fetch(fetch, t))
        if up:
            end = max(end, links.remote(up, t))
        t = end
    return t


def _ppl(logps: Sequence[np.ndarray]) -> float:
    allp = np.concatenate(list(logps)) if logps else np.zeros(0)
    return float(math.exp(-allp.mean())) if allp.size else math.nan


async def _score(stub: rpc.NodeStub, meta, ids: np.ndarray) -> np.ndarray:
    reply = await stub.ScoreTokens(pb.ScoreTokensRequest(token_ids=[int(t) for t in ids]), metadata=meta, timeout=300)
    return np.asarray(reply.logprobs, dtype=np.float64)


def _sweep_prediction(setup: SweepSetup, predictor: str, budget: int, policy: str,
                      meter: QualityMeter | None) -> dict[str, Any]:
    """The offline sweep's row for the same predictor, budget (experts per block) and policy."""
    cfg = dataclasses.replace(setup.config, policy=policy)
    row = sweep_row(predictor, budget, dataclasses.replace(setup, config=cfg, quality=meter))
    keep = ("hit_rate", "ppl_ratio", "bytes_shipped", "bytes_shipped_per_token", "remote_bytes", "stall_seconds",
            "requests", "tokens")
    return {k: row.get(k) for k in keep}


def _row(policy: str, budget: int, unit: str, summary: dict, logps: list[np.ndarray], ref: list[np.ndarray],
         plan_bytes: list[int], link: LinkProfile, links: NodeLinks, lead_s: float,
         ref_prior: list[np.ndarray]) -> dict[str, Any]:
    pf = summary["prefetch"]
    by_kind = summary["bytes"]["by_kind"]
    recs = pf["requests"]
    tokens = sum(r["tokens"] for r in recs)
    uses, hits = sum(r["uses"] for r in recs), sum(r["hits"] for r in recs)
    stalls = [stall_seconds(r, links) for r in recs]
    # a plan's experts ship in the gap before the next request; what does not fit the gap is waited for
    late = [max(0.0, link.rtt_s + 8 * b / link.down_bps - lead_s) if b else 0.0 for b in plan_bytes]
    act = by_kind.get("activation", {})
    weights = int(by_kind.get("bundle", {}).get("payload", 0))
    activations = int(act.get("sent", 0)) + int(act.get("received", 0))
    ppl, ppl_full = _ppl(logps), _ppl(ref)
    diff = max((float(np.abs(a - b).max()) for a, b in zip(logps, ref)), default=0.0)
    return {
        "node": summary["node_id"], "policy": policy, "budget": budget,
        "budget_unit": "experts per block" if unit == "e" else "bytes",
        "requests": len(recs), "tokens": tokens, "uses": uses, "hits": hits, "hit_rate": hits / uses if uses else 1.0,
        "bytes": {"expert_weights": weights, "expert_planned": int(pf["bytes_planned"]),
                  "expert_on_demand": int(pf["bytes_on_demand"]), "activations": activations,
                  "activation_payload": int(act.get("payload", 0)),
                  "control": int(by_kind.get("control", {}).get("sent", 0)) + int(by_kind.get("control", {}).get(
                      "received", 0))},
        "bytes_per_token": (weights + activations) / max(tokens, 1),
        "stall_seconds": float(sum(stalls) + sum(late)), "stall_seconds_misses": float(sum(stalls)),
        "stall_seconds_late_plans": float(sum(late)),
        "substituted": sum(r["substituted"] for r in recs),
        "remote_calls": sum(len(r["remote"]) for r in recs), "fetches_on_demand": sum(len(r["fetched"]) for r in recs),
        "installs": pf["installs"], "evictions": pf["evictions"],
        "ppl": ppl, "ppl_full": ppl_full, "ppl_ratio": ppl / ppl_full if ppl_full else None,
        "ppl_full_with_prior": _ppl(ref_prior), "ppl_ratio_vs_full_with_prior": ppl / _ppl(ref_prior),
        "prior_requests": sum(r.get("prior") is not None for r in recs),
        "max_abs_logp_diff_vs_full": diff,
        "experts_held": [r["held"] for r in recs], "experts_held_end": len(pf["held"]),
        "timeline": pf["timeline"],
    }


async def live_section(fed) -> dict[str, Any]:
    """report["prefetch_live"] for a running ``sim.federation.LocalFederation``."""
    scn: Scenario = fed.scn
    pf = scn.prefetch
    setup = await asyncio.to_thread(setup_for, fed)
    codec = scn.model.expert_codec
    source = f"base-{codec}"
    link_name = scn.network.default_link
    link = resolve_link(link_name, where="network.default_link", profiles=scn.network.profiles)
    peer = get_link(REMOTE_PEER)
    links = idle_links(link, peer)
    todo = configs(scn)
    budgets = {node_id_of(p, k, u, b): NodeBudget(source=source, predictor=pf.live_predictor, prior=b > 0,
                                                  **({"budget_experts": k} if u == "e" else {"budget_bytes": k}))
               for p, k, u, b in todo}
    core = fed.coordinator.core
    planner = LivePlanner(core.registry, core.store, budgets, seed=scn.federation.seed)
    core.prefetch_planner, core.expert_peer, core.router_prior = planner, planner.expert_peer, planner.router_prior
    specs = [{"node_id": node_id_of(p, k, u, b), "model": "base", "codec": codec, "link": link_name,
              "prefetch": {"source": source, "policy": p, "down_bps": link.down_bps, "up_bps": link.up_bps,
                           "rtt_s": link.rtt_s, "peer_rtt_s": peer.rtt_s, "prior_beta": b,
                           **({"budget_experts": k} if u == "e" else {"budget_bytes": k})}}
             for p, k, u, b in todo]
    meta = bearer_metadata(fed.node_token)
    full = next(p for p in fed.plans if p.model == "base")
    full_address = fed.node_results[full.node_id]["address"]
    try:
        async with fed.extra_nodes(specs) as started:
            bad = [r for r in started.values() if not r.get("ok")]
            if bad:
                raise RuntimeError(f"partial node {bad[0]['node_id']} failed to start: {bad[0].get('error')}")
            actor = fed.extra_actors[-1]
            channels = {nid: grpc.aio.insecure_channel(r["address"]) for nid, r in started.items()}
            channels["full"] = grpc.aio.insecure_channel(full_address)
            stubs = {nid: rpc.NodeStub(ch) for nid, ch in channels.items()}
            logps: dict[str, list[np.ndarray]] = {nid: [] for nid in started}
            ref: list[np.ndarray] = []
            plan_bytes: dict[str, list[int]] = {nid: [] for nid in started}
            summaries: dict[str, dict] = {}
            try:
                for req in setup.requests:
                    ref.append(await _score(stubs["full"], meta, req.token_ids))
                    for nid in started:
                        before = summaries.get(nid, {}).get("prefetch", {}).get("bytes_planned", 0)
                        logps[nid].append(await _score(stubs[nid], meta, req.token_ids))
                        summaries[nid] = await asyncio.wrap_future(actor.heartbeat_now.remote(nid).future())
                        plan_bytes[nid].append(summaries[nid]["prefetch"]["bytes_planned"] - before)
            finally:
                for ch in channels.values():
                    await ch.close()
    finally:
        core.prefetch_planner = core.expert_peer = core.router_prior = None
    meter = QualityMeter(setup.model, setup.requests, max_passes=setup.config.ppl_passes) \
        if "substitute" in pf.live_policies else None
    reference = await asyncio.to_thread(decoded_model, fed, source) if any(pf.live_prior_betas) else None
    rows = []
    for p, k, u, b in todo:
        nid = node_id_of(p, k, u, b)
        recs = summaries[nid]["prefetch"]["requests"]
        ref_prior = ref if reference is None or not b else [
            await asyncio.to_thread(with_prior_logps, reference, req.token_ids, rec.get("prior"), b)
            for req, rec in zip(setup.requests, recs)]
        row = _row(p, k, u, summaries[nid], logps[nid], ref, plan_bytes[nid], link, links, pf.lead_s, ref_prior)
        row["prior_beta"] = b
        if b:
            row["prior_usage"] = [rec.get("prior") for rec in recs]  # per request, L*E row-major (None: none yet)
        if u == "e" and not b:
            row["sweep"] = await asyncio.to_thread(_sweep_prediction, setup, pf.live_predictor, k, p,
                                                   meter if p == "substitute" else None)
        rows.append(row)
    L, E = setup.sizes.shape
    return {
        "rows": rows,
        "planner": {"plans": len(planner.log), "log": planner.log[-200:]},
        "setup": {"requests": len(setup.requests), "tokens_per_request": int(len(setup.requests[0].token_ids)),
                  "users": len({r.user for r in setup.requests}), "request_users": [r.user for r in setup.requests],
                  "predictor": pf.live_predictor,
                  "source_bundle": source, "expert_codec": codec,
                  "prior_betas": list(pf.live_prior_betas), "link": link_name, "remote_peer": REMOTE_PEER,
                  "experts": [L, E], "expert_bytes_total": int(setup.sizes.sum()), "lead_s": pf.lead_s,
                  "model": "base (no adapter), as the sweep",
                  "note": "live: one node per (policy, budget), caching across requests, plans learnt online "
                          "from ReportRouting after every request; sweep: the offline replay of the same "
                          "requests (each planned on a cold node, prefill then one step per token)"},
    }


async def run_live(fed, report: dict) -> None:
    """`sim.run`'s extra: add ``report["prefetch_live"]``."""
    add_section(report, Section(KEY, await live_section(fed), markdown, write_plots))


def wanted(scn: Scenario) -> bool:
    """Whether the scenario asks for live prefetching."""
    return scn.prefetch.live


LIVE_PART = LivePart(KEY, wanted, run_live)
