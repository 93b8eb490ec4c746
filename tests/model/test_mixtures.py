"""Output-space mixtures, checked against brute force in float64 and hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from model import mixtures as M
from model.mixtures import MixtureError


def random_logps(n: int, t: int, seed: int, *, spread: float = 3.0) -> np.ndarray:
    """(n, t) log-probabilities of observed tokens from random next-token distributions over 50 tokens."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, spread, size=(n, t, 50))
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tokens = rng.integers(0, 50, size=t)
    return lp[:, np.arange(t), tokens]


def brute_weighted(logps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """log sum_i w_i p_i by exponentiating in float64 (no logsumexp)."""
    w = weights / weights.sum(axis=0, keepdims=True)
    return np.log((w * np.exp(logps)).sum(axis=0))


def brute_posterior(logps: np.ndarray, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior weights and mixture by running the Bayesian update token by token with probabilities."""
    n, t = logps.shape
    w = prior / prior.sum()
    ws, mix = np.zeros((n, t)), np.zeros(t)
    for s in range(t):
        ws[:, s] = w
        p = np.exp(logps[:, s])
        mix[s] = np.log((w * p).sum())
        w = w * p / (w * p).sum()
    return ws, mix


# ---- uniform and weighted mixtures -----------------------------------------------------------------

@pytest.mark.parametrize("n,t,seed", [(1, 5, 0), (2, 17, 1), (5, 40, 2)])
def test_uniform_mixture_matches_averaging_probabilities(n, t, seed):
    lp = random_logps(n, t, seed)
    expect = np.log(np.exp(lp).mean(axis=0))
    got = M.uniform_mixture(lp)
    assert isinstance(got, np.ndarray) and got.shape == (t,)
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-12)
    got_t = M.uniform_mixture(torch.from_numpy(lp).float())  # torch in, torch out
    assert isinstance(got_t, torch.Tensor)
    np.testing.assert_allclose(got_t.numpy(), expect, atol=1e-6)


def test_weighted_mixture_fixed_and_per_position_weights():
    lp = random_logps(3, 12, 3)
    w = np.array([0.2, 0.5, 0.3])
    np.testing.assert_allclose(M.weighted_mixture(lp, w), brute_weighted(lp, w[:, None]), atol=1e-12)
    wt = np.random.default_rng(0).uniform(0, 1, size=(3, 12))
    np.testing.assert_allclose(M.weighted_mixture(lp, wt), brute_weighted(lp, wt), atol=1e-12)
    # unnormalised weights are normalised
    np.testing.assert_allclose(M.weighted_mixture(lp, 10 * w), M.weighted_mixture(lp, w), atol=1e-12)


def test_mixture_keeps_batch_axes():
    lp = np.stack([random_logps(3, 9, s) for s in range(4)], axis=1)  # (N=3, B=4, T=9)
    got = M.posterior_mixture(lp)
    assert got.shape == (4, 9)
    for b in range(4):  # every sequence restarts its posterior
        np.testing.assert_allclose(got[b], M.posterior_mixture(lp[:, b]), atol=1e-12)


# ---- the per-token bound of the uniform mixture ------------------------------------------------------

logp_values = st.one_of(st.floats(-60.0, 0.0), st.just(0.0), st.just(-math.inf), st.floats(-1e-9, 0.0))


@settings(max_examples=150, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 12)), elements=logp_values))
def test_uniform_mixture_per_token_bound(lp):
    mix = M.uniform_mixture(lp)
    check = M.per_token_bound_holds(mix, lp)
    assert check.holds, check
    # independent statement of the same inequality, token by token
    best = lp.max(axis=0)
    finite = np.isfinite(best)
    assert np.all(mix[finite] >= best[finite] - math.log(lp.shape[0]) - 1e-12)


def test_per_token_bound_is_attained_and_violations_are_caught():
    # one specialist certain (p = 1), the others give 0: the mixture sits exactly on the bound
    lp = np.full((4, 3), -math.inf)
    lp[0] = 0.0
    check = M.per_token_bound_holds(M.uniform_mixture(lp), lp)
    assert check.holds and abs(check.slack) < 1e-12
    lp = random_logps(3, 8, 4)
    fake = lp.max(axis=0) - math.log(3) - np.linspace(0, 0.25, 8)
    check = M.per_token_bound_holds(fake, lp)
    assert not check.holds and check.slack == pytest.approx(-0.25)


def test_uniform_mixture_can_lose_to_the_best_specialist():
    # the catalogue's "never worse than the best specialist" is false; the per-token bound is what holds
    lp = np.log(np.array([[0.9, 0.9, 0.9], [0.01, 0.01, 0.01]]))
    mix = M.uniform_mixture(lp)
    assert mix.sum() < lp[0].sum()
    assert M.per_token_bound_holds(mix, lp).holds


# ---- the posterior mixture --------------------------------------------------------------------------

def test_posterior_two_specialists_three_tokens_by_hand():
    p = np.array([[0.5, 0.5, 0.5], [0.25, 1.0, 0.5]])
    # uniform prior: t0 (1/2, 1/2); t1 ∝ (1/4, 1/8) = (2/3, 1/3); t2 ∝ (1/8, 1/8) = (1/2, 1/2)
    w = M.posterior_weights(np.log(p))
    np.testing.assert_allclose(w, [[1 / 2, 2 / 3, 1 / 2], [1 / 2, 1 / 3, 1 / 2]], atol=1e-12)
    # mixture: 3/8, 2/3, 1/2; the product telescopes to 1/8 = 1/2 * 1/8 + 1/2 * 1/8
    mix = M.posterior_mixture(np.log(p))
    np.testing.assert_allclose(np.exp(mix), [3 / 8, 2 / 3, 1 / 2], atol=1e-12)
    # prior (0.8, 0.2): t1 ∝ (0.4, 0.05) = (8/9, 1/9); t2 ∝ (0.2, 0.05) = (0.8, 0.2)
    w = M.posterior_weights(np.log(p), prior=[0.8, 0.2])
    np.testing.assert_allclose(w, [[0.8, 8 / 9, 0.8], [0.2, 1 / 9, 0.2]], atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_posterior_matches_a_token_by_token_bayesian_update(seed):
    lp = random_logps(4, 30, seed)
    prior = np.random.default_rng(seed).uniform(0.1, 1.0, size=4)
    ws, mix = brute_posterior(lp, prior)
    np.testing.assert_allclose(M.posterior_weights(lp, prior), ws, atol=1e-10)
    np.testing.assert_allclose(M.posterior_mixture(lp, prior), mix, atol=1e-10)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(1, 60), st.integers(0, 10_000), st.floats(0.1, 8.0))
def test_posterior_regret_at_most_log_n(n, t, seed, spread):
    lp = random_logps(n, t, seed, spread=spread)
    mix = M.posterior_mixture(lp)
    regret = lp.sum(axis=1).max() - mix.sum()
    assert regret <= math.log(n) + 1e-9
    check = M.regret_bound_holds(mix, lp)
    assert check.holds and check.slack == pytest.approx(math.log(n) - regret, abs=1e-9)


def test_regret_bound_with_a_prior_and_its_violation():
    lp = random_logps(3, 25, 7)
    prior = np.array([0.7, 0.2, 0.1])
    mix = M.posterior_mixture(lp, prior)
    totals = lp.sum(axis=1)
    assert np.all(mix.sum() >= totals + np.log(prior) - 1e-9)
    assert M.regret_bound_holds(mix, lp, prior).holds
    # the best specialist's own scores, shifted down by more than log N, break the uniform-prior bound
    worse = lp[np.argmax(totals)] - (math.log(3) + 0.5) / 25
    check = M.regret_bound_holds(worse, lp)
    assert not check.holds and check.slack == pytest.approx(-0.5)


def test_posterior_converges_to_the_right_specialist():
    # specialist 0 predicts the text much better: its weight must approach 1
    good, bad = np.full(200, math.log(0.5)), np.full(200, math.log(0.1))
    w = M.posterior_weights(np.stack([bad, good]))
    assert w[1, 0] == pytest.approx(0.5) and w[1, -1] > 1 - 1e-12


def test_posterior_handles_a_zero_probability_specialist():
    lp = np.log(np.array([[0.5, 0.5, 0.5], [1.0, 0.9, 0.9]]))
    lp[1, 0] = -math.inf  # specialist 1 ruled out at t0
    w = M.posterior_weights(lp)
    np.testing.assert_allclose(w[:, 1:], [[1, 1], [0, 0]], atol=0)
    np.testing.assert_allclose(M.posterior_mixture(lp)[1:], np.log([0.5, 0.5]), atol=1e-12)
    with pytest.raises(MixtureError, match="probability 0"):
        M.posterior_weights(np.array([[-math.inf, -0.7], [-math.inf, -0.7]]))


# ---- attribution ------------------------------------------------------------------------------------

def test_attribution_by_hand_and_columns_sum_to_one():
    p = np.array([[0.6, 0.1], [0.2, 0.3]])
    r = M.attribution(np.log(p))  # uniform weights: p_i / sum_j p_j
    np.testing.assert_allclose(r, [[0.75, 0.25], [0.25, 0.75]], atol=1e-12)
    r = M.attribution(np.log(p), np.array([1.0, 3.0]))  # w_i p_i / sum: (0.6, 0.6) and (0.1, 0.9)
    np.testing.assert_allclose(r, [[0.5, 0.1], [0.5, 0.9]], atol=1e-12)
    lp = random_logps(5, 20, 9)
    np.testing.assert_allclose(M.attribution(lp, np.random.default_rng(1).uniform(size=(5, 20))).sum(0), 1.0,
                               atol=1e-12)


def test_attribution_with_posterior_weights_is_the_next_posterior():
    lp = random_logps(3, 15, 11)
    w = M.posterior_weights(lp)
    r = M.attribution(lp, w)
    np.testing.assert_allclose(r[:, :-1], w[:, 1:], atol=1e-12)


# ---- whole distributions ----------------------------------------------------------------------------

def test_distribution_mixtures_agree_with_token_mixtures():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, 10, 40, generator=g, dtype=torch.float64) * 2, dim=-1)  # (N, T, V)
    tokens = torch.randint(0, 40, (10,), generator=g)
    obs = M.observed_logps(lp, tokens)
    assert obs.shape == (3, 10)
    np.testing.assert_allclose(obs[1, 4], lp[1, 4, tokens[4]])
    uni = M.mixture_distribution(lp)  # (T, V)
    np.testing.assert_allclose(torch.exp(uni).sum(-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(uni.gather(-1, tokens[:, None])[:, 0], M.uniform_mixture(obs), atol=1e-12)
    post = M.posterior_mixture_distribution(lp, tokens)
    np.testing.assert_allclose(torch.exp(post).sum(-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(post.gather(-1, tokens[:, None])[:, 0], M.posterior_mixture(obs), atol=1e-12)
    w = M.posterior_weights(obs)  # per-position weights broadcast over the vocabulary
    np.testing.assert_allclose(M.mixture_distribution(lp, w), post, atol=1e-12)


# ---- top-k compression ------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.integers(2, 300), st.integers(1, 300), st.integers(0, 1000), st.floats(0.1, 10.0))
def test_topk_reconstruction_is_a_distribution(vocab, k, seed, spread):
    k = min(k, vocab)
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(4, vocab, generator=g, dtype=torch.float64) * spread, dim=-1)
    c = M.compress_topk(lp, k=k)
    q = c.log_probs()
    assert q.shape == (4, vocab) and torch.isfinite(q).all()
    np.testing.assert_allclose(torch.exp(q).sum(-1), 1.0, atol=1e-12)
    # the kept tokens are the k most probable, and keep their probability to float16 precision
    top = torch.topk(lp, k, dim=-1).values
    assert torch.allclose(lp.gather(-1, c.indices), top)
    assert torch.allclose(torch.exp(q.gather(-1, c.indices)), torch.exp(top), rtol=3e-3, atol=1e-5)


def test_topk_wire_form_round_trips_and_counts_its_bytes():
    g = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(torch.randn(2, 5, 1000, generator=g), dim=-1)
    c = M.compress_topk(lp, k=8)
    data = c.to_bytes()
    assert len(data) == c.nbytes == 10 * (8 * (2 + 2) + 2)
    back = M.TopK.from_bytes(data, shape=(2, 5), k=8, vocab_size=1000)
    assert torch.equal(back.indices, c.indices) and torch.equal(back.probs, c.probs)
    assert torch.equal(back.log_probs(), c.log_probs())
    with pytest.raises(MixtureError, match="bytes"):
        M.TopK.from_bytes(data[:-1], shape=(2, 5), k=8, vocab_size=1000)
    assert M.topk_nbytes(3, 70_000) == 3 * (4 + 2) + 2  # 32-bit indices past 65,536 tokens
    assert M.full_distribution_nbytes(1000) == 4000


def test_topk_tradeoff_quality_improves_with_k():
    g = torch.Generator().manual_seed(5)
    lp = torch.log_softmax(torch.randn(50, 200, generator=g, dtype=torch.float64) * 3, dim=-1)
    tokens = torch.multinomial(torch.exp(lp), 1, generator=g)[:, 0]
    rows = M.topk_tradeoff(lp, tokens, ks=[1, 8, 64, 200])
    kls = [r["kl_nats"] for r in rows]
    assert kls[0] > kls[1] > kls[2] > kls[3] >= 0 and kls[3] < 1e-5
    assert [r["bytes_per_position"] for r in rows] == [M.topk_nbytes(k, 200) for k in (1, 8, 64, 200)]
    assert abs(rows[-1]["extra_nats"]) < 1e-3



def test_topk_rest_is_the_complement_of_the_shipped_top_k():
    # log-probs from a float32 softmax do not sum to 1 in float64; the rest must still complete the
    # top k to exactly 1, so what is shipped is a distribution (a logsumexp over the other tokens
    # would carry the input's rounding error, ~1e-7, into the reconstruction)
    g = torch.Generator().manual_seed(11)
    lp = torch.log_softmax(torch.randn(64, 300, generator=g) * 4, dim=-1).double()  # (64, V)
    assert (torch.exp(lp).sum(-1) - 1).abs().max() > 1e-9  # really off, or the test shows nothing
    for k in (1, 5, 40, 299):
        idx, top, rest = M.topk_split(lp, k)  # (64, k), (64, k), (64,)
        assert top.dtype == rest.dtype == torch.float64
        assert torch.equal(idx, torch.topk(lp, k, dim=-1).indices) and torch.equal(top, lp.gather(-1, idx))
        shipped = torch.exp(top).sum(-1)  # (64,): may exceed 1 by the input's rounding; the rest is then 0
        np.testing.assert_allclose(shipped + rest, torch.clamp(shipped, min=1.0), rtol=0, atol=1e-15)
        assert bool((rest >= 0).all())
        assert torch.equal(M.compress_topk(lp, k=k).rest, rest.to(torch.float16))
    # nothing left out: exactly 0; top k holding more than 1 by rounding: clamped at 0
    assert bool((M.topk_split(lp, 300)[2] == 0).all())
    over = torch.log(torch.tensor([0.6, 0.4000001, 1e-9], dtype=torch.float64))
    assert float(M.topk_split(over, 2)[2]) == 0.0


def test_topk_log_probs_is_the_rule_of_topk():
    g = torch.Generator().manual_seed(12)
    lp = torch.log_softmax(torch.randn(3, 7, 50, generator=g, dtype=torch.float64) * 2, dim=-1)
    c = M.compress_topk(lp, k=6)
    assert torch.equal(M.topk_log_probs(c.indices, c.probs, c.rest, 50), c.log_probs())
    # a rest of 0 still leaves every other token the floor's share
    q = M.topk_log_probs(torch.tensor([2]), torch.tensor([1.0]), torch.tensor(0.0), 5)
    np.testing.assert_allclose(torch.exp(q), np.array([1, 1, 4 * 2 ** 20, 1, 1]) / (4 + 4 * 2 ** 20), rtol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_posterior_step_token_by_token_is_the_posterior(seed):
    lp = random_logps(4, 25, seed)  # (N, T)
    prior = np.random.default_rng(seed).uniform(0.1, 1.0, size=4)
    lw = np.log(M.normalised_prior(prior, 4))
    expected = M.posterior_log_weights(lp, prior)  # (N, T): before each token
    for t in range(lp.shape[1]):
        np.testing.assert_allclose(lw, expected[:, t], atol=1e-10)
        lw = M.posterior_step(lw, lp[:, t])
    np.testing.assert_allclose(M.normalised_prior(None, 4), 0.25)
    np.testing.assert_allclose(M.normalised_prior([], 2), 0.5)
    with pytest.raises(MixtureError, match="posterior is undefined"):
        M.posterior_step(np.log([0.5, 0.5]), np.array([-np.inf, -np.inf]))

# ---- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,match", [
    (np.array([0.1, -0.2]), "at least 2 axes"),
    (np.array([[0.5, -1.0]]), "not log-probabilities"),
    (np.array([[np.nan, -1.0]]), "NaN"),
    ([[-1.0, -2.0]], "torch tensor or a numpy array"),
])
def test_bad_logps_are_refused(bad, match):
    with pytest.raises(MixtureError, match=match):
        M.uniform_mixture(bad)


def test_bad_priors_and_weights_are_refused():
    lp = random_logps(3, 4, 0)
    with pytest.raises(MixtureError, match="shape"):
        M.posterior_mixture(lp, prior=[0.5, 0.5])
    with pytest.raises(MixtureError, match="non-negative"):
        M.posterior_mixture(lp, prior=[0.5, -0.5, 1.0])
    with pytest.raises(MixtureError, match="non-negative"):
        M.attribution(lp, np.array([1.0, -1.0, 1.0]))
    with pytest.raises(MixtureError, match="sum to 0"):
        M.weighted_mixture(lp, np.zeros(3))
    with pytest.raises(MixtureError, match="k must"):
        M.compress_topk(np.log(np.full(4, 0.25)), k=5)
    with pytest.raises(MixtureError, match="shape"):
        M.per_token_bound_holds(np.zeros(5), lp)
