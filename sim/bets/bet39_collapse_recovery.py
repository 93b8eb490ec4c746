"""Bet 39: recovery training of the expert-averaged model (seed 001)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model import merges

from .base import FAILS, Bet, CatalogueResult, Criteria, number, ratio_verdict
from .bet38_expert_collapse import COLLAPSE_CRITERIA, quality
from .common import general_tokens
from .context import BetContext

CATALOGUE_STEPS = 200
LR = 5e-5


def measure(ctx: BetContext) -> dict[str, Any]:
    """Train the averaged model (and, as a control, the original) for the catalogue's 200 steps (scaled
    to the preset) with AdamW at lr 5e-5 on every training persona's text."""
    tokens = general_tokens(ctx)
    steps = ctx.budget(CATALOGUE_STEPS)
    base = ctx.base_state()
    orig = quality(ctx, ctx.model(base), tokens, sample=False)
    collapsed = ctx.model(merges.average_experts(base))
    before = quality(ctx, collapsed, tokens, sample=False)
    losses = ctx.train_steps(collapsed, ctx.personas(), steps=steps, lr=LR)
    after = quality(ctx, collapsed, tokens)
    control = ctx.model(base)
    ctx.train_steps(control, ctx.personas(), steps=steps, lr=LR)
    ctl = quality(ctx, control, tokens, sample=False)
    return {
        "steps": steps, "catalogue_steps": CATALOGUE_STEPS, "lr": LR, "optimizer": "AdamW",
        "original_ppl": orig["ppl"], "averaged_ppl": before["ppl"], "recovered_ppl": after["ppl"],
        "recovery_ratio": after["ppl"] / orig["ppl"], "unique_tokens_recovered": after["unique_tokens"],
        "control_original_trained_ppl": ctl["ppl"],
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
    }


def judge(m: Mapping[str, Any]) -> str:
    """Bet 38's criteria applied to the recovered model."""
    return ratio_verdict(number(m, "recovery_ratio"), number(m, "unique_tokens_recovered"),
                         strict=1.5, lenient=3.0, catastrophic=10.0)


def key_figures(m: Mapping[str, Any]) -> str:
    """Recovered ppl against the original."""
    return (f"{int(number(m, 'steps'))} steps: ppl {number(m, 'averaged_ppl'):.1f} -> "
            f"{number(m, 'recovered_ppl'):.1f} vs original {number(m, 'original_ppl'):.1f} "
            f"(x{number(m, 'recovery_ratio'):.2f})")


BET = Bet(
    number=39,
    slug="collapse_recovery",
    title="Recover the expert-averaged model by training",
    question="Do 200 steps of AdamW at lr 5e-5 bring the expert-averaged model back within 3x of the original?",
    setup=("Bet 38's averaged base, trained on every training persona's text for 200 steps scaled by the "
           "preset (specialist steps / 1000), AdamW lr 5e-5 (no warm-up, cosine to 10%); the original trained "
           "the same way as a control."),
    criteria=Criteria(strict=COLLAPSE_CRITERIA.strict.replace("averaged", "recovered"),
                      lenient=COLLAPSE_CRITERIA.lenient, catastrophic=COLLAPSE_CRITERIA.catastrophic,
                      source="the simulator: Bet 38's criteria (seed 001) applied after recovery; seed 001 "
                             "reports Bet 39 only as '> 3x the original'"),
    catalogue=CatalogueResult(verdict=FAILS, quote="fails: ~280 vs 89 baseline after 200 steps (> 3x the original)",
                              figures={"recovered_ppl": 280, "original_ppl": 89}),
    judge=judge,
    measure=measure,
    key_figures=key_figures,
)
