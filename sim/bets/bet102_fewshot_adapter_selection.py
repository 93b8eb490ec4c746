"""Open question of Bet 55: pick an existing adapter for an unknown user from their first 50 tokens."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from model import mixtures

from .base import OPEN, Bet, CatalogueResult, Criteria, need, number, versus_base_verdict
from .common import ppl, stack_logps
from .context import BetContext

FEW_SHOT = 50


def _row(lp: torch.Tensor, base_lp: torch.Tensor, users: list[str], own: str | None) -> dict[str, Any]:
    """Selection on the first FEW_SHOT predicted tokens, scored on the rest. lp (K, T), base_lp (T,)."""
    head, rest = lp[:, :FEW_SHOT], lp[:, FEW_SHOT:]  # (K, 50), (K, T-50)
    pick = int(head.sum(dim=1).argmax())
    post = mixtures.posterior_mixture(lp)[FEW_SHOT:]  # the user's whole stream is one sequence
    row = {"selected": users[pick], "selected_ppl": ppl(rest[pick]), "base_ppl": ppl(base_lp[FEW_SHOT:]),
           "ensemble_ppl": ppl(mixtures.uniform_mixture(rest)), "posterior_ensemble_ppl": ppl(post),
           "tokens_scored": int(rest.size(1))}
    if own is not None:
        row["own_ppl"] = ppl(rest[users.index(own)])
        row["selected_own"] = users[pick] == own
    return row


def measure(ctx: BetContext) -> dict[str, Any]:
    """Every unknown user (and, as a check, every known user): the adapter whose likelihood of the first
    50 tokens is highest, scored on the remaining held-out tokens against the base and the ensembles."""
    users = list(ctx.known_users())
    base_sd = ctx.base_state()
    models = [ctx.model(base_sd, ctx.adapter_state(u)) for u in users]
    base = ctx.model(base_sd)
    unknown: dict[str, dict] = {}
    known: dict[str, dict] = {}
    pooled: dict[str, list[torch.Tensor]] = {"selected": [], "base": []}
    for u in (*ctx.unknown_users(), *users):
        toks = ctx.tokens(u)
        lp, base_lp = stack_logps(ctx, models, toks), ctx.token_logps(base, toks).double()
        if lp.size(1) <= FEW_SHOT:
            continue
        is_known = u in users
        row = _row(lp, base_lp, users, u if is_known else None)
        (known if is_known else unknown)[u] = row
        if not is_known:
            pooled["selected"].append(lp[users.index(row["selected"]), FEW_SHOT:])
            pooled["base"].append(base_lp[FEW_SHOT:])
    if not unknown:
        raise ValueError(f"no unknown user has more than {FEW_SHOT} held-out tokens")
    return {
        "few_shot_tokens": FEW_SHOT, "adapters": users, "unknown": unknown, "known": known,
        "unknown_selected_ppl": ppl(torch.cat(pooled["selected"])), "unknown_base_ppl": ppl(torch.cat(pooled["base"])),
        "known_selection_accuracy": (sum(r["selected_own"] for r in known.values()) / len(known)) if known else None,
    }


def judge(m: Mapping[str, Any]) -> str:
    """Bet 55's criteria with the selected adapter in place of the ensemble, pooled over unknown users."""
    return versus_base_verdict(number(m, "unknown_selected_ppl"), number(m, "unknown_base_ppl"))


def key_figures(m: Mapping[str, Any]) -> str:
    """Selected adapter against the base; selection accuracy on known users."""
    acc = need(m, "known_selection_accuracy")
    acc_s = "n/a" if acc is None else f"{acc:.0%}"
    return (f"unknown users: selected adapter {number(m, 'unknown_selected_ppl'):.1f} vs base "
            f"{number(m, 'unknown_base_ppl'):.1f}; known users' own adapter picked {acc_s}")


BET = Bet(
    number=102,
    slug="fewshot_adapter_selection",
    title="Few-shot adapter selection for an unknown user",
    question="Does the adapter that best predicts an unknown user's first 50 tokens beat the base on the rest?",
    setup=("Every known user's adapter; for each unknown user (held-out persona) the adapter with the highest "
           "likelihood of the first 50 held-out tokens, scored on the remaining tokens against the base, the "
           "uniform ensemble and the posterior ensemble; known users as the check (is their own adapter picked?)."),
    criteria=Criteria(
        strict="selected-adapter ppl < base ppl by >= 5% on the unknown users' remaining tokens",
        lenient="selected <= base",
        catastrophic="selected > base",
        source="the simulator: Bet 55's criteria (seed 003) with the selected adapter in place of the ensemble",
    ),
    catalogue=CatalogueResult(
        verdict=OPEN,
        quote=("Few-shot adapter selection. A short interaction with the unknown user (e.g. their first 50 tokens) "
               "could be used to select the closest existing adapter. Latency-sensitive but plausible."),
    ),
    judge=judge,
    measure=measure,
    key_figures=key_figures,
    in_catalogue=False,
)
