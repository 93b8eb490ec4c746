"""The prefetch sweep: its pieces against hand-computed cases, and the whole sweep through sim.run at tiny."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest
import torch

from coordinator.prefetch import (
    PREDICTORS,
    Request,
    ServingConfig,
    idle_links,
    route_trace,
    segmented_substitution_ppl,
    substitution_ppl,
)
from model.config import get_preset
from model.fractal_moe import build_model
from sim import prefetch_sweep as ps
from sim.network import LinkProfile
from sim.run import live_parts, run_federation
from sim.scenario import PREFETCH_PREDICTORS, ScenarioError, from_dict

ROW_KEYS = {"predictor", "budget", "hit_rate", "bytes_shipped", "ppl_ratio", "recall_at_k", "recall_at_k_tokens",
            "bytes_shipped_per_token", "bytes_wasted_per_token", "stall_seconds", "ttft", "ttft_by_user"}


@pytest.fixture(scope="module")
def tiny_model():
    """An untrained tiny FractalMoE (its router still spreads tokens over many experts)."""
    torch.manual_seed(0)
    model = build_model(get_preset("tiny").model, seed=3)
    return model.eval()


# ------------------------------------------------------------------------------------- pieces

def test_expert_sizes_are_the_codec_payloads_by_hand(tiny_model):
    cfg = tiny_model.cfg
    state = tiny_model.state_dict()
    int8 = ps.expert_sizes(state, expert_codec="int8")
    # int8 per-row: one byte per weight plus a float32 scale per row; fc1 is (F, C), fc2 (C, F)
    per_expert = (cfg.d_ff * cfg.d_model + 4 * cfg.d_ff) + (cfg.d_model * cfg.d_ff + 4 * cfg.d_model)
    assert int8.shape == (cfg.n_layers, cfg.n_experts) and int8.dtype == np.int64
    assert (int8 == per_expert).all()
    assert (ps.expert_sizes(state, expert_codec="fp16") == 2 * 2 * cfg.d_ff * cfg.d_model).all()
    with pytest.raises(ps.SweepError, match="no expert"):
        ps.expert_sizes({"ln_f.weight": torch.ones(3)}, expert_codec="int8")


def test_interleave_deals_round_robin_and_truncates():
    w = {u: [np.full(2, i) for i in range(n)] for u, n in (("a", 3), ("b", 1), ("c", 2))}
    pairs = ps.interleave(w, 5)
    assert [(u, int(x[0])) for u, x in pairs] == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("c", 1)]
    assert len(ps.interleave(w, 100)) == 6
    assert [len(x) for x in ps.windows(torch.arange(10), 4, 5)] == [4, 4]


def test_masked_nll_matches_one_pass_per_mask(tiny_model):
    cfg = tiny_model.cfg
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(3, 20))
    masks = rng.random((3, cfg.n_layers, cfg.n_experts)) < 0.4
    masks[:, :, 0] = True
    nll = ps.masked_nll(tiny_model, tokens, masks)  # (3, 19), batched with a per-row mask
    for i in range(3):
        ref = substitution_ppl(tiny_model, tokens[i], masks[i])
        assert nll[i].sum() == pytest.approx(ref.nll_substituted, rel=1e-5)
    full = ps.masked_nll(tiny_model, tokens, np.ones_like(masks))
    assert full.sum() == pytest.approx(substitution_ppl(tiny_model, tokens, masks[0]).nll_full, rel=1e-5)
    assert tiny_model.moes[0].available is None  # left as found
    with pytest.raises(ps.SweepError, match="installed expert in every block"):
        ps.masked_nll(tiny_model, tokens, np.zeros_like(masks))


def test_a_mask_covering_the_routes_serves_exactly_the_full_model(tiny_model):
    cfg = tiny_model.cfg
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(1, 24))
    ref = substitution_ppl(tiny_model, tokens, np.ones((cfg.n_layers, cfg.n_experts), dtype=bool))
    routes = route_trace(tiny_model, tokens[0])[0]  # (L, T)
    used = np.zeros((cfg.n_layers, cfg.n_experts), dtype=bool)
    np.put_along_axis(used, routes, True, axis=1)
    assert ps.covers(used, routes)
    assert ps.masked_nll(tiny_model, tokens, used[None]).sum() == pytest.approx(ref.nll_full, rel=1e-6)
    less = used.copy()
    b, e = 0, routes[0, 5]
    less[b, e] = False
    less[b, (e + 1) % cfg.n_experts] = True
    assert not ps.covers(less, routes)
    assert ps.masked_nll(tiny_model, tokens, less[None]).sum() != pytest.approx(ref.nll_full, rel=1e-6)


def test_quality_meter_agrees_with_segmented_substitution_ppl(tiny_model):
    cfg = tiny_model.cfg
    rng = np.random.default_rng(2)
    L, E = cfg.n_layers, cfg.n_experts
    reqs = []
    for _ in range(2):
        ids = rng.integers(0, cfg.vocab_size, size=16)
        reqs.append(Request(user="u", token_ids=ids, routes=route_trace(tiny_model, ids)[0], prompt_len=4))
    grow = [rng.random((L, E)) < 0.3 for _ in range(4)]
    for m in grow:
        m[:, 1] = True
    masks = list(np.logical_or.accumulate(np.stack(grow)))  # installed sets only grow along a request
    segments = {0: [(0, 4, masks[0]), (4, 9, masks[1]), (9, 12, masks[2]), (12, 16, masks[3])],
                1: [(0, 16, np.ones((L, E), dtype=bool))]}
    meter = ps.QualityMeter(tiny_model, reqs, max_passes=3)
    full, sub, n = meter.nll(segments)
    refs = [segmented_substitution_ppl(tiny_model, reqs[i].token_ids, segments[i], max_passes=3) for i in (0, 1)]
    assert n == sum(r.tokens for r in refs) == 30
    assert full == pytest.approx(sum(r.nll_full for r in refs), rel=1e-6)
    assert sub == pytest.approx(sum(r.nll_substituted for r in refs), rel=1e-5)
    assert refs[1].nll_substituted == pytest.approx(refs[1].nll_full)  # the full mask costs nothing


def test_hybrid_ships_ahead_then_swaps_in_the_run_ahead_difference():
    """One block of 4 experts of 1000 bytes, a budget of 2, a link of 1000 bytes/s and 0.1 s RTT.

    The user's history routes 0,0,0,1: their histogram ships {0, 1} at 90 s (lead 10 s before the request at
    100 s); 0 arrives at 91.1, 1 at 92.1. The prompt routes 2 eight times, so the run-ahead posterior
    (8 tokens against a prior worth 16) ranks 0 (0.5) and 2 (0.33) above 1 (0.17): 0 stays, 1 is evicted, 2
    ships at 100 s and arrives at 101.1. Serving (wait policy, no compute time): the 8 prompt uses of 2 miss
    and wait 1.1 s; then 0, 0 hit; 1 misses (evicted) and is fetched on demand, 1.1 s; 2 hits. 3 hits of
    12; shipped 2000 (kept) + 1000 (evicted) + 1000 (fetched) bytes, 1000 of them wasted; 2.2 s stalled.
    """
    sizes = np.full((1, 4), 1000, dtype=np.int64)
    link = LinkProfile(down_bps=8000, up_bps=8000, rtt_s=0.1)
    routes = np.array([[2] * 8 + [0, 0, 1, 2]])
    setup = ps.SweepSetup(
        model=None, sizes=sizes, links={"n": idle_links(link, link)}, warmup_tokens=8, lead_s=10.0, seed=0,
        config=ServingConfig(policy="wait", lead_s=10.0),
        history=[Request(user="u", token_ids=np.zeros(4, dtype=int), routes=np.array([[0, 0, 0, 1]]), prompt_len=1,
                         node="n")],
        requests=[Request(user="u", token_ids=np.zeros(12, dtype=int), routes=routes, prompt_len=8, start_s=100.0,
                          node="n")])
    events = []
    row = ps.sweep_row("hybrid", 2, setup, events.extend)
    assert row["hit_rate"] == pytest.approx(3 / 12)
    assert row["bytes_shipped"] == 4000 and row["bytes_wasted"] == 1000 and row["bytes_evicted"] == 1000
    assert row["bytes_shipped_per_token"] == pytest.approx(4000 / 12)
    assert row["stall_seconds"] == pytest.approx(2.2)
    assert row["ppl_ratio"] == 1.0 and row["plans_at"] == "request"
    got = {(ev["kind"], ev["expert"], ev.get("evicted", False)): (ev["start"], ev["end"]) for ev in events}
    assert got[("prefetch", 0, False)] == pytest.approx((90.0, 91.1))
    assert got[("prefetch", 1, True)] == pytest.approx((90.0, 92.1))
    assert got[("prefetch", 2, False)] == pytest.approx((100.0, 101.1))
    assert got[("fetch", 1, False)] == pytest.approx((101.1, 102.2))
    assert all(ev["source"] == ps.SOURCE and ev["predictor"] == "hybrid" and ev["budget"] == 2 for ev in events)


def test_cache_baselines_learn_per_node():
    """Users a (node n1) and b (node n2): n1's LFU has seen expert 3 twice and 1 once, n2's only expert 5."""
    sizes = np.full((1, 8), 100, dtype=np.int64)
    hist = [Request(user=u, token_ids=np.zeros(3, dtype=int), routes=np.array([r]), prompt_len=1, node=n)
            for u, n, r in (("a", "n1", [3, 3, 1]), ("b", "n2", [5, 5, 5]))]
    setup = ps.SweepSetup(model=None, sizes=sizes, links={}, warmup_tokens=1, lead_s=1.0, seed=0,
                          config=ServingConfig(), history=hist, requests=[])
    lfu = ps.make_predictor("lfu", setup, 200)
    for r in hist:
        lfu.observe(r.trace())
    assert lfu.name == "lfu" and lfu.plans_at == "ahead"
    assert lfu.predict(hist[0].context()).tolist() == [[0, 1, 0, 2, 0, 0, 0, 0]]
    assert lfu.predict(hist[1].context()).tolist() == [[0, 0, 0, 0, 0, 3, 0, 0]]
    with pytest.raises(ps.SweepError, match="no node"):
        lfu.predict(Request(user="c", token_ids=np.zeros(1, dtype=int), routes=np.zeros((1, 1), dtype=int),
                            prompt_len=1).context())


def _row(name, budget, hit, ppl):
    return {"predictor": name, "budget": budget, "hit_rate": hit, "ppl_ratio": ppl}


def test_goal_picks_the_best_non_oracle_predictor_at_half_the_experts():
    rows = [_row("oracle", 8, 0.99, 1.0), _row("user", 8, 0.90, 1.01), _row("lru", 8, 0.96, 1.03),
            _row("user", 12, 0.97, 1.005), _row("lru", 12, 0.99, 1.001), _row("random", 8, 0.5, 1.2)]
    g = ps.goal(rows, 16)
    assert g["budget"] == 8 and g["predictor"] == "lru" and g["hit_rate"] == 0.96
    assert g["hit_rate_ok"] and not g["ppl_ok"] and g["met"] is False
    assert g["oracle"] == {"hit_rate": 0.99, "ppl_ratio": 1.0, "meets_goal": True}
    assert g["smallest_budget_meeting_goal"] == {"oracle": 8, "user": 12, "lru": 12, "random": None}
    assert ps.goal([_row("user", 8, 0.95, 1.02)], 16)["met"] is True
    assert ps.goal([_row("oracle", 8, 1.0, 1.0)], 16)["evaluated"] is False


# ------------------------------------------------------------------------------------- scenario keys

def test_scenario_knows_every_sweep_predictor():
    assert set(PREFETCH_PREDICTORS) == set(PREDICTORS) | {"hybrid"}


@pytest.mark.parametrize("prefetch, key", [
    ({"budgets": [8], "predictors": ["psychic"]}, "prefetch.predictors"),
    ({"budgets": [8]}, "prefetch.predictors"),
    ({"budgets": [8, 8], "predictors": ["user"]}, "prefetch.budgets"),
    ({"requests": 0}, "prefetch.requests"),
    ({"request_tokens": 10, "warmup_tokens": 16}, "prefetch.request_tokens"),
    ({"lead_s": 0}, "prefetch.lead_s"),
    ({"step_ms": -1}, "prefetch.step_ms"),
    ({"history_requests": -2}, "prefetch.history_requests"),
])
def test_bad_prefetch_keys_are_refused_by_name(prefetch, key):
    with pytest.raises(ScenarioError) as err:
        from_dict({"prefetch": prefetch})
    assert str(err.value).startswith(key + ":")


# ------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_sweep_runs_end_to_end_through_sim_run(tiny_suite, tmp_path):
    scn = from_dict({
        "name": "prefetch_tiny",
        "federation": {"nodes": 2, "preset": "tiny"},
        "model": {"specialists": []},
        "workload": {"score_requests_per_user": 1, "generate_requests_per_user": 0, "mixture_requests": 0,
                     "unknown_users": False},
        "prefetch": {"predictors": ["oracle", "user", "hybrid", "run-ahead"], "budgets": [8, 16], "requests": 6,
                     "history_requests": 2},
    })
    extra = live_parts(scn)
    asyncio.run(run_federation(scn, tmp_path, suite=tiny_suite, progress=False, extra=extra))
    report = json.loads((tmp_path / "report.json").read_text())
    section = report["prefetch"]
    rows = {(r["predictor"], r["budget"]): r for r in section["rows"]}
    assert set(rows) == {(p, b) for p in ("oracle", "user", "hybrid", "run-ahead") for b in (8, 16)}
    for r in rows.values():
        assert set(r) >= ROW_KEYS
        assert len(r["recall_at_k"]["4"]) == tiny_suite.preset.model.n_layers  # per block
        assert r["requests"] == 6 and 0.0 <= r["hit_rate"] <= 1.0
    # the whole model materialised ahead of the request: every use hits, nothing is substituted
    for p in ("oracle", "user", "hybrid"):
        assert rows[(p, 16)]["hit_rate"] == 1.0 and rows[(p, 16)]["ppl_ratio"] == 1.0
    # the oracle never ships an expert the request does not use, and no predictor hits more often
    for b in (8, 16):
        assert rows[("oracle", b)]["bytes_wasted_per_token"] == 0
        assert all(rows[("oracle", b)]["hit_rate"] >= rows[(p, b)]["hit_rate"] for p in ("user", "hybrid", "run-ahead"))
    # run-ahead ships only once the prompt is in: on a school ADSL line its experts arrive late
    assert rows[("run-ahead", 16)]["hit_rate"] < 1.0 and rows[("run-ahead", 16)]["stall_seconds"] > 0
    assert rows[("run-ahead", 16)]["ttft"] > rows[("user", 16)]["ttft"]
    assert 1 < section["setup"]["distinct_experts_per_block"] <= 16
    g = section["goal"]
    assert g["budget"] == 8 and g["evaluated"] and isinstance(g["met"], bool)
    assert g["predictor"] in ("user", "hybrid", "run-ahead")
    assert (tmp_path / "prefetch_frontier.png").stat().st_size > 0
    assert {"prefetch_frontier.png", "prefetch_hit_rate.png"} <= set(report["plots"])
    assert "| oracle | 8 |" in (tmp_path / "report.md").read_text()
    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    sweep = [e for e in lines if e.get("source") == ps.SOURCE]
    assert sweep and all(math.isfinite(e["start"]) and e["start"] <= e["end"] for e in sweep)
    assert {e["predictor"] for e in sweep} == {"oracle", "user", "hybrid", "run-ahead"}
    assert len(lines) > len(sweep)  # the run's own shipping events are still there
