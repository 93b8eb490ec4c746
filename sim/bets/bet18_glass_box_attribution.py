"""Bet 18: glass-box attribution: each specialist's responsibility for each token."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from model import mixtures

from .base import CATASTROPHIC, LENIENT, NEITHER, STRICT, WORKS, Bet, CatalogueResult, Criteria, number
from .common import documents, stack_logps
from .context import BetContext

STRICT_ACC, LENIENT_ACC = 0.9, 0.6


def _attribution_row(lp: torch.Tensor, own: int | None, length: int) -> dict[str, Any]:
    """Token- and document-level attribution of one text's (N, T) log-probabilities."""
    resp = mixtures.attribution(lp)  # (N, T) uniform weights: p_i / sum_j p_j
    row: dict[str, Any] = {
        "mean_responsibility": [float(x) for x in resp.mean(dim=1)],
        "sum_error": float((resp.sum(dim=0) - 1).abs().max()),
        "tokens": int(lp.size(1)),
    }
    # a document goes to the specialist with the highest posterior at its end (= highest likelihood)
    winners = torch.cat([doc.sum(dim=-1).argmax(dim=0) for doc in documents(lp, length)])  # (D,)
    row["documents"] = int(winners.numel())
    if own is not None:
        row["token_accuracy"] = float((resp.argmax(dim=0) == own).double().mean())
        row["document_accuracy"] = float((winners == own).double().mean())
        row["own_mean_responsibility"] = row["mean_responsibility"][own]
    return row


def measure(ctx: BetContext) -> dict[str, Any]:
    """Attribution of every persona's held-out text (whose true domain is known) and of the held-out
    persona's text (which no specialist saw) over the training personas' specialists."""
    personas = ctx.personas()
    length = ctx.context_length()
    models = [ctx.model(ctx.specialist_state(p)) for p in personas]
    texts = {}
    for i, t in enumerate(personas):
        texts[t] = _attribution_row(stack_logps(ctx, models, ctx.tokens(t)), i, length)
    held = ctx.held_out_persona()
    unknown = _attribution_row(stack_logps(ctx, models, ctx.tokens(held)), None, length)
    docs = sum(r["documents"] for r in texts.values())
    return {
        "specialists": list(personas), "texts": texts, "held_out": {"persona": held, **unknown},
        "document_accuracy": sum(r["document_accuracy"] * r["documents"] for r in texts.values()) / docs,
        "token_accuracy": sum(r["token_accuracy"] * r["tokens"] for r in texts.values())
        / sum(r["tokens"] for r in texts.values()),
        "chance": 1.0 / len(personas),
        "max_sum_error": max(r["sum_error"] for r in (*texts.values(), unknown)),
    }


def judge(m: Mapping[str, Any]) -> str:
    """CATASTROPHIC: responsibilities do not sum to 1, or documents are attributed no better than chance.
    STRICT: >= 90% of documents attributed to their own domain's specialist; LENIENT: >= 60%."""
    acc, chance = number(m, "document_accuracy"), number(m, "chance")
    if number(m, "max_sum_error") > 1e-6 or acc <= chance:
        return CATASTROPHIC
    if acc >= STRICT_ACC:
        return STRICT
    if acc >= LENIENT_ACC:
        return LENIENT
    return NEITHER


def key_figures(m: Mapping[str, Any]) -> str:
    """Attribution accuracy."""
    return (f"documents attributed to their own specialist {number(m, 'document_accuracy'):.0%}, tokens "
            f"{number(m, 'token_accuracy'):.0%} (chance {number(m, 'chance'):.0%}); "
            f"responsibility sums off by <= {number(m, 'max_sum_error'):.1e}")


BET = Bet(
    number=18,
    slug="glass_box_attribution",
    title="Glass-box attribution",
    question=("Are per-token, per-specialist contributions auditable: do they point at the specialist whose "
              "domain the text is?"),
    setup=("Each training persona's specialist scores every persona's held-out text; responsibility of "
           "specialist i for token t is p_i / sum_j p_j (uniform weights); each document (context window) "
           "is attributed to the specialist with the highest posterior at its end; the held-out persona's "
           "text shows how attribution spreads when no specialist fits."),
    criteria=Criteria(
        strict="responsibilities sum to 1, and >= 90% of documents are attributed to their own domain's specialist",
        lenient="responsibilities sum to 1, and >= 60% of documents are attributed to their own domain's specialist",
        catastrophic=("responsibilities do not sum to 1 (|error| > 1e-6), or document attribution is no better "
                      "than chance"),
        source="the simulator (the catalogue gives no criteria for Bet 18)",
    ),
    catalogue=CatalogueResult(verdict=WORKS, quote="per-token, per-specialist contributions are auditable"),
    judge=judge,
    measure=measure,
    key_figures=key_figures,
)
