"""Bet 13: ternary (1.58-bit) weights within experts."""

from __future__ import annotations

from . import compression
from .base import WORKS, Bet, CatalogueResult

QAT_CATALOGUE_STEPS = 500  # scaled by the preset like every catalogue step count

BET = Bet(
    number=13,
    slug="ternary_experts",
    title="Ternary (1.58-bit) within experts",
    question="Does the model still work with every expert matrix ternary (absmean scale, weights in {-1, 0, +1})?",
    setup=("The base; expert matrices through the 'ternary' codec after a short quantisation-aware fine-tune "
           "of the experts (straight-through estimator; 500 catalogue steps scaled by the preset), every other "
           "weight in fp32; the same codec without the fine-tune reported beside it; held-out ppl on every "
           "training persona's text; 100-token greedy sample."),
    criteria=compression.CRITERIA,
    catalogue=CatalogueResult(verdict=WORKS, quote="works"),
    judge=compression.judge,
    measure=lambda ctx: compression.measure_codec(ctx, "ternary", qat_catalogue_steps=QAT_CATALOGUE_STEPS),
    key_figures=compression.key_figures,
)
