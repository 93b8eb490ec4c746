"""Bet 38: every block's 16 experts averaged into one (seed 001)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from model import merges

from .base import CATASTROPHIC, Bet, CatalogueResult, Criteria, number, ratio_verdict
from .common import general_tokens, ppl
from .context import BetContext

SAMPLE_TOKENS = 100
PROMPT_TOKENS = 8

COLLAPSE_CRITERIA = Criteria(
    strict="averaged model ppl <= 1.5x original ppl",
    lenient="<= 3x original ppl",
    catastrophic="> 10x ppl blowup OR fewer than 5 unique tokens in a 100-token greedy sample (mode collapse)",
    source="seed 001 (Bet 38), verbatim; CATASTROPHIC is checked first",
)


def prompt(ctx: BetContext) -> torch.Tensor:
    """The fixed prompt: the first tokens of the first persona's held-out text."""
    return ctx.tokens(ctx.personas()[0])[:PROMPT_TOKENS]


def quality(ctx: BetContext, model, tokens: torch.Tensor, *, sample: bool = True) -> dict[str, Any]:
    """Held-out ppl and (unless ``sample`` is False) the unique tokens of a 100-token greedy sample."""
    out: dict[str, Any] = {"ppl": ppl(ctx.token_logps(model, tokens))}
    if sample:
        ids = ctx.sample(model, prompt(ctx), SAMPLE_TOKENS, greedy=True)
        out["unique_tokens"] = int(torch.unique(ids).numel())
    return out


def measure(ctx: BetContext) -> dict[str, Any]:
    """The base against the base with each block's experts averaged (16 identical copies kept)."""
    tokens = general_tokens(ctx)
    base = ctx.base_state()
    averaged = merges.average_experts(base)
    orig, avg = quality(ctx, ctx.model(base), tokens), quality(ctx, ctx.model(averaged), tokens)
    return {
        "eval_tokens": int(tokens.numel()), "sample_tokens": SAMPLE_TOKENS,
        "original_ppl": orig["ppl"], "averaged_ppl": avg["ppl"], "ppl_ratio": avg["ppl"] / orig["ppl"],
        "unique_tokens_original": orig["unique_tokens"], "unique_tokens_averaged": avg["unique_tokens"],
        "expert_spread_per_block": merges.expert_spread(base),
    }


def judge(m: Mapping[str, Any]) -> str:
    """Seed 001's criteria on the averaged model."""
    return ratio_verdict(number(m, "ppl_ratio"), number(m, "unique_tokens_averaged"),
                         strict=1.5, lenient=3.0, catastrophic=10.0)


def key_figures(m: Mapping[str, Any]) -> str:
    """ppl ratio and unique tokens."""
    return (f"ppl {number(m, 'original_ppl'):.1f} -> {number(m, 'averaged_ppl'):.1f} "
            f"(x{number(m, 'ppl_ratio'):.3g}); unique tokens in 100 {int(number(m, 'unique_tokens_original'))} "
            f"-> {int(number(m, 'unique_tokens_averaged'))}")


BET = Bet(
    number=38,
    slug="expert_collapse",
    title="Average the 16 experts of each block into one",
    question="Is the base with each block's experts averaged within 3x of the original's perplexity?",
    setup=("The base; every expert of a block replaced by the block mean (16 identical copies, so shapes and "
           "the wire format stay; the router still runs but every choice computes the same function); "
           "held-out ppl on every training persona's text; 100-token greedy sample from a fixed prompt."),
    criteria=COLLAPSE_CRITERIA,
    catalogue=CatalogueResult(verdict=CATASTROPHIC,
                              quote="ppl x520 (89 -> 46,280), 2 unique tokens in a 100-token sample",
                              figures={"original_ppl": 89, "averaged_ppl": 46280, "ppl_ratio": 520,
                                       "unique_tokens_original": 73, "unique_tokens_averaged": 2}),
    judge=judge,
    measure=measure,
    key_figures=key_figures,
    notes=("The catalogue keeps a single averaged expert; we keep 16 identical copies (the gate scales the "
           "output as in the trained model: by 1 with the default unit gate, by the router's probability with "
           "gate = \"prob\").",),
)
