"""Seed 002's weight-space methods, side by side with the output-space mixture (the simulator's own)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model import merges, mixtures

from .base import (
    CATASTROPHIC,
    FAILS,
    LENIENT,
    NEITHER,
    STRICT,
    Bet,
    BetError,
    CatalogueResult,
    Criteria,
    geomean,
    need,
    number,
)
from .common import nll, posterior_by_document, ppl, stack_logps
from .context import BetContext

WISE_ALPHA = 0.5
TIES_DENSITY = 0.2
DARE_P = 0.9
TASK_LAMBDAS = (0.3, 1.0)


def _merges(ctx: BetContext, validate) -> tuple[dict[str, dict], dict[str, Any]]:
    """Every weight-space merge of the specialists, and what the greedy soup kept."""
    base = ctx.base_state()
    specs = [ctx.specialist_state(p) for p in ctx.personas()]
    greedy = merges.greedy_soup(specs, evaluate=validate)
    states = {
        "uniform_soup": merges.uniform_soup(specs),
        "greedy_soup": greedy.state,
        **{f"task_arithmetic_{lam:g}": merges.task_arithmetic(base, specs, lambdas=lam) for lam in TASK_LAMBDAS},
        "ties": merges.ties_merge(base, specs, density=TIES_DENSITY),
        "dare": merges.dare_merge(base, specs, drop_p=DARE_P, seed=ctx.seed, lambdas=TASK_LAMBDAS[0]),
    }
    kept = [ctx.personas()[i] for i in greedy.ingredients]
    return states, {"greedy_soup_ingredients": kept, "greedy_soup_validation_nll": greedy.score}


def measure(ctx: BetContext) -> dict[str, Any]:
    """ppl on every training persona's held-out text of: the base, each specialist, each merge, and the
    uniform and posterior mixtures of the specialists; WiSE-FT of each specialist in and out of domain."""
    personas = ctx.personas()
    length = ctx.context_length()
    # the greedy soup's validation text: the head of each persona's *training* text, never the eval text
    val = {p: ctx.tokens(p, "train")[: ctx.tokens(p).numel()] for p in personas}

    def validate(sd: dict) -> float:
        model = ctx.model(sd)
        return sum(nll(ctx.token_logps(model, v)) for v in val.values()) / len(val)

    states, extra = _merges(ctx, validate)
    table: dict[str, dict[str, float]] = {}
    for name, sd in {"base": ctx.base_state(), **states}.items():
        model = ctx.model(sd)
        table[name] = {t: ppl(ctx.token_logps(model, ctx.tokens(t))) for t in personas}
    spec_models = [ctx.model(ctx.specialist_state(p)) for p in personas]
    for name in (*(f"specialist:{p}" for p in personas), "mixture:uniform", "mixture:posterior"):
        table[name] = {}
    for t in personas:
        lp = stack_logps(ctx, spec_models, ctx.tokens(t))  # (N, T)
        for i, p in enumerate(personas):
            table[f"specialist:{p}"][t] = ppl(lp[i])
        table["mixture:uniform"][t] = ppl(mixtures.uniform_mixture(lp))
        table["mixture:posterior"][t] = ppl(posterior_by_document(lp, length)[0])
    held = ctx.held_out_persona()
    base_model = ctx.model(ctx.base_state())
    wise: dict[str, Any] = {"alpha": WISE_ALPHA, "held_out_persona": held,
            "base_held_out_ppl": ppl(ctx.token_logps(base_model, ctx.tokens(held))), "per_specialist": {}}
    for p, spec in zip(personas, spec_models):
        w = ctx.model(merges.wise_ft(ctx.base_state(), ctx.specialist_state(p), alpha=WISE_ALPHA))
        wise["per_specialist"][p] = {
            "wise_own_ppl": ppl(ctx.token_logps(w, ctx.tokens(p))),
            "wise_held_out_ppl": ppl(ctx.token_logps(w, ctx.tokens(held))),
            "specialist_own_ppl": table[f"specialist:{p}"][p],
            "specialist_held_out_ppl": ppl(ctx.token_logps(spec, ctx.tokens(held))),
        }
    return {"personas": list(personas), "weight_space_methods": list(states),
            "specialists": [f"specialist:{p}" for p in personas], "ppl": table, **extra, "wise_ft": wise}


def _gm(m: Mapping[str, Any], method: str) -> float:
    return geomean(number(m, "ppl", method, t) for t in need(m, "personas"))


def judge(m: Mapping[str, Any]) -> str:
    """Geometric-mean ppl over the personas' texts. CATASTROPHIC (first): every merge is worse than the
    worst specialist. STRICT: the best merge is <= the posterior mixture. LENIENT: the best merge beats
    the base and every single specialist. Else NEITHER."""
    ws = [_gm(m, x) for x in need(m, "weight_space_methods")]
    specs = [_gm(m, x) for x in need(m, "specialists")]
    if not ws or not specs:
        raise BetError("Bet 101 needs at least one merge and one specialist")
    if min(ws) > max(specs):
        return CATASTROPHIC
    if min(ws) <= _gm(m, "mixture:posterior"):
        return STRICT
    if min(ws) < min(specs) and min(ws) < _gm(m, "base"):
        return LENIENT
    return NEITHER


def key_figures(m: Mapping[str, Any]) -> str:
    """Best merge against the mixtures and the best specialist."""
    ws = {x: _gm(m, x) for x in need(m, "weight_space_methods")}
    best = min(ws, key=ws.__getitem__)
    spec = min(_gm(m, x) for x in need(m, "specialists"))
    return (f"geo-mean ppl: best merge {best} {ws[best]:.2f}, posterior mixture {_gm(m, 'mixture:posterior'):.2f}, "
            f"uniform mixture {_gm(m, 'mixture:uniform'):.2f}, best specialist {spec:.2f}, base {_gm(m, 'base'):.2f}")


BET = Bet(
    number=101,
    slug="weight_space_methods",
    title="Seed 002's weight-space methods against the output-space mixture",
    question="Does any weight-space merge of the specialists serve every domain as well as the output-space mixture?",
    setup=(f"Every training persona's specialist and the base; uniform soup, greedy soup (validated on the head "
           f"of each persona's training text), task arithmetic (lambda {', '.join(f'{x:g}' for x in TASK_LAMBDAS)}), "
           f"TIES (density {TIES_DENSITY}), DARE (p {DARE_P}, lambda {TASK_LAMBDAS[0]:g}); uniform and posterior "
           f"mixtures; geometric-mean ppl over the personas' held-out texts. WiSE-FT (alpha {WISE_ALPHA}) of each "
           f"specialist in its domain and on the held-out persona, reported beside."),
    criteria=Criteria(
        strict="the best merge's geometric-mean ppl <= the posterior mixture's",
        lenient="the best merge's geometric-mean ppl < the base's and < every single specialist's",
        catastrophic="every merge's geometric-mean ppl > the worst single specialist's",
        source="the simulator, written before running; not in the catalogue",
    ),
    catalogue=CatalogueResult(
        verdict=FAILS,
        quote=("Bets 31 and 33 (seed 000): 'The federation does not combine specialists in weight space.' "
               "Seed 002: soups work when fine-tunes share a pretrained base and stay in its basin."),
    ),
    judge=judge,
    measure=measure,
    key_figures=key_figures,
    in_catalogue=False,
    notes=("Not a catalogue bet: agreement is with the catalogue's general position (Bets 31 and 33).",),
)
