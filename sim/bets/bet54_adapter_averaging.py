"""Bet 54: one adapter for everyone, the mean of the users' adapters (seed 003)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model import merges

from .base import CATASTROPHIC, FAILS, LENIENT, NEITHER, STRICT, Bet, BetError, CatalogueResult, Criteria, need, number
from .common import ppl
from .context import BetContext

NEAR = 1.05


def measure(ctx: BetContext) -> dict[str, Any]:
    """Every known user's held-out text under the base, their own adapter, and the mean of all adapters."""
    users = ctx.known_users()
    base = ctx.base_state()
    adapters = {u: ctx.adapter_state(u) for u in users}
    averaged = merges.average_adapters(list(adapters.values()))
    base_m, avg_m = ctx.model(base), ctx.model(base, averaged)
    rows = {}
    for u in users:
        toks = ctx.tokens(u)
        rows[u] = {"base_ppl": ppl(ctx.token_logps(base_m, toks)),
                   "own_ppl": ppl(ctx.token_logps(ctx.model(base, adapters[u]), toks)),
                   "averaged_ppl": ppl(ctx.token_logps(avg_m, toks))}
    return {"users": list(users), "per_user": rows,
            "averaged_beats_base": sum(r["averaged_ppl"] < r["base_ppl"] for r in rows.values())}


def judge(m: Mapping[str, Any]) -> str:
    """STRICT: the averaged adapter is within 5% of every user's own adapter. LENIENT: it is no worse than
    the base for every user. CATASTROPHIC: it is worse than the base for every user. Else NEITHER."""
    users = need(m, "users")
    if not users:
        raise BetError("Bet 54 needs at least one user")
    avg = [number(m, "per_user", u, "averaged_ppl") for u in users]
    own = [number(m, "per_user", u, "own_ppl") for u in users]
    base = [number(m, "per_user", u, "base_ppl") for u in users]
    if all(a > b for a, b in zip(avg, base)):
        return CATASTROPHIC
    if all(a <= NEAR * o for a, o in zip(avg, own)):
        return STRICT
    if all(a <= b for a, b in zip(avg, base)):
        return LENIENT
    return NEITHER


def key_figures(m: Mapping[str, Any]) -> str:
    """How the averaged adapter fares."""
    users = need(m, "users")
    gap = max(number(m, "per_user", u, "averaged_ppl") / number(m, "per_user", u, "own_ppl") for u in users)
    return (f"averaged adapter beats the base for {int(number(m, 'averaged_beats_base'))}/{len(users)} users; "
            f"at worst {gap:.3f}x a user's own adapter")


BET = Bet(
    number=54,
    slug="adapter_averaging",
    title="Average the users' adapters into one",
    question="Can the mean of every user's norm-only adapter serve all of them?",
    setup=("Every known user's adapter; their elementwise mean; each user's held-out text under base, own "
           "adapter and the mean."),
    criteria=Criteria(
        strict="the averaged adapter's ppl is within 5% of each user's own adapter, for every user",
        lenient="the averaged adapter's ppl is <= the base's for every user",
        catastrophic="the averaged adapter's ppl is worse than the base's for every user",
        source="the simulator (the catalogue reports 'mostly fails' without criteria), modelled on Bet 55's",
    ),
    catalogue=CatalogueResult(verdict=FAILS, quote=("mostly fails: averaging multiple users' adapters into a "
                                                    "'shared' adapter mostly fails")),
    judge=judge,
    measure=measure,
    key_figures=key_figures,
)
