"""Bet 61: own adapter against everyone else's (the confusion matrix, seed 003)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import CATASTROPHIC, LENIENT, NEITHER, STRICT, Bet, BetError, CatalogueResult, Criteria, need, number
from .bet55_logit_ensemble import ensemble_users
from .common import ppl
from .context import BetContext

MARGIN = 0.05


def measure(ctx: BetContext) -> dict[str, Any]:
    """ppl of every user's text (one user per persona) under every user's adapter and under the base."""
    users = ensemble_users(ctx, n=len(ctx.known_users()))
    base_sd = ctx.base_state()
    models = {u: ctx.model(base_sd, ctx.adapter_state(u)) for u in users}
    base = ctx.model(base_sd)
    matrix = {a: {t: ppl(ctx.token_logps(models[a], ctx.tokens(t))) for t in users} for a in users}
    base_ppl = {t: ppl(ctx.token_logps(base, ctx.tokens(t))) for t in users}
    margins = {t: 1 - matrix[t][t] / min(matrix[a][t] for a in users if a != t) for t in users}
    return {"users": users, "ppl": matrix, "base_ppl": base_ppl, "own_margin": margins}


def judge(m: Mapping[str, Any]) -> str:
    """margin(u) = 1 - own ppl / best other adapter's ppl on u's text. STRICT: every margin >= 5%;
    LENIENT: every margin > 0; CATASTROPHIC: no margin > 0 (the own adapter never wins); else NEITHER."""
    users = need(m, "users")
    if len(users) < 2:
        raise BetError("Bet 61 needs at least two users")
    margins = []
    for t in users:
        others = [number(m, "ppl", a, t) for a in users if a != t]
        margins.append(1 - number(m, "ppl", t, t) / min(others))
    if all(x <= 0 for x in margins):
        return CATASTROPHIC
    if all(x >= MARGIN for x in margins):
        return STRICT
    if all(x > 0 for x in margins):
        return LENIENT
    return NEITHER


def key_figures(m: Mapping[str, Any]) -> str:
    """The own adapter's margins."""
    margins = need(m, "own_margin")
    return "own adapter's margin over the best other: " + ", ".join(f"{u} {v:+.1%}" for u, v in margins.items())


BET = Bet(
    number=61,
    slug="adapter_confusion",
    title="Own adapter against the others (confusion matrix)",
    question="Does each user's own adapter beat every other user's adapter on that user's text?",
    setup="One known user per persona; every adapter on every user's held-out text; the base beside it.",
    criteria=Criteria(
        strict="on every user's text the own adapter's ppl is >= 5% below the best other adapter's",
        lenient="on every user's text the own adapter has the lowest ppl",
        catastrophic="the own adapter is never the best on its user's text",
        source="the simulator (the catalogue reports 'own adapter wins by 5-29%' without criteria)",
    ),
    catalogue=CatalogueResult(verdict=STRICT, quote="own adapter wins by 5-29%",
                              figures={"margin_min": 0.05, "margin_max": 0.29}),
    judge=judge,
    measure=measure,
    key_figures=key_figures,
    notes=("The catalogue does not say what its 5-29% is relative to; we take 1 - own ppl / best other "
           "adapter's ppl.",),
)
