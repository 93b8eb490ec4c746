"""The catalogue's bets as runnable experiments: ``python -m sim.bets``.

Every module ``bet<NN>_<slug>.py`` in this package defines one ``BET`` (a :class:`~sim.bets.base.Bet`)
and is found by :func:`all_bets`; the simulator's own experiments are numbered from 100.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import VERDICTS, Bet, BetError

__all__ = ["Bet", "BetError", "VERDICTS", "all_bets", "get_bet"]


def all_bets() -> dict[int, Bet]:
    """Every bet in this package, by number, in number order."""
    found: dict[int, Bet] = {}
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("bet"):
            continue
        bet = getattr(importlib.import_module(f"{__name__}.{info.name}"), "BET", None)
        if not isinstance(bet, Bet):
            raise BetError(f"module {info.name} defines no BET")
        if bet.number in found:
            raise BetError(f"bet {bet.number} is defined twice ({found[bet.number].name}, {bet.name})")
        found[bet.number] = bet
    return dict(sorted(found.items()))


def get_bet(ident: str | int) -> Bet:
    """A bet by number (31, "31", "04") or by name ("31_model_soup")."""
    bets = all_bets()
    text = str(ident).strip()
    head = text.split("_", 1)[0]
    if head.isdigit() and int(head) in bets:
        bet = bets[int(head)]
        if "_" not in text or text == bet.name:
            return bet
    raise BetError(f"unknown bet {text!r}; choose from {', '.join(b.name for b in bets.values())}")
