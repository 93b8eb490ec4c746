"""Bet 12: keyword-based expert prefetching (with the prefetch issue's predictors)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import CATASTROPHIC, LENIENT, NEITHER, OPEN, STRICT, Bet, CatalogueResult, Criteria, number
from .context import BetContext

PREDICTORS = ("keyword", "global", "random", "oracle")
HALF = 8  # experts per block: half of the 16


def measure(ctx: BetContext) -> dict[str, Any]:
    """Keyword prefetching beside global frequency, random and the oracle, at half the experts per block."""
    return {"experts_per_block": HALF,
            "predictors": {p: ctx.prefetch_eval(p, experts_per_block=HALF) for p in PREDICTORS}}


def judge(m: Mapping[str, Any]) -> str:
    """CATASTROPHIC (first): keyword recall <= random's. STRICT: keyword hit rate >= 0.95 and ppl within 2%
    (the prefetch issue's goal). LENIENT: keyword recall > global frequency's and ppl within 10%. Else NEITHER."""
    def kw(key: str) -> float:
        return number(m, "predictors", "keyword", key)

    if kw("recall") <= number(m, "predictors", "random", "recall"):
        return CATASTROPHIC
    if kw("hit_rate") >= 0.95 and kw("ppl_ratio") <= 1.02:
        return STRICT
    if kw("recall") > number(m, "predictors", "global", "recall") and kw("ppl_ratio") <= 1.10:
        return LENIENT
    return NEITHER


def key_figures(m: Mapping[str, Any]) -> str:
    """Recall, hit rate and ppl ratio per predictor."""
    return "; ".join(f"{p} recall {number(m, 'predictors', p, 'recall'):.2f} "
                     f"hit {number(m, 'predictors', p, 'hit_rate'):.2f} "
                     f"ppl x{number(m, 'predictors', p, 'ppl_ratio'):.3f}" for p in PREDICTORS)


BET = Bet(
    number=12,
    slug="keyword_prefetch",
    title="Keyword-based expert prefetching",
    question="Do a request's words predict which experts it needs well enough to ship only half of them?",
    setup=("The base serving every known user's held-out requests (context windows) with 8 of 16 experts per "
           "block, chosen from the first quarter of each request by the keyword predictor (token -> expert map "
           "learned on the node), global frequency, random, and the oracle; misses substituted by the best "
           "installed expert; recall (token-weighted), hit rate and ppl ratio against the full model."),
    criteria=Criteria(
        strict="keyword: hit rate >= 0.95 and ppl within 2% of the full model, at 8 of 16 experts per block",
        lenient="keyword: recall above global frequency's and ppl within 10%",
        catastrophic="keyword recall no better than random's",
        source="the simulator (the catalogue gives no figures for Bet 12); STRICT is the prefetch issue's goal",
    ),
    catalogue=CatalogueResult(
        verdict=OPEN, quote="protocol-level alternative to shipping all experts; no figures given"),
    judge=judge,
    measure=measure,
    key_figures=key_figures,
)
