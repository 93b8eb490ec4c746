"""Measurement helpers shared by the bets: perplexities, per-document mixtures, model scoring."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from model import mixtures

from .context import BetContext, StateDict


def ppl(logps: torch.Tensor) -> float:
    """exp of the mean negative log-likelihood of per-token log-probabilities."""
    return math.exp(-float(logps.double().mean()))


def nll(logps: torch.Tensor) -> float:
    """Mean negative log-likelihood in nats."""
    return -float(logps.double().mean())


def stack_logps(ctx: BetContext, models: Sequence, tokens: torch.Tensor) -> torch.Tensor:
    """Each model's log-probabilities of ``tokens``: (N, T-1) float64."""
    return torch.stack([ctx.token_logps(m, tokens).double() for m in models])


def documents(logps: torch.Tensor, length: int) -> list[torch.Tensor]:
    """(N, T) cut into documents of ``length`` positions, batched: [(N, D, length), (N, 1, rest)].

    A mixture's posterior restarts with every document (every evaluation window of the model).
    """
    n, t = logps.shape
    full = t // length
    out = []
    if full:
        out.append(logps[:, :full * length].reshape(n, full, length))
    if t % length:
        out.append(logps[:, full * length:].reshape(n, 1, t % length))
    return out


def posterior_by_document(logps: torch.Tensor, length: int,
                          prior: Sequence[float] | None = None) -> tuple[torch.Tensor, mixtures.BoundCheck]:
    """The posterior mixture of (N, T), restarted every ``length`` tokens: (T,), and the regret bound
    checked on every document (the smallest slack)."""
    parts, worst = [], math.inf
    for doc in documents(logps, length):
        mix = mixtures.posterior_mixture(doc, prior)  # (D, L)
        check = mixtures.regret_bound_holds(mix, doc, prior)
        worst = min(worst, check.slack)
        parts.append(mix.reshape(-1))
    return torch.cat(parts), mixtures.BoundCheck(holds=worst >= -1e-9, slack=worst)


def score_states(ctx: BetContext, states: Mapping[str, StateDict], sources: Sequence[str],
                 adapter: StateDict | None = None) -> dict[str, dict[str, float]]:
    """{state name: {source: ppl}} of each state dict on each source's held-out text."""
    out: dict[str, dict[str, float]] = {}
    for name, sd in states.items():
        model = ctx.model(sd, adapter)
        out[name] = {s: ppl(ctx.token_logps(model, ctx.tokens(s))) for s in sources}
    return out


def states_bitwise_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Same keys and the same bytes in every tensor (tells -0.0 from 0.0, unlike ==)."""
    if list(a) != list(b):
        return False
    return all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
               and torch.equal(a[k].contiguous().reshape(-1).view(torch.uint8),
                               b[k].contiguous().reshape(-1).view(torch.uint8)) for k in a)


def general_tokens(ctx: BetContext) -> torch.Tensor:
    """Held-out "general text": every training persona's held-out tokens, one after the other."""
    return torch.cat([ctx.tokens(p) for p in ctx.personas()])


def pick_personas(ctx: BetContext, wanted: Sequence[str], n: int) -> list[str]:
    """The catalogue's personas where this federation has them, topped up with others in order."""
    have = list(ctx.personas())
    chosen = [p for p in wanted if p in have][:n]
    chosen += [p for p in have if p not in chosen][: n - len(chosen)]
    return chosen
