"""Live prefetching end to end at tiny: partial nodes in a running federation, checked independently.

Log-probs are checked against a FractalMoE built here from the very bundle the federation shipped
(decoded with model.codecs); bytes against the bundle's own manifest and file size.
"""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest
import torch

from coordinator.prefetch import idle_links
from model.codecs import decode_tensor
from model.fractal_moe import FractalMoE
from proto.bundle import read_bundle_verified, read_manifest
from sim import prefetch_live as pl
from sim.network import LinkProfile
from sim.prefetch_sweep import interleave, windows
from sim.run import live_parts, run_federation
from sim.scenario import ScenarioError, from_dict

REQUESTS = 4


def test_stall_seconds_time_each_block_as_one_fetch_and_one_remote_round_trip():
    node = LinkProfile(down_bps=8e6, up_bps=1e6, rtt_s=0.05)
    peer = LinkProfile(down_bps=1e8, up_bps=1e8, rtt_s=0.01)
    rec = {"fetched": [(0, 1, 1000), (0, 2, 3000), (2, 5, 500)], "remote": [(2, 3, 400, 400), (2, 4, 100, 100)]}
    block0 = 0.05 + 8 * 4000 / 8e6  # two experts fetched together
    block2 = max(0.05 + 8 * 500 / 8e6, 0.06 + 8 * 500 / 1e6 + 8 * 500 / 8e6)  # a fetch beside remote calls
    assert math.isclose(pl.stall_seconds(rec, idle_links(node, peer)), block0 + block2, rel_tol=1e-12)
    assert pl.stall_seconds({"fetched": [], "remote": []}, idle_links(node, peer)) == 0


@pytest.mark.parametrize("prefetch, key", [
    ({"live": True, "live_budgets": [], "live_budget_bytes": []}, "prefetch.live"),
    ({"live_budgets": [17]}, "prefetch.live_budgets"),
    ({"live_policies": ["teleport"]}, "prefetch.live_policies"),
    ({"live_predictor": "oracle"}, "prefetch.live_predictor"),
    ({"live_budget_bytes": [0]}, "prefetch.live_budget_bytes"),
    ({"live_prior_betas": [-0.5]}, "prefetch.live_prior_betas"),
    ({"live_prior_betas": []}, "prefetch.live_prior_betas"),
    ({"live_predictor": "lru", "live_prior_betas": [0, 0.3]}, "prefetch.live_prior_betas"),
])
def test_bad_live_keys_are_refused_by_name(prefetch, key):
    with pytest.raises(ScenarioError) as err:
        from_dict({"prefetch": prefetch})
    assert str(err.value).startswith(key + ":")


def tiny_live(name: str, **prefetch):
    """A live prefetch scenario at tiny: 2 base nodes, int8 experts, one scoring request per user."""
    return from_dict({
        "name": name, "federation": {"nodes": 2, "preset": "tiny"},
        "model": {"specialists": [], "expert_codec": "int8"},
        "workload": {"score_requests_per_user": 1, "generate_requests_per_user": 0, "mixture_requests": 0,
                     "unknown_users": False},
        "prefetch": {"live": True, "history_requests": 1, **prefetch},
    })


@pytest.mark.slow
def test_live_prefetch_runs_end_to_end_through_sim_run(tiny_suite, tmp_path):
    scn = tiny_live("prefetch_live_tiny", live_budgets=[4, 16], requests=REQUESTS,
                    live_policies=["substitute", "wait", "remote", "auto"])
    asyncio.run(run_federation(scn, tmp_path, suite=tiny_suite, progress=False, extra=live_parts(scn)))
    report = json.loads((tmp_path / "report.json").read_text())
    section = report["prefetch_live"]
    rows = {(r["policy"], r["budget"]): r for r in section["rows"]}
    assert set(rows) == {(p, b) for p in ("substitute", "wait", "remote", "auto") for b in (4, 16)}

    # independent reference: the shipped bundle decoded here, the requests rebuilt from the users' text
    bundle_path = tmp_path / "work" / "bundles" / "base-int8.ffb"
    data = bundle_path.read_bytes()
    cfg = tiny_suite.preset.model
    model = FractalMoE(cfg)
    model.load_state_dict({r.name: decode_tensor(r) for r in read_bundle_verified([data]).records})
    model.eval()
    users = list(tiny_suite.known_users)
    per_user = {u: windows(tiny_suite.ids(u, "eval"), cfg.context, math.ceil(REQUESTS / len(users))) for u in users}
    pairs = interleave(per_user, REQUESTS)
    nll, n = 0.0, 0
    with torch.no_grad():
        for _, ids in pairs:
            x = torch.as_tensor(ids, dtype=torch.long)
            lp = torch.log_softmax(model(x[None, :-1]).logits[0].double(), -1).gather(1, x[1:, None])[:, 0]
            nll -= float(lp.sum())
            n += lp.numel()
    ppl_full = math.exp(nll / n)
    manifest = read_manifest(data)
    for (policy, budget), r in rows.items():
        assert r["requests"] == REQUESTS and r["tokens"] == n
        assert math.isclose(r["ppl_full"], ppl_full, rel_tol=1e-4), (r["ppl_full"], ppl_full)
        assert r["bytes"]["expert_weights"] == r["bytes"]["expert_planned"] + r["bytes"]["expert_on_demand"]
        assert all(h <= budget * cfg.n_layers for h in r["experts_held"])
        if policy in ("wait", "remote", "auto"):  # every miss resolved exactly: the full model's log-probs
            assert r["max_abs_logp_diff_vs_full"] < 1e-4 and abs(r["ppl_ratio"] - 1) < 1e-5
        if budget == 16:  # the first plan holds everything: the whole bundle once, every use a hit
            assert r["bytes"]["expert_weights"] == len(data) == manifest.total_size
            assert r["hit_rate"] == 1.0 and r["stall_seconds"] == 0 and r["bytes"]["activations"] == 0
            assert r["max_abs_logp_diff_vs_full"] < 1e-4
    small = {p: rows[(p, 4)] for p in ("substitute", "wait", "remote", "auto")}
    assert small["substitute"]["hit_rate"] < 1.0 and small["substitute"]["stall_seconds"] == 0
    assert small["substitute"]["bytes"]["expert_on_demand"] == 0 and small["substitute"]["ppl_ratio"] > 1.0
    assert small["wait"]["bytes"]["expert_on_demand"] > 0 and small["wait"]["stall_seconds"] > 0
    # remote: each use that missed sends one hidden state (d_model float32) up and its output down
    rem = small["remote"]
    assert rem["bytes"]["expert_on_demand"] == 0
    assert rem["bytes"]["activation_payload"] == 2 * 4 * cfg.d_model * (rem["uses"] - rem["hits"]) > 0
    assert rem["bytes"]["activations"] > rem["bytes"]["activation_payload"]
    assert rem["stall_seconds"] > 0
    assert section["planner"]["plans"] >= len(rows)
    for r in rows.values():
        assert r["sweep"]["hit_rate"] is not None and 0 <= r["sweep"]["hit_rate"] <= 1
    assert (tmp_path / "prefetch_live_bytes_quality.png").stat().st_size > 0
    assert "| remote | 4/block | 0 |" in (tmp_path / "report.md").read_text()
    assert np.isfinite([r["bytes_per_token"] for r in rows.values()]).all()


@pytest.mark.slow
def test_live_router_prior_raises_hits_and_matches_an_independent_biased_model(tiny_suite, tmp_path):
    """Partial nodes with and without a router prior on the same requests: the prior's nodes hit more; a
    wait node with the prior serves exactly the shipped model whose router logits get beta * log(usage)
    added (done here with a forward hook on each router, not model.staged), for the usage it recorded."""
    beta, n_req = 1.0, 6
    scn = tiny_live("prefetch_live_prior_tiny", live_budgets=[4], requests=n_req,
                    live_policies=["substitute", "wait"], live_prior_betas=[0.0, beta])
    asyncio.run(run_federation(scn, tmp_path, suite=tiny_suite, progress=False, extra=live_parts(scn)))
    section = json.loads((tmp_path / "report.json").read_text())["prefetch_live"]
    rows = {(r["policy"], r["prior_beta"]): r for r in section["rows"]}
    assert set(rows) == {(p, b) for p in ("substitute", "wait") for b in (0.0, beta)}
    for p in ("substitute", "wait"):
        assert rows[(p, beta)]["hit_rate"] > rows[(p, 0.0)]["hit_rate"], p
        assert rows[(p, beta)]["prior_requests"] == n_req and rows[(p, 0.0)]["prior_requests"] == 0

    data = (tmp_path / "work" / "bundles" / "base-int8.ffb").read_bytes()
    cfg = tiny_suite.preset.model
    L, E = cfg.n_layers, cfg.n_experts
    model = FractalMoE(cfg)
    model.load_state_dict({r.name: decode_tensor(r) for r in read_bundle_verified([data]).records})
    model.eval()
    users = list(dict.fromkeys(section["setup"]["request_users"]))  # the order requests were dealt in
    assert sorted(users) == sorted(tiny_suite.known_users)
    per_user = {u: windows(tiny_suite.ids(u, "eval"), cfg.context, math.ceil(n_req / len(users))) for u in users}
    pairs = interleave(per_user, n_req)
    assert [u for u, _ in pairs] == section["setup"]["request_users"]

    def ppl_with_prior(usages) -> float:  # the shipped model, each request's router biased by its usage
        nll, n = 0.0, 0
        for (_, ids), usage in zip(pairs, usages, strict=True):
            u = np.asarray(usage, dtype=np.float64).reshape(L, E)
            bias = torch.tensor(beta * np.log(np.maximum(u / u.sum(axis=1, keepdims=True), 1e-6)),
                                dtype=torch.float32)  # (L, E)
            hooks = [blk.moe.router.register_forward_hook(lambda _m, _i, out, row=bias[b]: out + row)
                     for b, blk in enumerate(model.blocks)]
            try:
                x = torch.as_tensor(ids, dtype=torch.long)
                with torch.no_grad():
                    lp = torch.log_softmax(model(x[None, :-1]).logits[0].double(), -1).gather(1, x[1:, None])[:, 0]
            finally:
                for h in hooks:
                    h.remove()
            nll -= float(lp.sum())
            n += lp.numel()
        return math.exp(nll / n)

    for p in ("substitute", "wait"):
        r = rows[(p, beta)]
        assert math.isclose(r["ppl_full_with_prior"], ppl_with_prior(r["prior_usage"]), rel_tol=1e-4), p
        assert r["ppl_ratio"] == pytest.approx(r["ppl"] / rows[(p, 0.0)]["ppl_full"], rel=1e-9)
    wait = rows[("wait", beta)]
    assert abs(wait["ppl_ratio_vs_full_with_prior"] - 1) < 1e-4  # every miss fetched: the biased full model
    assert rows[("substitute", 0.0)]["ppl_ratio_vs_full_with_prior"] == rows[("substitute", 0.0)]["ppl_ratio"]
    for r in rows.values():
        assert r["bytes"]["expert_weights"] == r["bytes"]["expert_planned"] + r["bytes"]["expert_on_demand"] > 0
        assert all(h <= 4 * L for h in r["experts_held"])
