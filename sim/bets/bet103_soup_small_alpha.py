"""Open question of Bet 31: soup at alpha = 0.05 (and its mirror 0.95)."""

from __future__ import annotations

from .base import OPEN, Bet, CatalogueResult, Criteria
from .bet31_model_soup import SOUP_CRITERIA, judge_soup, soup_figures, soup_sweep

ALPHAS = (0.05, 0.95)

BET = Bet(
    number=103,
    slug="soup_small_alpha",
    title="Soup at very small alpha",
    question="Is a soup that is almost one parent (alpha = 0.05 or 0.95) better than both parents?",
    setup="Bet 31's two specialists and eval texts, soup at alpha in {0.05, 0.95}; Bet 31's criteria.",
    criteria=Criteria(strict=SOUP_CRITERIA.strict, lenient=SOUP_CRITERIA.lenient,
                      catastrophic=SOUP_CRITERIA.catastrophic,
                      source="the simulator: Bet 31's criteria (seed 000) applied to alpha in {0.05, 0.95}"),
    catalogue=CatalogueResult(
        verdict=OPEN,
        quote=("Soup at very small alpha. alpha=0.05 might be in spec 2's basin still and produce a useful "
               "'mostly-spec-1-with-a-little-spec-2' model. Not tested explicitly."),
    ),
    judge=judge_soup,
    measure=lambda ctx: soup_sweep(ctx, ALPHAS),
    key_figures=soup_figures,
    in_catalogue=False,
    notes=("The catalogue's sentence calls alpha = 0.05 both 'in spec 2's basin' and 'mostly spec 1': we "
           "measure both 0.05 and 0.95.",),
)
