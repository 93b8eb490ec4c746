"""The coordinator's side of cross-node mixtures: combine what the components' nodes returned.

The mathematics lives in :mod:`model.mixtures` (uniform, posterior, attribution); this module
applies it to the per-token log-probs that nodes send back, and provides what mixture generation
needs step by step (each a call into :mod:`model.mixtures`): rebuild a distribution shipped as
top-k plus remaining mass, mix the components' distributions, update the posterior weights with the
token just produced. The token itself is drawn by :func:`model.sampling.sample_token`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from model import mixtures as mx
from proto import federation_pb2 as pb


@dataclass(frozen=True)
class MixedScore:
    """A scored mixture: the mixture's log-probs (T,), attribution (N, T), weights after the text (N,)."""

    logprobs: np.ndarray
    attribution: np.ndarray
    final_weights: np.ndarray


def score_mixture(logps: np.ndarray, mode: int, prior: list[float] | None = None) -> MixedScore:
    """Mix components' per-token log-probs (N, T) with ``mode`` (a ``pb.MixtureMode``)."""
    logps = np.asarray(logps, dtype=np.float64)  # (N, T)
    n = logps.shape[0]
    if mode == pb.MIXTURE_MODE_POSTERIOR:
        weights = mx.posterior_weights(logps, mx.normalised_prior(prior, n))  # (N, T), before each token
        mixed = mx.posterior_mixture(logps, mx.normalised_prior(prior, n))  # (T,)
        resp = mx.attribution(logps, weights)  # (N, T): the posterior after each token
        final = resp[:, -1]
    else:
        mixed = mx.uniform_mixture(logps)
        resp = mx.attribution(logps, None)
        final = np.full(n, 1.0 / n)
    return MixedScore(np.asarray(mixed), np.asarray(resp), np.asarray(final))


def distribution_from_reply(reply: pb.NextTokenReply, vocab_size: int) -> np.ndarray:
    """A full next-token log-distribution (V,) from a node's reply, full or top-k.

    Top-k is rebuilt by :func:`model.mixtures.topk_log_probs` (the rule of ``TopK``): the remaining
    mass (at least ``REST_FLOOR``) is spread uniformly over the other tokens, a listed token keeps
    at least that share, and the row is renormalised, so no token gets probability 0.
    """
    if reply.logprobs:
        full = torch.tensor(reply.logprobs, dtype=torch.float64)  # (V,)
        if full.shape != (vocab_size,):
            raise ValueError(f"distribution of {full.numel()} values for a vocabulary of {vocab_size}")
        return (full - torch.logsumexp(full, dim=0)).numpy()
    ids = torch.tensor(reply.top_ids, dtype=torch.int64)  # (k,)
    if ids.numel() == 0 or ids.numel() != len(reply.top_logprobs) or int(ids.max()) >= vocab_size:
        raise ValueError("top-k reply with no ids, mismatched lengths or ids outside the vocabulary")
    probs = torch.exp(torch.tensor(reply.top_logprobs, dtype=torch.float64))  # (k,)
    rest = torch.tensor(math.exp(reply.rest_logmass) if math.isfinite(reply.rest_logmass) else 0.0,
                        dtype=torch.float64)  # ()
    return mx.topk_log_probs(ids, probs, rest, vocab_size).numpy()


def mix_step(dists: np.ndarray, log_w: np.ndarray) -> np.ndarray:
    """The mixture's next-token log-distribution (V,) from components' (N, V) and log weights (N,)."""
    return mx.mixture_distribution(np.asarray(dists, dtype=np.float64), np.exp(log_w))


def update_log_weights(log_w: np.ndarray, token_logps: np.ndarray, mode: int) -> np.ndarray:
    """Posterior log weights (N,) after a token each component gave ``token_logps`` (N,); UNIFORM keeps them."""
    if mode != pb.MIXTURE_MODE_POSTERIOR:
        return log_w
    return mx.posterior_step(np.asarray(log_w, dtype=np.float64), np.asarray(token_logps, dtype=np.float64))
