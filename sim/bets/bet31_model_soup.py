"""Bet 31: linear weight soup of two specialists (seed 000)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from model import merges

from .base import CATASTROPHIC, LENIENT, NEITHER, STRICT, Bet, BetError, CatalogueResult, Criteria, need, number
from .common import nll, pick_personas, ppl, states_bitwise_equal
from .context import BetContext

SWEEP = (0.1, 0.3, 0.5, 0.7, 0.9)


def alpha_key(alpha: float) -> str:
    """JSON key of an alpha."""
    return f"{alpha:g}"


def soup_sweep(ctx: BetContext, alphas: Sequence[float]) -> dict[str, Any]:
    """Soups alpha * specialist_1 + (1 - alpha) * specialist_2 on both specialists' held-out texts.

    alpha = 0 and 1 are always added as sanity checks: they must reproduce the parents bitwise, and
    score exactly as the parents do. The loss barrier is measured along all the alphas.
    """
    spec1, spec2 = pick_personas(ctx, ("programmer", "novelist"), 2)
    a, b = ctx.specialist_state(spec1), ctx.specialist_state(spec2)
    texts = [spec1, spec2]
    path = sorted({0.0, 1.0, *alphas})
    soup_ppl: dict[str, dict[str, float]] = {t: {} for t in texts}
    soup_nll: dict[str, list[float]] = {t: [] for t in texts}
    sanity: dict[str, Any] = {}
    for alpha in path:
        state = merges.linear_soup(a, b, alpha=alpha)
        if alpha in (0.0, 1.0):
            parent = a if alpha == 1.0 else b
            sanity[f"alpha{alpha:g}_bitwise_equals_parent"] = states_bitwise_equal(state, parent)
        model = ctx.model(state)
        for t in texts:
            lp = ctx.token_logps(model, ctx.tokens(t))
            soup_ppl[t][alpha_key(alpha)] = ppl(lp)
            soup_nll[t].append(nll(lp))
    # the parents scored as themselves, independently of the soup code
    parents = {"specialist_1": ctx.model(a), "specialist_2": ctx.model(b)}
    parent_ppl = {t: {role: ppl(ctx.token_logps(m, ctx.tokens(t))) for role, m in parents.items()} for t in texts}
    sanity["endpoint_ppl_equal_parents"] = all(
        soup_ppl[t]["1"] == parent_ppl[t]["specialist_1"] and soup_ppl[t]["0"] == parent_ppl[t]["specialist_2"]
        for t in texts)
    swept = [alpha_key(x) for x in alphas]
    return {
        "specialist_1": spec1, "specialist_2": spec2, "eval_texts": texts, "alphas": swept,
        "soup_ppl": {t: {k: soup_ppl[t][k] for k in swept} for t in texts},
        "parent_ppl": parent_ppl,
        "endpoints_ppl": {t: {"0": soup_ppl[t]["0"], "1": soup_ppl[t]["1"]} for t in texts},
        "sanity": sanity,
        "loss_barrier_nats": {t: merges.loss_barrier(soup_nll[t], alphas=path) for t in texts},
        # the catalogue's inconsistency: does ppl on specialist 1's text fall as alpha (its weight) rises?
        "ppl_falls_as_alpha_rises_on_specialist_1_text": all(
            soup_ppl[spec1][alpha_key(x)] >= soup_ppl[spec1][alpha_key(y)] for x, y in zip(path, path[1:])),
    }


def judge_soup(m: Mapping[str, Any]) -> str:
    """Seed 000's criteria over every swept alpha and eval text.

    CATASTROPHIC: every alpha makes the soup worse than the worse parent, on every eval text.
    STRICT: the soup beats both parents for >= 1 alpha on >= 1 eval text.
    LENIENT: the soup is <= the better parent for >= 1 alpha (on >= 1 eval text).
    The alpha = 0 / 1 sanity checks must hold, or the measurement is refused.
    """
    sanity = need(m, "sanity")
    if not all(bool(v) for v in sanity.values()) or not sanity:
        raise BetError(f"soup sanity checks failed: {sanity}")
    texts = need(m, "eval_texts")
    alphas = need(m, "alphas")
    if not texts or not alphas:
        raise BetError("soup measurements need at least one eval text and one alpha")
    worse_everywhere, beats_both, matches_better = True, False, False
    for t in texts:
        p1, p2 = number(m, "parent_ppl", t, "specialist_1"), number(m, "parent_ppl", t, "specialist_2")
        for a in alphas:
            s = number(m, "soup_ppl", t, a)
            worse_everywhere &= s > max(p1, p2)
            beats_both |= s < min(p1, p2)
            matches_better |= s <= min(p1, p2)
    if worse_everywhere:
        return CATASTROPHIC
    if beats_both:
        return STRICT
    if matches_better:
        return LENIENT
    return NEITHER


def soup_figures(m: Mapping[str, Any]) -> str:
    """Soup ppl per alpha on specialist 1's text, beside the parents."""
    t = need(m, "specialist_1")
    soups = ", ".join(f"{number(m, 'soup_ppl', t, a):.1f}" for a in need(m, "alphas"))
    return (f"on {t}: soup {soups} (alpha {', '.join(need(m, 'alphas'))}); parents "
            f"{number(m, 'parent_ppl', t, 'specialist_1'):.1f} / {number(m, 'parent_ppl', t, 'specialist_2'):.1f}; "
            f"barrier {number(m, 'loss_barrier_nats', t):.3f} nats")


SOUP_CRITERIA = Criteria(
    strict="soup beats both parents on >= 1 alpha and >= 1 eval text",
    lenient="soup <= better-parent ppl on >= 1 alpha",
    catastrophic="every alpha makes soup ppl worse than the worse parent (on every eval text)",
    source="seed 000 (Bet 31), verbatim; checked over both specialists' held-out texts",
)

BET = Bet(
    number=31,
    slug="model_soup",
    title="Linear weight soup of two specialists",
    question=("For some alpha in [0.1, 0.9], is alpha * specialist_1 + (1 - alpha) * specialist_2 better than "
              "both parents?"),
    setup=("Two full fine-tunes of the base (programmer = specialist 1, novelist = specialist 2); soup every "
           "parameter at alpha in {0.1, 0.3, 0.5, 0.7, 0.9}, plus alpha = 0 and 1 as sanity checks (bitwise "
           "parents); held-out ppl on both specialists' texts; loss barrier along the path."),
    criteria=SOUP_CRITERIA,
    catalogue=CatalogueResult(
        verdict="CATASTROPHIC",
        quote="soup ppl 224, 280, 351, 433, 502 at alpha 0.1..0.9; better parent 187, worse ~220",
        figures={"alphas": list(SWEEP), "soup_ppl": [224, 280, 351, 433, 502], "better_parent_ppl": 187,
                 "worse_parent_ppl": 220},
    ),
    judge=judge_soup,
    measure=lambda ctx: soup_sweep(ctx, SWEEP),
    key_figures=soup_figures,
    notes=("The catalogue's alpha weights specialist 1 (matching the eval text), yet its ppl rises as alpha "
           "goes to 1 while it says alpha = 1 recovers that parent (187): we report the measured direction "
           "(ppl_falls_as_alpha_rises_on_specialist_1_text).",
           "Our specialists fine-tune from a shared base for the preset's steps (not 1000 at 30M unless "
           "--preset 30m), which is closer to the model-soup regime of seed 002."),
)
