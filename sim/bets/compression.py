"""Bets 13 and 48 share one shape: compress the experts with a codec, compare ppl with fp32."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Criteria, number, ratio_verdict
from .bet38_expert_collapse import quality
from .common import general_tokens
from .context import BetContext

STRICT_RATIO, LENIENT_RATIO, CATASTROPHIC_RATIO = 1.05, 1.25, 3.0

CRITERIA = Criteria(
    strict="compressed ppl <= 1.05x fp32 ppl",
    lenient="compressed ppl <= 1.25x fp32 ppl",
    catastrophic=("compressed ppl > 3x fp32 (Bet 38's own 'useful' bar), or fewer than 5 unique tokens in a "
                  "100-token greedy sample where the fp32 model's sample has at least 5 (collapse caused by the "
                  "codec)"),
    source="the simulator (the catalogue reports 'works' without criteria)",
)


def measure_codec(ctx: BetContext, codec: str, *, qat_catalogue_steps: int = 0) -> dict[str, Any]:
    """fp32 base against its experts through ``codec`` (after QAT when asked) and, for reference, without QAT."""
    tokens = general_tokens(ctx)
    base = ctx.model(ctx.base_state())
    ref = quality(ctx, base, tokens)
    out: dict[str, Any] = {"codec": codec, "fp32_ppl": ref["ppl"], "unique_tokens_fp32": ref["unique_tokens"]}
    plain, info = ctx.compress(base, codec)
    q = quality(ctx, plain, tokens, sample=not qat_catalogue_steps)
    out["post_training_ppl"] = q["ppl"]
    if qat_catalogue_steps:
        model, info = ctx.compress(base, codec, qat_steps=ctx.budget(qat_catalogue_steps))
        q = quality(ctx, model, tokens)
    out.update({"codec_ppl": q["ppl"], "ppl_ratio": q["ppl"] / ref["ppl"], "unique_tokens": q["unique_tokens"],
                "bits_per_expert_weight": info["bits_per_expert_weight"], "expert_bytes": info["bytes"],
                "fp32_expert_bytes": info["fp32_bytes"], "qat_steps": info["qat_steps"]})
    return out


def judge(m: Mapping[str, Any]) -> str:
    """Ratio criteria with Bet 38's collapse signal, counted only when the fp32 model's own sample is not
    already degenerate (a weak model's greedy sample can loop on a few tokens before any compression)."""
    unique = number(m, "unique_tokens")
    collapse_signal = unique if number(m, "unique_tokens_fp32") >= 5 else None
    return ratio_verdict(number(m, "ppl_ratio"), collapse_signal, strict=STRICT_RATIO,
                         lenient=LENIENT_RATIO, catastrophic=CATASTROPHIC_RATIO)


def key_figures(m: Mapping[str, Any]) -> str:
    """ppl and size."""
    return (f"{m['codec']}: ppl {number(m, 'fp32_ppl'):.2f} -> {number(m, 'codec_ppl'):.2f} "
            f"(x{number(m, 'ppl_ratio'):.3f}; without fine-tune {number(m, 'post_training_ppl'):.2f}), "
            f"{number(m, 'bits_per_expert_weight'):.2f} bits per expert weight")
