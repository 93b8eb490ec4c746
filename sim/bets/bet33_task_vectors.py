"""Bet 33: task-vector arithmetic, base + alpha * tau_1 + beta * tau_2 (seed 000)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model import merges

from .base import CATASTROPHIC, FAILS, LENIENT, NEITHER, STRICT, Bet, CatalogueResult, Criteria, geomean, need, number
from .common import pick_personas, score_states
from .context import BetContext

LAMBDAS = ((0.5, 0.5), (1.0, 1.0), (1.0, 0.5), (0.5, 1.0))
NEAR = 1.05


def lambda_key(lam: tuple[float, float]) -> str:
    """JSON key of an (alpha, beta) pair."""
    return f"{lam[0]:g},{lam[1]:g}"


def measure(ctx: BetContext) -> dict[str, Any]:
    """Task-vector merges of two specialists on both specialists' held-out texts, beside the parents and the base."""
    spec1, spec2 = pick_personas(ctx, ("programmer", "novelist"), 2)
    base, a, b = ctx.base_state(), ctx.specialist_state(spec1), ctx.specialist_state(spec2)
    texts = [spec1, spec2]
    states = {lambda_key(lam): merges.task_arithmetic(base, [a, b], lambdas=list(lam)) for lam in LAMBDAS}
    merged = score_states(ctx, states, texts)
    refs = score_states(ctx, {"base": base, spec1: a, spec2: b}, texts)
    return {
        "specialists": [spec1, spec2], "eval_texts": texts, "lambdas": list(states),
        "merged_ppl": merged,  # {lambdas: {text: ppl}}
        "specialist_ppl": {s: refs[s] for s in (spec1, spec2)},  # {specialist: {text: ppl}}
        "base_ppl": refs["base"],
    }


def judge(m: Mapping[str, Any]) -> str:
    """CATASTROPHIC (first): every merge's geometric-mean ppl over the texts is worse than the worse
    specialist's. STRICT: some merge is within 5% of each text's own specialist on every text. LENIENT:
    some merge's geometric-mean ppl beats both specialists'. Else NEITHER."""
    texts, specs = need(m, "eval_texts"), need(m, "specialists")
    spec_gm = [geomean(number(m, "specialist_ppl", s, t) for t in texts) for s in specs]
    merged_gm, near_own = [], []
    for lam in need(m, "lambdas"):
        merged_gm.append(geomean(number(m, "merged_ppl", lam, t) for t in texts))
        near_own.append(all(number(m, "merged_ppl", lam, t) <= NEAR * number(m, "specialist_ppl", t, t)
                            for t in texts))
    if all(g > max(spec_gm) for g in merged_gm):
        return CATASTROPHIC
    if any(near_own):
        return STRICT
    if any(g < min(spec_gm) for g in merged_gm):
        return LENIENT
    return NEITHER


def key_figures(m: Mapping[str, Any]) -> str:
    """Best merge against the specialists, geometric mean over both texts."""
    texts = need(m, "eval_texts")
    gm = {lam: geomean(number(m, "merged_ppl", lam, t) for t in texts) for lam in need(m, "lambdas")}
    best = min(gm, key=gm.__getitem__)
    specs = ", ".join(f"{s} {geomean(number(m, 'specialist_ppl', s, t) for t in texts):.1f}"
                      for s in need(m, "specialists"))
    return f"best merge (alpha,beta)=({best}) geo-mean ppl {gm[best]:.1f}; specialists {specs}"


BET = Bet(
    number=33,
    slug="task_vectors",
    title="Task-vector arithmetic",
    question="Does base + alpha * (spec_1 - base) + beta * (spec_2 - base) hold both specialists' abilities?",
    setup=("Bet 31's two specialists and their base; (alpha, beta) in {(0.5,0.5), (1,1), (1,0.5), (0.5,1)}; "
           "held-out ppl on both specialists' texts."),
    criteria=Criteria(
        strict="some (alpha, beta) is within 5% of each text's own specialist ppl on both texts",
        lenient="some (alpha, beta) has a lower geometric-mean ppl over both texts than either specialist",
        catastrophic="every (alpha, beta) has a geometric-mean ppl worse than the worse specialist's (as Bet 31)",
        source="the simulator (the catalogue reports 'fails' without criteria), modelled on Bet 31's",
    ),
    catalogue=CatalogueResult(verdict=FAILS, quote=("fails: task vectors of independently-trained specialists "
                                                    "don't compose additively in weight space")),
    judge=judge,
    measure=measure,
    key_figures=key_figures,
)
