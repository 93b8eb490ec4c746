"""Prefetching: predictors on a hand-computable trace, the knapsack against brute force, policies, metrics."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.prefetch import (
    LFU,
    LRU,
    GlobalFrequency,
    Keyword,
    NextBlockRouter,
    Oracle,
    PredictorError,
    QualityError,
    RandomPredictor,
    Request,
    RequestContext,
    RoutingTrace,
    RunAhead,
    SelectionError,
    ServingConfig,
    UserHistogram,
    build_predictor,
    byte_metrics,
    coarsen_segments,
    evaluate_prefetch,
    hit_rate,
    idle_links,
    knapsack_dp,
    knapsack_greedy,
    link_time,
    recall_at_k,
    remote_time,
    route_trace,
    router_weights,
    segmented_substitution_ppl,
    select_experts,
    served_events,
    simulate_request,
    stream_arrivals,
    substitution_ppl,
    visible_context,
    visible_trace,
)
from model.config import PRESETS
from model.fractal_moe import build_model

# Two requests on L=2 blocks of E=4 experts; every expected number below is worked out from these by hand.
ANN = RoutingTrace(user="ann", routes=np.array([[0, 0, 1, 2], [3, 3, 3, 1]]), token_ids=np.array([1, 2, 3, 3]))
BOB = RoutingTrace(user="bob", routes=np.array([[1, 1, 1, 1], [2, 2, 0, 0]]), token_ids=np.array([3, 4, 4, 5]))
GLOBAL = np.array([[2, 5, 1, 0], [2, 1, 2, 3]]) / 8
SHAPE = dict(n_layers=2, n_experts=4)


def observed(p):
    for t in (ANN, BOB):
        p.observe(visible_trace(p, t))
    return p


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset, randomly initialised, on one thread (2 shared cores thrash with more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_model(PRESETS["tiny"].model, 0)
    torch.set_num_threads(threads)


# ---- predictors -------------------------------------------------------------------------------------------

def test_global_frequency_is_uniform_then_the_pooled_histogram():
    p = GlobalFrequency(**SHAPE)
    assert np.allclose(p.predict(RequestContext(user="x")), 0.25)
    assert np.allclose(observed(p).predict(RequestContext(user="x")), GLOBAL)


def test_user_histogram_is_smoothed_toward_global():
    p = observed(UserHistogram(**SHAPE, alpha=4.0))
    # ann's own counts [2,1,1,0] and [0,1,0,3] plus 4 pseudo-tokens spread as the global histogram, over 8
    assert np.allclose(p.predict(RequestContext(user="ann")),
                       [[3 / 8, 3.5 / 8, 1.5 / 8, 0], [1 / 8, 1.5 / 8, 1 / 8, 4.5 / 8]])
    assert np.allclose(p.predict(RequestContext(user="newcomer")), GLOBAL)


def test_run_ahead_updates_the_user_histogram_with_the_first_k_routes():
    p = observed(RunAhead(**SHAPE, alpha=4.0, kappa=2.0, k=2))
    ctx = RequestContext(user="ann", prompt_routes=np.array([[2, 2, 0], [1, 1, 1]]))
    # the first 2 routes ([2,2] and [1,1]) plus ann's histogram worth 2 tokens, over 4
    expected = np.array([[0.75, 0.875, 2 + 0.375, 0], [0.25, 2 + 0.375, 0.25, 1.125]]) / 4
    assert np.allclose(p.predict(ctx), expected)
    with pytest.raises(PredictorError, match="prompt_routes"):
        p.predict(RequestContext(user="ann"))


def test_keyword_maps_prompt_words_to_the_experts_of_their_requests():
    p = observed(Keyword(**SHAPE, vocab_size=10, beta=1.0))
    ann_hist = np.array([[0.5, 0.25, 0.25, 0], [0, 0.25, 0, 0.75]])
    bob_hist = np.array([[0, 1, 0, 0], [0.5, 0, 0.5, 0]])
    # token 1 was only in ann's request; token 9 was never seen and adds nothing
    assert np.allclose(p.predict(RequestContext(user="x", prompt_ids=np.array([1, 1, 9]))), (ann_hist + GLOBAL) / 2)
    # token 3 was in both; token 4 only in bob's
    assert np.allclose(p.predict(RequestContext(user="x", prompt_ids=np.array([3, 4]))),
                       ((ann_hist + bob_hist) / 2 + bob_hist + GLOBAL) / 3)
    with pytest.raises(PredictorError, match="only available on the node"):
        p.observe(RoutingTrace(user="ann", routes=ANN.routes))


def test_next_block_router_applies_block_b_plus_1_router_to_block_b_input():
    w = np.array([[[1, 0], [0, 1], [-1, 0], [0, -1]],  # block 0's router
                  [[0, 1], [1, 0], [0, -1], [-1, 0]]])  # block 1's router: (L=2, E=4, C=2)
    hidden = np.array([[[1, 0], [0, 1], [0, 1]],  # block 0's MoE input on three prompt tokens
                       [[-1, 0], [-1, 0], [-1, 0]]])  # block 1's own input: must not be used for block 1
    ctx = RequestContext(user="x", prompt_hidden=hidden)
    assert np.allclose(NextBlockRouter(router_weights=w, soft=0).predict(ctx),
                       [[1 / 3, 2 / 3, 0, 0], [2 / 3, 1 / 3, 0, 0]])
    # the soft term: block 0's logits are (1,0,-1,0) for token (1,0) and (0,1,0,-1) for (0,1)
    e = math.e
    pa, pb = np.array([e, 1, 1 / e, 1]) / (e + 2 + 1 / e), np.array([1, e, 1, 1 / e]) / (e + 2 + 1 / e)
    got = NextBlockRouter(router_weights=w, soft=0.01).predict(ctx)
    assert np.allclose(got[0], [1 / 3, 2 / 3, 0, 0] + 0.01 * (pa + 2 * pb) / 3)
    assert got[0, 2] > got[0, 3] > 0  # experts no token picked are still ranked, and shipped if there is room


def test_lru_scores_last_use_and_lfu_ages_counts():
    lru = observed(LRU(**SHAPE))
    # ann's tokens are stamped 1..4, bob's 5..8
    assert np.array_equal(lru.predict(RequestContext(user="x")), [[2, 8, 4, 0], [8, 4, 6, 3]])
    lfu = observed(LFU(**SHAPE, decay=0.5))
    assert np.allclose(lfu.predict(RequestContext(user="x")), [[1, 4.5, 0.5, 0], [2, 0.5, 2, 1.5]])


def test_random_is_seeded_and_the_oracle_is_the_truth():
    ctx = RequestContext(user="x")
    a, b, c = (RandomPredictor(**SHAPE, seed=s).predict(ctx) for s in (7, 7, 8))
    assert a.shape == (2, 4) and np.array_equal(a, b) and not np.array_equal(a, c)
    truth = Oracle(**SHAPE).predict(RequestContext(user="x", routes=ANN.routes))
    assert np.allclose(truth, [[0.5, 0.25, 0.25, 0], [0, 0.25, 0, 0.75]])


def test_only_node_side_predictors_see_text():
    full = RequestContext(user="ann", prompt_ids=np.array([1]), prompt_hidden=np.zeros((2, 1, 2)),
                          prompt_routes=np.zeros((2, 1), int), routes=ANN.routes)
    for p in (GlobalFrequency(**SHAPE), UserHistogram(**SHAPE), LRU(**SHAPE), LFU(**SHAPE)):
        seen = visible_context(p, full)
        assert seen.prompt_ids is None and seen.prompt_hidden is None and seen.routes is None
        assert visible_trace(p, ANN).token_ids is None
    node_side = Keyword(**SHAPE, vocab_size=10)
    assert visible_context(node_side, full).prompt_ids is not None
    assert visible_context(node_side, full).routes is None
    assert visible_context(Oracle(**SHAPE), full).routes is not None


def test_build_predictor_by_name_with_named_errors():
    assert build_predictor("user", n_layers=2, n_experts=4, alpha=3.0).alpha == 3.0
    assert build_predictor("keyword", n_layers=2, n_experts=4, vocab_size=10).name == "keyword"
    with pytest.raises(PredictorError, match="unknown predictor 'psychic'"):
        build_predictor("psychic", n_layers=2, n_experts=4)
    with pytest.raises(PredictorError, match="no option 'alpha'"):
        build_predictor("lru", n_layers=2, n_experts=4, alpha=1.0)
    with pytest.raises(PredictorError, match="needs vocab_size"):
        build_predictor("keyword", n_layers=2, n_experts=4)
    with pytest.raises(PredictorError, match="outside"):
        GlobalFrequency(**SHAPE).observe(RoutingTrace(user="x", routes=np.array([[4], [0]])))


# ---- selection --------------------------------------------------------------------------------------------

def brute_force(values, weights, capacity):
    best = 0.0
    for take in itertools.product([False, True], repeat=len(values)):
        take = np.array(take, dtype=bool)
        if weights[take].sum() <= capacity:
            best = max(best, values[take].sum())
    return best


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 20)), min_size=1, max_size=9), st.integers(0, 60))
def test_knapsack_against_brute_force(items, capacity):
    values = np.array([v for v, _ in items])
    weights = np.array([w for _, w in items])
    best = brute_force(values, weights, capacity)
    dp = knapsack_dp(values, weights, capacity)
    assert weights[dp].sum() <= capacity
    assert values[dp].sum() == pytest.approx(best, abs=1e-9)
    greedy = knapsack_greedy(values, weights, capacity)
    assert weights[greedy].sum() <= capacity
    assert values[greedy].sum() >= 0.5 * best - 1e-9


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 10_000), st.randoms(use_true_random=False))
def test_select_experts_is_optimal_over_real_sizes(L, E, budget, rnd):
    scores = np.array([[rnd.random() for _ in range(E)] for _ in range(L)])
    sizes = np.array([[rnd.randrange(500, 4000) for _ in range(E)] for _ in range(L)])
    mask = select_experts(scores, sizes, budget)
    assert sizes[mask].sum() <= budget
    assert scores[mask].sum() == pytest.approx(brute_force(scores.ravel(), sizes.ravel(), budget))


def test_select_experts_scope_and_density():
    scores = np.array([[0.9, 0.8], [0.1, 0.05]])
    sizes = np.full((2, 2), 10)
    assert select_experts(scores, sizes, 20).tolist() == [[True, True], [False, False]]
    assert select_experts(scores, sizes, 20, scope="block").tolist() == [[True, False], [True, False]]
    # one big valuable expert against two small ones worth more together: density is not enough
    scores, sizes = np.array([[0.5, 0.3, 0.3]]), np.array([[6, 5, 5]])
    assert select_experts(scores, sizes, 10).tolist() == [[False, True, True]]
    assert select_experts(scores, sizes, 10, method="greedy").tolist() == [[True, False, False]]
    # experts predicted unused are not worth any bytes
    assert not select_experts(np.zeros((2, 2)), np.full((2, 2), 1), 100).any()


def test_select_experts_coarse_granularity_still_fits_and_minimum_per_block():
    rng = np.random.default_rng(0)
    sizes = rng.integers(900_000, 1_100_000, size=(4, 16))
    budget = sizes.sum() // 2
    mask = select_experts(rng.random((4, 16)), sizes, budget)  # a table of budget bytes would be too big
    assert sizes[mask].sum() <= budget and mask.sum() >= 28
    forced = select_experts(np.array([[0.0, 0.2], [0.0, 0.0]]), np.full((2, 2), 10), 20, min_per_block=1)
    assert forced.tolist() == [[False, True], [True, False]]
    with pytest.raises(SelectionError, match="cannot hold"):
        select_experts(np.ones((2, 2)), np.full((2, 2), 10), 15, min_per_block=1)
    with pytest.raises(SelectionError, match="integer byte counts"):
        select_experts(np.ones((2, 2)), np.full((2, 2), 1.5), 10)


# ---- metrics ----------------------------------------------------------------------------------------------

def test_recall_at_k_by_hand():
    scores = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    # block 0 used {0,1,2}, top-2 {0,1}; block 1 used {1,3}, top-2 {3,2}
    assert np.allclose(recall_at_k(scores, ANN.routes, 2), [2 / 3, 1 / 2])
    assert np.allclose(recall_at_k(scores, ANN.routes, 2, weighted=True), [3 / 4, 3 / 4])
    assert np.allclose(recall_at_k(scores, ANN.routes, 4), [1, 1])
    # ties go to the lower expert id
    assert np.allclose(recall_at_k(np.zeros((1, 4)), np.array([[1, 0]]), 1), [0.5])


def test_hit_rate_counts_late_prefetches_as_misses():
    routes = np.array([[0, 0, 1, 2]])
    mask = np.array([[True, True, False, False]])
    assert hit_rate(routes, mask) == 0.75
    arrival = np.array([[0.0, 5.0, np.inf, np.inf]])
    assert hit_rate(routes, mask, arrival, need_s=np.array([0.0, 1.0, 2.0, 6.0])) == 0.5
    oracle_mask = select_experts(Oracle(**SHAPE).predict(RequestContext(user="x", routes=ANN.routes)),
                                 np.full((2, 4), 100), 10_000)
    assert hit_rate(ANN.routes, oracle_mask) == 1.0


def test_bytes_shipped_and_wasted():
    sizes = np.array([[10, 20, 30, 40], [1, 2, 3, 4]])
    mask = np.array([[True, False, False, True], [False, True, True, False]])
    # block 0 expert 3 and block 1 expert 2 are shipped but ANN never uses them
    assert byte_metrics(ANN.routes, mask, sizes) == {"bytes_shipped": 55, "bytes_wasted": 43,
                                                      "bytes_shipped_per_token": 55 / 4,
                                                      "bytes_wasted_per_token": 43 / 4}


# ---- miss policies ----------------------------------------------------------------------------------------

ROUTES1 = np.array([[0, 1, 1, 2]])  # one block; prompt = tokens 0-1, then tokens 2 and 3 one step each
MASK1 = np.array([[True, True, False]])
ARRIVAL1 = np.array([[-np.inf, 1.0, np.inf]])  # expert 0 installed already, expert 1 lands at t=1
SIZES1 = np.array([[100, 200, 400]])
FETCH1 = link_time(rtt_s=0.5, bps=800)  # 400 bytes: 0.5 + 4 s
REMOTE1 = remote_time(rtt_s=0.2, up_bps=80, down_bps=160)  # n tokens of 10 bytes: 0.2 + 1.5 n s


def serve(policy, **kw):
    return simulate_request(ROUTES1, MASK1, ARRIVAL1, policy=policy, sizes=SIZES1, prompt_len=2, step_s=1.0,
                            fetch=FETCH1, remote=REMOTE1, activation_bytes=10, **kw)


def test_wait_stalls_for_late_prefetch_and_on_demand_fetch():
    out = serve("wait")
    # prefill waits for expert 1 until t=1, computes to 2; token 2 hits; token 3 fetches expert 2: 3 -> 7.5
    assert (out.ttft_s, out.stall_s, out.end_s) == pytest.approx((2.0, 5.5, 8.5))
    assert (out.uses, out.hits, out.fetched_bytes) == (4, 2, 400)
    assert out.fetches == ((0, 2, 400, 3.0, 7.5),)


def test_substitute_loses_no_time_and_records_what_served():
    out = serve("substitute")
    assert (out.ttft_s, out.stall_s, out.end_s) == pytest.approx((1.0, 0.0, 3.0))
    assert (out.hits, out.substituted) == (2, 2)
    assert [(a, b, m.tolist()) for a, b, m in out.segments] == [(0, 2, [[True, False, False]]),
                                                               (2, 4, [[True, True, False]])]
    # with nothing installed yet, a block waits for its first expert
    empty = simulate_request(ROUTES1, np.array([[False, True, False]]), ARRIVAL1, policy="substitute",
                             sizes=SIZES1, prompt_len=2, step_s=1.0)
    assert empty.stall_s == pytest.approx(1.0) and empty.hits == 1


def test_remote_counts_bytes_and_auto_picks_the_faster():
    out = serve("remote")
    # prefill sends 1 token's state (1.7 s), token 3 another (1.7 s); 10 bytes each way per token
    assert (out.ttft_s, out.stall_s, out.end_s) == pytest.approx((2.7, 3.4, 6.4))
    assert out.remote_bytes == 40 and out.hits == 2
    assert np.allclose(out.remote_calls, [(0, 10, 0.0, 1.7), (0, 10, 3.7, 5.4)])
    assert serve("auto").policy == "remote"
    assert simulate_request(ROUTES1, MASK1, ARRIVAL1, policy="auto", sizes=SIZES1, prompt_len=2, step_s=1.0,
                            fetch=link_time(rtt_s=0.0, bps=1e9), remote=REMOTE1,
                            activation_bytes=10).policy == "wait"


def test_stream_arrivals_in_order():
    arrival = stream_arrivals([(0, 2), (0, 0)], SIZES1, 1.0, rtt_s=0.5, bps=800)
    assert arrival.tolist() == [[1.0 + 0.5 + 5.0, np.inf, 1.0 + 0.5 + 4.0]]


# ---- the model: traces and substitution perplexity ------------------------------------------------------

def test_substitution_with_every_expert_is_exactly_the_full_model(tiny):
    tokens = torch.randint(0, 384, (2, 48), generator=torch.Generator().manual_seed(0))
    cmp = substitution_ppl(tiny, tokens, np.ones((4, 16), dtype=bool))
    assert cmp.ppl_ratio == 1.0 and cmp.nll_substituted == cmp.nll_full and cmp.missing_share == 0.0
    assert cmp.tokens == 2 * 47


def test_substitution_with_half_the_experts_changes_ppl_and_restores_the_model(tiny):
    ids = np.random.default_rng(1).integers(0, 384, 48)
    full_routes, _ = route_trace(tiny, ids)
    mask = np.zeros((4, 16), dtype=bool)
    mask[:, ::2] = True
    routes, _ = route_trace(tiny, ids, mask=mask)
    assert np.all(routes % 2 == 0)  # only installed experts served
    cmp = substitution_ppl(tiny, ids, mask)
    assert cmp.missing_share == pytest.approx(np.mean(full_routes[:, :-1] % 2 == 1))
    assert cmp.nll_substituted != cmp.nll_full
    assert all(m.available is None and not m.record_input for m in tiny.moes)
    # one segment covering everything is the static case
    seg = segmented_substitution_ppl(tiny, ids, [(0, 48, mask)])
    assert seg.nll_substituted == cmp.nll_substituted
    # experts arriving mid-sequence: coarsening to one pass keeps the first (smallest) installed set
    full = np.ones((4, 16), dtype=bool)
    arriving = [(0, 10, mask), (10, 30, full), (30, 48, full)]
    assert segmented_substitution_ppl(tiny, ids, arriving, max_passes=1).nll_substituted == cmp.nll_substituted
    assert coarsen_segments(arriving, 2)[1][:2] == (30, 48)
    later = segmented_substitution_ppl(tiny, ids, arriving)
    assert later.nll_substituted != cmp.nll_substituted
    assert later.missing_share == pytest.approx(np.mean(full_routes[:, :10] % 2 == 1) * 10 / 47)
    with pytest.raises(QualityError, match="block 1 has no installed expert"):
        substitution_ppl(tiny, ids, np.eye(4, 16, dtype=bool)[[0, 2, 2, 3]] * [[1], [0], [1], [1]])


def test_next_block_router_on_the_model_gets_block_0_exactly(tiny):
    ids = np.random.default_rng(2).integers(0, 384, 32)
    routes, hidden = route_trace(tiny, ids, hidden=True)
    assert hidden.shape == (4, 32, 32) and router_weights(tiny).shape == (4, 16, 32)
    got = NextBlockRouter(router_weights=router_weights(tiny), soft=0).predict(
        RequestContext(user="x", prompt_hidden=hidden))
    assert np.allclose(got[0], np.bincount(routes[0], minlength=16) / 32, atol=1e-6)


# ---- replaying requests -----------------------------------------------------------------------------------

class _Link:
    def __init__(self, down_bps, up_bps, rtt_s):
        self.down_bps, self.up_bps, self.rtt_s = down_bps, up_bps, rtt_s


ADSL = _Link(8e6, 0.8e6, 0.06)


def requests(model, n=4, T=24):
    out = []
    for i in range(n):
        ids = np.random.default_rng(10 + i).integers(0, 384, T)
        routes, hidden = route_trace(model, ids, hidden=True)
        out.append(Request(user=f"u{i % 2}", token_ids=ids, routes=routes, prompt_len=6, start_s=5.0 * i,
                           prompt_hidden=hidden[:, :6]))
    return out


def test_oracle_row_hits_everything_and_wastes_nothing(tiny):
    reqs = requests(tiny)
    sizes = np.full((4, 16), 20_000)
    for policy in ("wait", "substitute"):
        row = evaluate_prefetch(Oracle(n_layers=4, n_experts=16), reqs, sizes=sizes, budget_bytes=sizes.sum(),
                                links=idle_links(ADSL, ADSL), config=ServingConfig(policy=policy, step_s=0.05),
                                model=tiny)
        assert row["hit_rate"] == 1.0 and row["stall_seconds"] == 0.0
        assert row["bytes_wasted"] == 0 and row["ppl_ratio"] == 1.0
        used = sum(len(np.unique(r.routes[b])) for r in reqs for b in range(4))
        assert row["bytes_shipped"] == used * 20_000
        assert row["recall_at_k"]["8"] == pytest.approx([np.mean([min(8, len(np.unique(r.routes[b]))) /
                                                                  len(np.unique(r.routes[b])) for r in reqs])
                                                         for b in range(4)])


def test_late_prefetch_costs_hits_and_stall(tiny):
    reqs = requests(tiny)
    sizes = np.full((4, 16), 20_000)
    common = dict(sizes=sizes, budget_bytes=sizes.sum(), links=idle_links(ADSL, ADSL))
    early = evaluate_prefetch(Oracle(n_layers=4, n_experts=16), reqs, **common, config=ServingConfig(lead_s=60))
    served = []
    late = evaluate_prefetch(Oracle(n_layers=4, n_experts=16), reqs, **common, config=ServingConfig(lead_s=0),
                             on_request=served.append)
    assert early["hit_rate"] == 1.0 and early["ttft"] == 0.0
    # shipped when the request arrives, everything lands after the prefill needs it: 60 ms + 20 kB at 8 Mbit/s
    assert late["hit_rate"] < 1.0 and late["stall_seconds"] > 0.06 * len(reqs)
    assert late["ttft"] >= 0.06 + 0.02
    events = served_events(served[1], sizes)
    assert len(events) == served[1].mask.sum() and {e["kind"] for e in events} == {"prefetch"}
    # one stream from the request's arrival: the first expert after the RTT and its own 20 kB
    assert events[0]["start"] == 5.0 and events[0]["end"] == pytest.approx(5.0 + 0.06 + 0.02)
    assert events[-1]["end"] == pytest.approx(5.0 + 0.06 + 0.02 * len(events))
    assert json.loads(json.dumps(events)) == events


def test_substitute_row_measures_ppl_and_halving_bytes(tiny):
    reqs = requests(tiny)
    sizes = np.full((4, 16), 20_000)
    row = evaluate_prefetch(GlobalFrequency(n_layers=4, n_experts=16), reqs, sizes=sizes, history=reqs,
                            budget_bytes=sizes.sum() // 2, links=idle_links(ADSL, ADSL),
                            config=ServingConfig(policy="substitute"), model=tiny)
    assert row["bytes_shipped"] == len(reqs) * sizes.sum() // 2
    assert row["ppl_ratio"] != 1.0 and math.isfinite(row["ppl_ratio"])
    assert 0 < row["hit_rate"] < 1 and set(row["ttft_by_user"]) == {"u0", "u1"}


def test_only_routes_reach_a_coordinator_side_predictor(tiny):
    class Spy(GlobalFrequency):
        seen: list = []

        def observe(self, trace):
            self.seen.append(trace.token_ids)
            super().observe(trace)

        def predict(self, context):
            self.seen.append(context.prompt_ids)
            return super().predict(context)

    evaluate_prefetch(Spy(n_layers=4, n_experts=16), requests(tiny, n=2), sizes=np.full((4, 16), 1),
                      budget_bytes=32, links=idle_links(ADSL, ADSL))
    assert Spy.seen == [None] * 4
