"""Bet 48: 50% magnitude pruning within experts."""

from __future__ import annotations

from . import compression
from .base import WORKS, Bet, CatalogueResult

BET = Bet(
    number=48,
    slug="magnitude_pruning",
    title="50% magnitude pruning within experts",
    question="Does the model still work with the smaller half (by magnitude) of every expert matrix set to zero?",
    setup=("The base; expert matrices through the 'prune50' codec (no fine-tune), every other weight in fp32; "
           "held-out ppl on every training persona's text; 100-token greedy sample."),
    criteria=compression.CRITERIA,
    catalogue=CatalogueResult(verdict=WORKS, quote="works"),
    judge=compression.judge,
    measure=lambda ctx: compression.measure_codec(ctx, "prune50"),
    key_figures=compression.key_figures,
)
