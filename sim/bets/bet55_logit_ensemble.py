"""Bet 55: logit ensemble of per-user adapters for an unknown user (seed 003)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model import mixtures

from .base import CATASTROPHIC, Bet, CatalogueResult, Criteria, need, number, versus_base_verdict
from .common import posterior_by_document, ppl, stack_logps
from .context import BetContext

CATALOGUE_PERSONAS = ("programmer", "novelist", "scientist")


def ensemble_users(ctx: BetContext, n: int = 3) -> list[str]:
    """One known user per persona, the catalogue's three personas first."""
    by_persona: dict[str, str] = {}
    for u in ctx.known_users():
        by_persona.setdefault(ctx.persona_of(u), u)
    order = [p for p in CATALOGUE_PERSONAS if p in by_persona] + [p for p in by_persona if p not in CATALOGUE_PERSONAS]
    return [by_persona[p] for p in order[:n]]


def _scores(ctx: BetContext, base, adapters: list, users: list[str], text: str) -> dict[str, Any]:
    toks = ctx.tokens(text)
    lp = stack_logps(ctx, adapters, toks)  # (3, T)
    uni = mixtures.uniform_mixture(lp)
    post, _ = posterior_by_document(lp, ctx.context_length())
    per = {u: ppl(lp[i]) for i, u in enumerate(users)}
    return {"base_ppl": ppl(ctx.token_logps(base, toks)), "ensemble_ppl": ppl(uni),
            "posterior_ensemble_ppl": ppl(post), "adapter_ppl": per, "best_adapter_ppl": min(per.values()),
            "per_token_bound": mixtures.per_token_bound_holds(uni, lp)._asdict()}


def measure(ctx: BetContext) -> dict[str, Any]:
    """Base, each of three users' adapters and their uniform ensemble on an unknown user's held-out text,
    and on each of the three known users' texts as the sanity check (the own adapter should win)."""
    users = ensemble_users(ctx)
    unknown = ctx.unknown_users()[0]
    base_sd = ctx.base_state()
    base = ctx.model(base_sd)
    adapters = [ctx.model(base_sd, ctx.adapter_state(u)) for u in users]
    unk = _scores(ctx, base, adapters, users, unknown)
    known = {}
    for u in users:
        s = _scores(ctx, base, adapters, users, u)
        known[u] = {"own_ppl": s["adapter_ppl"][u], "ensemble_ppl": s["ensemble_ppl"], "base_ppl": s["base_ppl"],
                    "own_wins": s["adapter_ppl"][u] < s["ensemble_ppl"]}
    return {
        "adapters": users, "unknown_user": unknown, **unk,
        # the catalogue's "Jensen" claim, literally: is the ensemble bounded by the best adapter?
        "ensemble_le_best_adapter": unk["ensemble_ppl"] <= unk["best_adapter_ppl"],
        "known": known,
    }


def judge(m: Mapping[str, Any]) -> str:
    """Seed 003's criteria: STRICT ensemble < base by >= 5%; LENIENT ensemble <= base; CATASTROPHIC ensemble > base."""
    return versus_base_verdict(number(m, "ensemble_ppl"), number(m, "base_ppl"))


def key_figures(m: Mapping[str, Any]) -> str:
    """Unknown user: base, ensemble, best adapter."""
    wins = sum(bool(r["own_wins"]) for r in need(m, "known").values())
    return (f"unknown user {m['unknown_user']}: base {number(m, 'base_ppl'):.1f}, ensemble "
            f"{number(m, 'ensemble_ppl'):.1f}, best adapter {number(m, 'best_adapter_ppl'):.1f}, posterior "
            f"ensemble {number(m, 'posterior_ensemble_ppl'):.1f}; own adapter beats the ensemble for "
            f"{wins}/{len(need(m, 'known'))} known users")


BET = Bet(
    number=55,
    slug="logit_ensemble",
    title="Logit ensemble of user adapters for an unknown user",
    question="Does logsumexp over three users' adapters - log 3 beat the base model on an unknown user's text?",
    setup=("Three known users' norm-only adapters (programmer, novelist, scientist); an unknown user of the "
           "held-out persona (no model trained on it); per-token uniform ensemble against the base; the "
           "three known users' own texts as the sanity check; the posterior ensemble reported beside it."),
    criteria=Criteria(
        strict="ensembled-adapter ppl < base-only ppl by >= 5% on the unknown user",
        lenient="ensembled <= base-only",
        catastrophic="ensembled > base-only",
        source="seed 003 (Bet 55), verbatim",
    ),
    catalogue=CatalogueResult(verdict=CATASTROPHIC,
                              quote="ensemble 1917 vs base 1824 on the unknown user (best single adapter 1856)",
                              figures={"base_ppl": 1824, "ensemble_ppl": 1917, "best_adapter_ppl": 1856}),
    judge=judge,
    measure=measure,
    key_figures=key_figures,
    notes=("The catalogue's unknown user was a journalist, a persona the base trained on; ours is of the "
           "held-out persona, which no model saw.",
           "The catalogue's 'by Jensen, bounded by the best adapter' is misstated: the guarantee is per token "
           "within log N of the best; ensemble_le_best_adapter reports the literal claim."),
)
