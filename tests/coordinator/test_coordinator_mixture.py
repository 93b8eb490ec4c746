"""Mixing nodes' log-probs: checked against numpy written out here, not against model.mixtures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.mixture import distribution_from_reply, mix_step, score_mixture, update_log_weights
from model.sampling import sample_token
from proto import federation_pb2 as pb


def _lse(a, axis=0):
    m = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.exp(a - m).sum(axis=axis))


def _random_logps(rng, n, t):
    probs = rng.uniform(0.01, 1.0, size=(n, t))
    return np.log(probs)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 5), t=st.integers(1, 20), seed=st.integers(0, 10_000))
def test_uniform_is_logsumexp_minus_log_n_and_attribution_sums_to_one(n, t, seed):
    logps = _random_logps(np.random.default_rng(seed), n, t)
    mixed = score_mixture(logps, pb.MIXTURE_MODE_UNIFORM)
    np.testing.assert_allclose(mixed.logprobs, _lse(logps) - math.log(n), atol=1e-12)
    np.testing.assert_allclose(mixed.attribution.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(mixed.attribution, np.exp(logps) / np.exp(logps).sum(axis=0), atol=1e-12)
    np.testing.assert_allclose(mixed.final_weights, 1.0 / n)
    # the per-token guarantee: never worse than the best component by more than log N
    assert np.all(mixed.logprobs >= logps.max(axis=0) - math.log(n) - 1e-12)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 4), t=st.integers(1, 15), seed=st.integers(0, 10_000))
def test_posterior_matches_a_token_by_token_bayes_update(n, t, seed):
    rng = np.random.default_rng(seed)
    logps = _random_logps(rng, n, t)
    prior = rng.uniform(0.1, 2.0, size=n)
    mixed = score_mixture(logps, pb.MIXTURE_MODE_POSTERIOR, prior.tolist())
    w = prior / prior.sum()
    for s in range(t):
        p = np.exp(logps[:, s])
        assert mixed.logprobs[s] == pytest.approx(math.log(float(w @ p)), abs=1e-10)
        np.testing.assert_allclose(mixed.attribution[:, s], w * p / (w @ p), atol=1e-10)
        w = w * p / (w @ p)
    np.testing.assert_allclose(mixed.final_weights, w, atol=1e-10)
    # regret bound: total log-loss within -log prior_i of every component
    lp = np.log(prior / prior.sum())
    assert mixed.logprobs.sum() >= (logps.sum(axis=1) + lp).max() - 1e-9


def test_full_and_top_k_replies_become_distributions():
    row = np.log(np.array([0.5, 0.3, 0.1, 0.05, 0.05]))
    full = distribution_from_reply(pb.NextTokenReply(logprobs=row.tolist()), 5)
    np.testing.assert_allclose(np.exp(full), [0.5, 0.3, 0.1, 0.05, 0.05], atol=1e-6)
    top = distribution_from_reply(pb.NextTokenReply(top_ids=[0, 1], top_logprobs=row[:2].tolist(),
                                                    rest_logmass=math.log(0.2)), 5)
    # the remaining 0.2 spread evenly over the other three tokens
    np.testing.assert_allclose(np.exp(top), [0.5, 0.3, 0.2 / 3, 0.2 / 3, 0.2 / 3], atol=1e-6)
    with pytest.raises(ValueError):
        distribution_from_reply(pb.NextTokenReply(logprobs=[0.0] * 3), 5)
    with pytest.raises(ValueError):
        distribution_from_reply(pb.NextTokenReply(top_ids=[7], top_logprobs=[-0.1], rest_logmass=-3), 5)


def test_generation_step_mixes_updates_and_samples_deterministically():
    dists = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    log_w = np.log([0.5, 0.5])
    mixed = mix_step(dists, log_w)
    np.testing.assert_allclose(np.exp(mixed), [0.4, 0.15, 0.45])
    after = update_log_weights(log_w, dists[:, 2], pb.MIXTURE_MODE_POSTERIOR)
    np.testing.assert_allclose(np.exp(after), [0.1 / 0.9, 0.8 / 0.9])
    assert update_log_weights(log_w, dists[:, 2], pb.MIXTURE_MODE_UNIFORM) is log_w
    assert sample_token(mixed, temperature=0.0, top_k=0, rng=np.random.default_rng(0)) == 2
    draws = [sample_token(mixed, temperature=1.0, top_k=2, rng=np.random.default_rng(s)) for s in range(200)]
    assert 1 not in draws  # outside the top 2
    assert draws == [sample_token(mixed, temperature=1.0, top_k=2, rng=np.random.default_rng(s)) for s in range(200)]
