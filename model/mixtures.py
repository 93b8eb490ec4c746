"""Output-space combination of specialists: mixtures of their next-token probabilities.

Each specialist i scores the observed tokens of a text with log p_i(x_t | x_<t); a mixture
combines those numbers, never the weights (Bet 31 and 33: weights of specialists do not average).

- Uniform mixture (Bet 04): log p(x_t) = logsumexp_i log p_i(x_t) - log N. The guarantee is per
  token: never worse than the best specialist *at that token* by more than log N nats. (The
  catalogue's "provably no worse than the best specialist" is not what the inequality gives.)
- Posterior (Bayesian) mixture: the weight of i at t is prior_i * prod_{s<t} p_i(x_s), normalised,
  i.e. fixed before x_t is seen. The product telescopes, so over a whole sequence
  sum_t log p(x_t) = log sum_i prior_i prod_t p_i(x_t) >= log prior_i + sum_t log p_i(x_t)
  for every i: the total regret against the best specialist is at most -log prior_i (log N).
- Attribution (Bet 18): specialist i's responsibility for token t, w_i p_i / sum_j w_j p_j.
- Generation needs whole next-token distributions (N, ..., V); they can be shipped as the top k
  probabilities plus the remaining mass (:func:`topk_split`, :class:`TopK`; rebuilt by
  :func:`topk_log_probs`), a bandwidth/quality trade-off that :func:`topk_tradeoff` measures. A
  generator steps the posterior weights token by token with :func:`posterior_step`.

Shapes: ``logps`` is (N, ..., T): specialists first, time last, any batch axes between; every
posterior quantity restarts at t = 0 of each sequence. All arithmetic is float64. Functions accept
torch tensors or numpy arrays and return the same kind. This module imports nothing of ours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np
import torch

Array = torch.Tensor | np.ndarray
# a function of one array returns the kind it was given: torch in, torch out
ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)

# Tolerated excess of a log-probability over 0 (float rounding in a log_softmax).
_LOGP_TOL = 1e-6

# Mass a reconstructed top-k distribution keeps for the tokens outside the top k, at least: a token
# the sender left out then costs a finite number of nats instead of an infinite log-loss.
REST_FLOOR = 2.0 ** -20


class MixtureError(ValueError):
    """Inputs to a mixture are malformed: wrong shape, not log-probabilities, bad weights."""


# ---- input handling ---------------------------------------------------------------------------

def _f64(x: Array, name: str) -> torch.Tensor:
    """``x`` as a float64 tensor (:func:`_out` hands numpy back for numpy in)."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.asarray(x, dtype=np.float64))
    if isinstance(x, torch.Tensor):
        if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
            raise MixtureError(f"{name} must hold real numbers, got dtype {x.dtype}")
        return x.detach().to(torch.float64)
    raise MixtureError(f"{name} must be a torch tensor or a numpy array, got {type(x).__name__}")


def _out(t: torch.Tensor, like: ArrayT) -> ArrayT:
    """``t`` in the kind of array ``like`` is: numpy in, numpy out."""
    if isinstance(like, np.ndarray):
        return t.numpy()
    return t


def _logps(logps: Array, name: str = "logps", *, min_dim: int = 2) -> torch.Tensor:
    """Validated log-probabilities: (N, ..., T) float64, no NaN, none above 0, none +inf."""
    t = _f64(logps, name)
    if t.dim() < min_dim:
        raise MixtureError(f"{name} must have at least {min_dim} axes (specialists first), got shape {tuple(t.shape)}")
    if t.size(0) < 1 or t.size(-1) < 1:
        raise MixtureError(f"{name} must have at least one specialist and one position, got shape {tuple(t.shape)}")
    if torch.isnan(t).any():
        raise MixtureError(f"{name} contains NaN")
    if (t > _LOGP_TOL).any():
        raise MixtureError(f"{name} are not log-probabilities: largest value {float(t.max()):.3g} > 0")
    return t


def _prior(prior: Array | Sequence[float], n: int) -> torch.Tensor:
    """The prior over ``n`` specialists, validated and normalised: (N,) float64."""
    p = _f64(prior if isinstance(prior, (torch.Tensor, np.ndarray)) else np.asarray(prior, dtype=np.float64), "prior")
    if p.shape != (n,):
        raise MixtureError(f"prior must have shape ({n},) to match {n} specialists, got {tuple(p.shape)}")
    if not torch.isfinite(p).all() or (p < 0).any() or float(p.sum()) <= 0:
        raise MixtureError("prior must be finite, non-negative and not all zero")
    return p / p.sum()


def normalised_prior(prior: Array | Sequence[float] | None, n: int) -> np.ndarray:
    """The prior over ``n`` specialists normalised to sum to 1, (N,) float64; uniform when None or empty."""
    if prior is None or len(prior) == 0:
        return np.full(n, 1.0 / n)
    return _prior(prior, n).numpy()


def _log_prior(prior: Array | Sequence[float] | None, n: int) -> torch.Tensor:
    """log of the normalised prior over ``n`` specialists: (N,) float64 (-inf where the prior is 0)."""
    if prior is None:
        return torch.full((n,), -math.log(n), dtype=torch.float64)
    return torch.log(_prior(prior, n))


def _log_weights(weights: Array, logps: torch.Tensor) -> torch.Tensor:
    """log of non-negative mixture weights (N,) or (N, ...), broadcast against ``logps``."""
    w = _f64(weights, "weights")
    n = logps.size(0)
    if w.dim() == 0 or w.size(0) != n:
        raise MixtureError(f"weights must have {n} rows (one per specialist), got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise MixtureError("weights must be finite and non-negative")
    w = w.reshape(w.shape + (1,) * (logps.dim() - w.dim()))  # (N, ...) -> broadcastable
    try:
        torch.broadcast_shapes(w.shape, logps.shape)
    except RuntimeError:
        raise MixtureError(f"weights of shape {tuple(w.shape)} do not broadcast to {tuple(logps.shape)}") from None
    total = w.sum(dim=0, keepdim=True)
    if (total <= 0).any():
        raise MixtureError("weights sum to 0 somewhere: every specialist has weight 0")
    return torch.log(w / total)


# ---- mixtures of observed-token log-probabilities ---------------------------------------------

def uniform_mixture(logps: ArrayT) -> ArrayT:
    """Uniform mixture of N specialists (Bet 04): logsumexp_i logps[i] - log N, shape (..., T)."""
    t = _logps(logps)
    return _out(torch.logsumexp(t, dim=0) - math.log(t.size(0)), logps)


def weighted_mixture(logps: ArrayT, weights: Array) -> ArrayT:
    """Mixture with fixed or per-position weights: log sum_i w_i p_i(x_t), weights normalised over i.

    ``weights`` is (N,) or (N, ..., T) and non-negative; returns (..., T).
    """
    t = _logps(logps)
    return _out(torch.logsumexp(_log_weights(weights, t) + t, dim=0), logps)


def posterior_log_weights(logps: ArrayT, prior: Array | Sequence[float] | None = None) -> ArrayT:
    """log of the posterior weights of :func:`posterior_weights`: (N, ..., T)."""
    t = _logps(logps)
    log_prior = _log_prior(prior, t.size(0)).reshape((-1,) + (1,) * (t.dim() - 1))  # (N, 1.., 1)
    # exclusive prefix sum, built by shifting: (cumsum - t) would turn a -inf into NaN
    seen = torch.cat([torch.zeros_like(t[..., :1]), torch.cumsum(t, dim=-1)[..., :-1]], dim=-1)  # (N, ..., T)
    joint = log_prior + seen  # (N, ..., T)
    norm = torch.logsumexp(joint, dim=0, keepdim=True)  # (1, ..., T)
    if torch.isinf(norm).any():
        raise MixtureError("every specialist gave probability 0 to an earlier token: the posterior is undefined")
    return _out(joint - norm, logps)


def posterior_step(log_weights: ArrayT, token_logps: Array) -> ArrayT:
    """The posterior log weights (N, ...) after one more token, to which specialist i gave ``token_logps[i]``.

    log w_i + log p_i(x), renormalised over i: one step of :func:`posterior_log_weights`, for a
    generator that weights each next token by the posterior after the tokens it produced.
    """
    lw = _f64(log_weights, "log_weights")
    lp = _f64(token_logps, "token_logps")
    joint = lw + lp  # (N, ...)
    norm = torch.logsumexp(joint, dim=0, keepdim=True)
    if torch.isinf(norm).any():
        raise MixtureError("every specialist gave the token probability 0: the posterior is undefined")
    return _out(joint - norm, log_weights)


def posterior_weights(logps: ArrayT, prior: Array | Sequence[float] | None = None) -> ArrayT:
    """Bayesian weight of specialist i at position t: prior_i prod_{s<t} p_i(x_s), normalised over i.

    The weights at t use only tokens before t, so they can steer generation of x_t. (N, ..., T).
    """
    lw = posterior_log_weights(logps, prior)
    return np.exp(lw) if isinstance(lw, np.ndarray) else torch.exp(lw)


def posterior_mixture(logps: ArrayT, prior: Array | Sequence[float] | None = None) -> ArrayT:
    """Posterior-weighted mixture: log sum_i w_i(t) p_i(x_t), shape (..., T).

    Total log-loss over each sequence is at most the best specialist's plus -log prior_i.
    """
    t = _logps(logps)
    lw = _f64(posterior_log_weights(t, prior), "weights")
    return _out(torch.logsumexp(lw + t, dim=0), logps)


def attribution(logps: ArrayT, weights: Array | None = None) -> ArrayT:
    """Responsibility of each specialist for each token (Bet 18): w_i p_i / sum_j w_j p_j, (N, ..., T).

    ``weights`` (N,) or (N, ..., T), non-negative; None means uniform. With the posterior weights
    of :func:`posterior_weights`, the responsibility at t is the posterior after seeing x_t.
    Columns sum to 1.
    """
    t = _logps(logps)
    joint = t if weights is None else _log_weights(weights, t) + t  # (N, ..., T)
    norm = torch.logsumexp(joint, dim=0, keepdim=True)
    if torch.isinf(norm).any():
        raise MixtureError("every weighted specialist gave probability 0 to some token: no responsibility to share")
    return _out(torch.exp(joint - norm), logps)


# ---- the guarantees, as checks -----------------------------------------------------------------

class BoundCheck(NamedTuple):
    """Whether a mixture bound holds, and by how much (nats; negative slack = violated)."""

    holds: bool
    slack: float


def per_token_bound_holds(mix: Array, logps: Array, *, tol: float = 1e-9) -> BoundCheck:
    """mix_t >= max_i logps[i, t] - log N at every position; slack is the smallest margin.

    ``mix`` (..., T) is the uniform mixture of ``logps`` (N, ..., T), or any mixture claimed to
    satisfy the uniform mixture's bound. ``tol`` absorbs float rounding.
    """
    m = _f64(mix, "mix")
    lp = _logps(logps)
    if m.shape != lp.shape[1:]:
        raise MixtureError(f"mix has shape {tuple(m.shape)}, expected {tuple(lp.shape[1:])} to match logps")
    bound = lp.max(dim=0).values - math.log(lp.size(0))  # (..., T)
    # where every specialist says 0 the bound is -inf and holds trivially (avoids -inf - -inf)
    slack = torch.where(torch.isneginf(bound), torch.full_like(m, math.inf), m - bound)
    worst = float(slack.min())
    return BoundCheck(holds=bool(worst >= -tol), slack=worst)


def regret_bound_holds(mix: Array, logps: Array, prior: Array | Sequence[float] | None = None, *,
                       tol: float = 1e-9) -> BoundCheck:
    """sum_t mix_t >= max_i (sum_t logps[i, t] + log prior_i) for every sequence; slack is the smallest margin.

    The posterior mixture's guarantee: its total log-loss exceeds the best specialist's by at most
    -log prior_i (log N for a uniform prior). ``mix`` is (..., T), ``logps`` (N, ..., T).
    """
    m = _f64(mix, "mix")
    lp = _logps(logps)
    if m.shape != lp.shape[1:]:
        raise MixtureError(f"mix has shape {tuple(m.shape)}, expected {tuple(lp.shape[1:])} to match logps")
    log_prior = _log_prior(prior, lp.size(0)).reshape((-1,) + (1,) * (lp.dim() - 2))  # (N, 1..)
    bound = (lp.sum(dim=-1) + log_prior).max(dim=0).values  # (...,)
    total = m.sum(dim=-1)  # (...,)
    slack = torch.where(torch.isneginf(bound), torch.full_like(total, math.inf), total - bound)
    worst = float(slack.min())
    return BoundCheck(holds=bool(worst >= -tol), slack=worst)


# ---- whole next-token distributions (generation) -----------------------------------------------

def observed_logps(logprobs: ArrayT, tokens: Array) -> ArrayT:
    """The log-probability each specialist gave the observed tokens: (N, ..., T, V) -> (N, ..., T)."""
    lp = _logps(logprobs, "logprobs", min_dim=3)
    tok = torch.as_tensor(tokens).long()
    if tok.shape != lp.shape[1:-1]:
        raise MixtureError(f"tokens have shape {tuple(tok.shape)}, expected {tuple(lp.shape[1:-1])}")
    if tok.numel() and (int(tok.min()) < 0 or int(tok.max()) >= lp.size(-1)):
        raise MixtureError(f"token ids must lie in [0, {lp.size(-1)})")
    idx = tok.expand(lp.shape[:-1])[..., None]  # (N, ..., T, 1)
    return _out(lp.gather(-1, idx)[..., 0], logprobs)


def mixture_distribution(logprobs: ArrayT, weights: Array | None = None) -> ArrayT:
    """The mixture's next-token log-distribution: log sum_i w_i p_i(v), (N, ..., V) -> (..., V).

    ``weights`` (N,) or (N, ...) per position (e.g. posterior weights (N, T) for logprobs
    (N, T, V)); None means uniform. Each output row sums to 1 when the inputs' rows do.
    """
    lp = _logps(logprobs, "logprobs")
    if weights is None:
        return _out(torch.logsumexp(lp, dim=0) - math.log(lp.size(0)), logprobs)
    return _out(torch.logsumexp(_log_weights(weights, lp) + lp, dim=0), logprobs)


def posterior_mixture_distribution(logprobs: ArrayT, tokens: Array,
                                   prior: Array | Sequence[float] | None = None) -> ArrayT:
    """Next-token log-distribution of the posterior mixture at every position: (N, ..., T, V) -> (..., T, V).

    Position t is weighted by the posterior after ``tokens`` (..., T) before t, as a generator
    that has produced those tokens would weight it.
    """
    lp = _logps(logprobs, "logprobs", min_dim=3)
    lw = _f64(posterior_log_weights(observed_logps(lp, tokens), prior), "weights")  # (N, ..., T)
    return _out(torch.logsumexp(lw[..., None] + lp, dim=0), logprobs)


# ---- top-k compression of a distribution -------------------------------------------------------

def _index_bytes(vocab_size: int) -> int:
    return 2 if vocab_size <= 1 << 16 else 4


def topk_nbytes(k: int, vocab_size: int) -> int:
    """Bytes of one compressed position: k indices (uint16, or uint32 past 65,536 tokens), k float16
    probabilities, one float16 remaining mass."""
    return k * (_index_bytes(vocab_size) + 2) + 2


def full_distribution_nbytes(vocab_size: int, *, dtype_bytes: int = 4) -> int:
    """Bytes of one uncompressed next-token distribution (float32 by default)."""
    return vocab_size * dtype_bytes


@dataclass(frozen=True)
class TopK:
    """Next-token distributions compressed to their k most probable tokens plus the remaining mass.

    Wire values: ``indices`` (..., k) token ids, ``probs`` (..., k) float16 probabilities,
    ``rest`` (...,) float16, the mass of the other V - k tokens.

    Reconstruction rule (:meth:`log_probs`): with f = max(rest, REST_FLOOR) / max(V - k, 1), each
    token outside the top k gets f, token ``indices[j]`` gets max(probs[j], f), and the row is divided
    by its sum, so it sums to 1 exactly whatever float16 rounding did and no token gets probability 0.
    """

    indices: torch.Tensor  # (..., k) int64
    probs: torch.Tensor  # (..., k) float16
    rest: torch.Tensor  # (...,) float16
    vocab_size: int

    @property
    def k(self) -> int:
        """Tokens kept per position."""
        return int(self.indices.size(-1))

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: :func:`topk_nbytes` per position (== len(self.to_bytes()))."""
        return int(self.rest.numel()) * topk_nbytes(self.k, self.vocab_size)

    def log_probs(self) -> torch.Tensor:
        """The reconstructed distribution, (..., V) float64 log-probabilities (rows sum to 1)."""
        return topk_log_probs(self.indices, self.probs, self.rest, self.vocab_size)

    def to_bytes(self) -> bytes:
        """Little-endian wire form: all indices, then all probabilities, then all remaining masses."""
        idx_dtype = "<u2" if _index_bytes(self.vocab_size) == 2 else "<u4"
        return (self.indices.numpy().astype(idx_dtype).tobytes()
                + self.probs.numpy().astype("<f2").tobytes()
                + self.rest.numpy().astype("<f2").tobytes())

    @classmethod
    def from_bytes(cls, data: bytes, *, shape: Sequence[int], k: int, vocab_size: int) -> TopK:
        """Decode :meth:`to_bytes` for ``shape`` positions (the leading axes) of ``k`` tokens each."""
        n = int(np.prod(shape)) if len(shape) else 1
        if len(data) != n * topk_nbytes(k, vocab_size):
            raise MixtureError(f"top-k payload of {len(data)} bytes, expected {n * topk_nbytes(k, vocab_size)}")
        ib = _index_bytes(vocab_size)
        idx = np.frombuffer(data, dtype="<u2" if ib == 2 else "<u4", count=n * k).astype(np.int64)
        off = n * k * ib
        probs = np.frombuffer(data, dtype="<f2", count=n * k, offset=off)
        rest = np.frombuffer(data, dtype="<f2", count=n, offset=off + n * k * 2)
        if idx.size and int(idx.max()) >= vocab_size:
            raise MixtureError(f"top-k index {int(idx.max())} outside the vocabulary of {vocab_size}")
        return cls(indices=torch.from_numpy(idx.reshape(*shape, k)),
                   probs=torch.from_numpy(probs.astype(np.float16).reshape(*shape, k)),
                   rest=torch.from_numpy(rest.astype(np.float16).reshape(tuple(shape))),
                   vocab_size=vocab_size)


def topk_log_probs(indices: torch.Tensor, probs: torch.Tensor, rest: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A whole distribution (..., V) float64 log-probabilities from its top k and the remaining mass.

    ``indices`` (..., k) token ids, ``probs`` (..., k) their probabilities, ``rest`` (...,) the mass of
    the other tokens. With f = max(rest, REST_FLOOR) / max(V - k, 1), every other token gets f, token
    ``indices[j]`` gets max(probs[j], f), and each row is renormalised: it sums to 1 whatever rounding
    the wire did, and no token gets probability 0 (the rule of :class:`TopK`).
    """
    k = indices.size(-1)
    p = probs.to(torch.float64)  # (..., k)
    f = rest.to(torch.float64).clamp(min=REST_FLOOR) / max(vocab_size - k, 1)  # (...,)
    q = f[..., None].expand(*rest.shape, vocab_size).clone()  # (..., V)
    q.scatter_(-1, indices, torch.maximum(p, f[..., None]))
    return torch.log(q / q.sum(dim=-1, keepdim=True))


def topk_split(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` most probable tokens of each distribution (..., V), most probable first: their ids
    (..., k), their log-probs (..., k) float64, and the mass of all the other tokens (...,) float64.

    The remaining mass is 1 - sum of the top k's probabilities, in float64 and at least 0 (exactly 0
    when k covers the vocabulary): the complement of what is shipped, so the top k and the rest sum
    to 1 even when the log-probs carry rounding (a float32 softmax), and a receiver reconstructs a
    distribution, not a measure. (A logsumexp over the other tokens measures their mass more
    finely when it is tiny, but then disagrees with the shipped top k by the input's rounding; a
    rest under ``REST_FLOOR`` is floored on reconstruction either way.)
    """
    top_lp, idx = torch.topk(logprobs.to(torch.float64), k, dim=-1)  # (..., k)
    rest = (1.0 - torch.exp(top_lp).sum(dim=-1)).clamp(min=0.0)  # (...,)
    if k == logprobs.size(-1):
        rest = torch.zeros_like(rest)  # no token is left out
    return idx, top_lp, rest


def compress_topk(logprobs: Array, *, k: int) -> TopK:
    """Keep the ``k`` most probable tokens of each distribution (..., V) and the mass left over."""
    lp = _logps(logprobs, "logprobs", min_dim=1)
    vocab = lp.size(-1)
    if not 1 <= k <= vocab:
        raise MixtureError(f"k must lie in [1, {vocab}], got {k}")
    idx, top_lp, rest = topk_split(lp, k)  # (..., k), (..., k), (...,): rest before rounding
    return TopK(indices=idx, probs=torch.exp(top_lp).to(torch.float16), rest=rest.to(torch.float16),
                vocab_size=vocab)


def topk_tradeoff(logprobs: Array, tokens: Array | None = None, *, ks: Sequence[int]) -> list[dict]:
    """Bandwidth against quality of shipping distributions (..., V) as top-k, for each k in ``ks``.

    Each row: ``k``, ``bytes_per_position`` (and ``full_bytes_per_position`` for float32),
    ``kl_nats`` (mean KL(p || reconstruction)) and, with ``tokens`` (...,), ``extra_nats`` (mean
    extra log-loss on the observed tokens).
    """
    lp = _logps(logprobs, "logprobs", min_dim=1)
    vocab = lp.size(-1)
    p = torch.exp(lp)
    rows = []
    for k in ks:
        q = compress_topk(lp, k=k).log_probs()  # (..., V)
        terms = torch.where(p > 0, p * (lp - q), torch.zeros_like(p))
        row = {"k": int(k), "bytes_per_position": topk_nbytes(k, vocab),
               "full_bytes_per_position": full_distribution_nbytes(vocab),
               "kl_nats": float(terms.sum(dim=-1).mean())}
        if tokens is not None:
            tok = torch.as_tensor(tokens).long()[..., None]
            row["extra_nats"] = float((lp.gather(-1, tok) - q.gather(-1, tok)).mean())
        rows.append(row)
    return rows
