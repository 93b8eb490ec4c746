"""Evaluation: per-token log-probabilities, perplexity, bits per character, sampling, routing statistics."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .data import eval_windows
from .fractal_moe import FractalMoE
from .sampling import sample_token

LN2 = math.log(2.0)


def target_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under ``logits`` (..., T, V): the float64 log-softmax at each target (..., T) long."""
    lp = torch.log_softmax(logits.double(), dim=-1)  # (..., T, V)
    return lp.gather(-1, targets[..., None])[..., 0]


def window_logps(logits_of: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, context: int, *,
                 batch: int = 16) -> torch.Tensor:
    """log p(x_t | x_<t) in nats for every token of ``ids`` (n,) but the first: (n-1,) float64.

    The text is cut into the non-overlapping windows of :func:`model.data.eval_windows`, so each
    prediction sees at most ``context`` tokens of history (the same for every model compared), and
    ``logits_of`` ((b, context) long -> (b, context, V) logits) runs on ``batch`` windows at a time,
    in order. Every scorer of a text longer than the context uses this: ``token_logps`` and a node's
    ScoreTokens.
    """
    x, y = eval_windows(ids, context)  # (W, T), (W, T)
    out = []
    for i in range(0, x.size(0), batch):
        tgt = y[i:i + batch]  # (b, T)
        lp = target_logps(logits_of(x[i:i + batch]), tgt.clamp(min=0))  # (b, T)
        out.append(lp[tgt != -100])
    return torch.cat(out)


@torch.no_grad()
def token_logps(model: FractalMoE, ids: torch.Tensor, *, batch: int = 16) -> torch.Tensor:
    """log p(x_t | x_<t) in nats for every token of ``ids`` but the first: (N-1,) float64.

    Scored in windows of the model's context (:func:`window_logps`).
    """
    model.eval()
    device = next(model.parameters()).device
    return window_logps(lambda x: model(x.to(device)).logits.cpu(), ids, model.cfg.context, batch=batch)


def perplexity(logps: torch.Tensor) -> float:
    """exp of the mean negative log-likelihood (nats) of per-token log-probabilities."""
    return float(torch.exp(-logps.mean()))


def geomean(values: list[float]) -> float | None:
    """Geometric mean of positive values (perplexities, or their ratios); None for no values."""
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def bits_per_char(logps: torch.Tensor, n_chars: int) -> float:
    """Total negative log-likelihood in bits divided by the characters it covers."""
    return float(-logps.sum() / LN2 / max(1, n_chars))


@torch.no_grad()
def sample(
    model: FractalMoE, prompt: torch.Tensor, n: int, *, greedy: bool = True, temperature: float = 1.0, seed: int = 0
) -> torch.Tensor:
    """Continue ``prompt`` ((T,) long) by ``n`` tokens; returns only the new ones, (n,) long.

    Each token is chosen by :func:`model.sampling.sample_token` from the last ``context`` tokens'
    logits: greedy, or at ``temperature`` over the whole vocabulary.
    """
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = prompt.clone()
    new = []
    for _ in range(n):
        ctx = ids[-model.cfg.context:][None]  # (1, T)
        logits = model(ctx).logits[0, -1]  # (V,)
        nxt = sample_token(logits, temperature=0.0 if greedy else temperature, rng=gen)
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([nxt])])
    return torch.tensor(new, dtype=torch.long)


def unique_tokens(ids: torch.Tensor) -> int:
    """The number of distinct tokens: the Bet 38 mode-collapse signal."""
    return int(torch.unique(ids).numel())


@torch.no_grad()
def routing_counts(model: FractalMoE, ids: torch.Tensor) -> torch.Tensor:
    """How often each expert of each block is chosen over ``ids``: (L, E) long."""
    x, y = eval_windows(ids, model.cfg.context)
    counts = torch.zeros(model.cfg.n_layers, model.cfg.n_experts, dtype=torch.long)
    device = next(model.parameters()).device
    for i in range(0, x.size(0), 16):
        model(x[i:i + 16].to(device))
        keep = (y[i:i + 16] != -100)  # (b, T)
        for b, m in enumerate(model.moes):
            counts[b] += torch.bincount(m.route().cpu()[keep], minlength=model.cfg.n_experts)
    return counts


def routing_summary(counts: torch.Tensor) -> dict:
    """Per-block expert usage: shares, how many experts are used, and normalised routing entropy."""
    shares = counts.double() / counts.sum(dim=1, keepdim=True).clamp(min=1)  # (L, E)
    ent = -(shares * torch.log(shares.clamp(min=1e-12))).sum(dim=1) / math.log(counts.size(1))  # (L,)
    return {
        "shares": [[round(float(v), 4) for v in row] for row in shares],
        "experts_used": [int((row > 0).sum()) for row in counts],
        "normalised_entropy": [round(float(v), 4) for v in ent],
    }
