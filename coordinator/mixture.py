"""The coordinator's side of cross-node mixtures: combine what the components' nodes returned.

The mathematics lives in :mod:`model.mixtures` (uniform, posterior, attribution); this module
applies it to the per-token log-probs that nodes send back, and provides what mixture generation
needs step by step: reconstruct a distribution shipped as top-k plus remaining mass, update the
posterior weights with the token just produced, sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from model import mixtures as mx
from proto import federation_pb2 as pb


@dataclass(frozen=True)
class MixedScore:
    """A scored mixture: the mixture's log-probs (T,), attribution (N, T), weights after the text (N,)."""

    logprobs: np.ndarray
    attribution: np.ndarray
    final_weights: np.ndarray


def normalise_prior(prior: list[float] | None, n: int) -> np.ndarray:
    """Prior weights (N,) summing to 1; uniform when None."""
    p = np.full(n, 1.0 / n) if not prior else np.asarray(prior, dtype=np.float64)
    return p / p.sum()


def score_mixture(logps: np.ndarray, mode: int, prior: list[float] | None = None) -> MixedScore:
    """Mix components' per-token log-probs (N, T) with ``mode`` (a ``pb.MixtureMode``)."""
    logps = np.asarray(logps, dtype=np.float64)  # (N, T)
    n = logps.shape[0]
    if mode == pb.MIXTURE_MODE_POSTERIOR:
        weights = mx.posterior_weights(logps, normalise_prior(prior, n))  # (N, T), before each token
        mixed = mx.posterior_mixture(logps, normalise_prior(prior, n))  # (T,)
        resp = mx.attribution(logps, weights)  # (N, T): the posterior after each token
        final = resp[:, -1]
    else:
        mixed = mx.uniform_mixture(logps)
        resp = mx.attribution(logps, None)
        final = np.full(n, 1.0 / n)
    return MixedScore(np.asarray(mixed), np.asarray(resp), np.asarray(final))


def distribution_from_reply(reply: pb.NextTokenReply, vocab_size: int) -> np.ndarray:
    """A full next-token log-distribution (V,) from a node's reply, full or top-k.

    Top-k follows :class:`model.mixtures.TopK`'s rule: the remaining mass (at least
    ``REST_FLOOR``) is spread uniformly over the other tokens, a listed token keeps at least that
    share, and the row is renormalised, so no token gets probability 0.
    """
    if reply.logprobs:
        full = np.asarray(reply.logprobs, dtype=np.float64)
        if full.shape != (vocab_size,):
            raise ValueError(f"distribution of {full.size} values for a vocabulary of {vocab_size}")
        return full - _logsumexp(full)
    ids = np.asarray(reply.top_ids, dtype=np.int64)
    if ids.size == 0 or ids.size != len(reply.top_logprobs) or ids.max() >= vocab_size:
        raise ValueError("top-k reply with no ids, mismatched lengths or ids outside the vocabulary")
    rest = math.exp(reply.rest_logmass) if np.isfinite(reply.rest_logmass) else 0.0
    f = max(rest, mx.REST_FLOOR) / max(vocab_size - ids.size, 1)
    q = np.full(vocab_size, f)
    q[ids] = np.maximum(np.exp(np.asarray(reply.top_logprobs, dtype=np.float64)), f)
    return np.log(q / q.sum())


def _logsumexp(a: np.ndarray) -> float:
    m = float(np.max(a))
    return m + math.log(float(np.sum(np.exp(a - m))))


def mix_step(dists: np.ndarray, log_w: np.ndarray) -> np.ndarray:
    """The mixture's next-token log-distribution (V,) from components' (N, V) and log weights (N,)."""
    joint = np.asarray(log_w)[:, None] + np.asarray(dists)  # (N, V)
    m = joint.max(axis=0)  # (V,)
    return m + np.log(np.exp(joint - m).sum(axis=0))


def update_log_weights(log_w: np.ndarray, token_logps: np.ndarray, mode: int) -> np.ndarray:
    """Posterior log weights (N,) after a token each component gave ``token_logps`` (N,); UNIFORM keeps them."""
    if mode != pb.MIXTURE_MODE_POSTERIOR:
        return log_w
    joint = log_w + token_logps
    return joint - _logsumexp(joint)


def sample_token(logp: np.ndarray, *, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """A token from log-distribution (V,): argmax at temperature 0, else softmax(logp / T) over the top k."""
    logp = np.asarray(logp, dtype=np.float64)
    if temperature == 0:
        return int(np.argmax(logp))
    z = logp / temperature
    if 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - np.max(z))
    return int(rng.choice(p.size, p=p / p.sum()))
