"""What a bet is: a question, a setup, pre-registered criteria as code, and the catalogue's answer.

A bet's verdict is never written by hand: :meth:`Bet.verdict` computes it from the measurements
with the bet's ``judge``, a pure function. The catalogue's own result sits beside it, quoted, with
the catalogue's verdict in the same vocabulary where the catalogue gives one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .context import BetContext

STRICT, LENIENT, NEITHER, CATASTROPHIC = "STRICT", "LENIENT", "NEITHER", "CATASTROPHIC"
VERDICTS: tuple[str, ...] = (STRICT, LENIENT, NEITHER, CATASTROPHIC)

# The catalogue's words for results it reports without a pre-registered level.
WORKS, FAILS, OPEN = "WORKS", "FAILS", "OPEN"
_ACCEPTS: dict[str, frozenset[str] | None] = {
    **{v: frozenset({v}) for v in VERDICTS},
    WORKS: frozenset({STRICT, LENIENT}),
    FAILS: frozenset({NEITHER, CATASTROPHIC}),
    OPEN: None,  # the catalogue leaves it open: nothing to agree or disagree with
}

_SLUG_RE = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)*$")


class BetError(ValueError):
    """A bet is malformed, unknown, or its measurements do not carry what its criteria need."""


@dataclass(frozen=True, kw_only=True)
class Criteria:
    """The pre-registered criteria in words; ``source`` says who wrote them (a seed, or the simulator)."""

    strict: str
    lenient: str
    catastrophic: str
    source: str
    neither: str = "none of the above"

    def as_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"STRICT": self.strict, "LENIENT": self.lenient, "NEITHER": self.neither,
                "CATASTROPHIC": self.catastrophic, "source": self.source}


@dataclass(frozen=True, kw_only=True)
class CatalogueResult:
    """The catalogue's result for a bet, quoted, never used as a measurement.

    ``verdict`` is one of VERDICTS where the catalogue reports a level, WORKS or FAILS where it only
    says that much, and OPEN where it gives no result.
    """

    verdict: str
    quote: str
    figures: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in _ACCEPTS:
            raise BetError(f"catalogue verdict must be one of {', '.join(_ACCEPTS)}, got {self.verdict!r}")

    def agrees(self, verdict: str) -> bool | None:
        """Whether a simulator verdict agrees with the catalogue's; None when the catalogue has none."""
        accepts = _ACCEPTS[self.verdict]
        return None if accepts is None else verdict in accepts


@dataclass(frozen=True, kw_only=True)
class Bet:
    """One catalogue bet (or one of the simulator's own experiments), runnable."""

    number: int
    slug: str  # the file name's tail: 31 + "model_soup" -> 31_model_soup.json
    title: str
    question: str
    setup: str
    criteria: Criteria
    catalogue: CatalogueResult
    judge: Callable[[Mapping[str, Any]], str]  # measurements -> one of VERDICTS, pure
    measure: Callable[[BetContext], dict]  # runs the experiment
    key_figures: Callable[[Mapping[str, Any]], str]  # one line for the summary table
    in_catalogue: bool = True  # False for the simulator's own experiments (numbered from 100)
    notes: tuple[str, ...] = ()  # where our setup differs from the catalogue's, and its inconsistencies

    def __post_init__(self) -> None:
        if isinstance(self.number, bool) or not isinstance(self.number, int) or self.number < 1:
            raise BetError(f"bet number must be a positive integer, got {self.number!r}")
        if not _SLUG_RE.match(self.slug):
            raise BetError(f"bet slug must be lower_snake_case, got {self.slug!r}")
        if not self.in_catalogue and self.number < 100:
            raise BetError(f"bet {self.number}: the simulator's own experiments are numbered from 100")

    @property
    def name(self) -> str:
        """``NN_slug``, as the seeds name result files (e.g. 31_model_soup)."""
        return f"{self.number:02d}_{self.slug}"

    def verdict(self, measurements: Mapping[str, Any]) -> str:
        """The verdict the criteria give these measurements."""
        v = self.judge(measurements)
        if v not in VERDICTS:
            raise BetError(f"bet {self.name}: judge returned {v!r}, not one of {', '.join(VERDICTS)}")
        return v

    def listing(self) -> dict[str, Any]:
        """What ``--list --json`` shows for this bet."""
        return {"bet": self.number, "name": self.name, "title": self.title, "question": self.question,
                "in_catalogue": self.in_catalogue, "catalogue_verdict": self.catalogue.verdict}


# ---- helpers the judges share ----------------------------------------------------------------------

def need(m: Mapping[str, Any], *path: str | int) -> Any:
    """``m[path[0]][path[1]]...``, or a BetError naming the missing key."""
    cur: Any = m
    for i, key in enumerate(path):
        try:
            cur = cur[key]
        except (KeyError, IndexError, TypeError):
            raise BetError(f"measurements lack {'.'.join(str(p) for p in path[:i + 1])}") from None
    return cur


def number(m: Mapping[str, Any], *path: str | int) -> float:
    """A measured number (``"inf"`` strings from JSON are read back as infinities)."""
    v = need(m, *path)
    if isinstance(v, str) and v in ("inf", "-inf", "nan"):
        return float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BetError(f"measurement {'.'.join(str(p) for p in path)} is not a number: {v!r}")
    return float(v)


def geomean(values: Iterable[float]) -> float:
    """Geometric mean (of perplexities: the perplexity of the pooled mean log-loss per text)."""
    vals = list(values)
    if not vals:
        raise BetError("geometric mean of nothing")
    if any(v <= 0 for v in vals):
        raise BetError("geometric mean needs positive values")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def ratio_verdict(ratio: float, unique_tokens: float | None, *, strict: float, lenient: float,
                  catastrophic: float, min_unique: int = 5) -> str:
    """Verdict of a "perplexity within x times the reference" bet with Bet 38's mode-collapse signal.

    CATASTROPHIC (checked first): ratio > ``catastrophic`` or fewer than ``min_unique`` unique tokens in
    the sample; STRICT: ratio <= ``strict``; LENIENT: ratio <= ``lenient``; else NEITHER.
    """
    if ratio > catastrophic or (unique_tokens is not None and unique_tokens < min_unique):
        return CATASTROPHIC
    if ratio <= strict:
        return STRICT
    if ratio <= lenient:
        return LENIENT
    return NEITHER


def versus_base_verdict(candidate: float, base: float) -> str:
    """Seed 003's Bet 55 criteria for anything that replaces the base for an unknown user.

    STRICT: candidate ppl <= 0.95 x base (>= 5% better); LENIENT: <= base; CATASTROPHIC: > base.
    (NEITHER is left only for NaN figures, which compare false both ways.)
    """
    if candidate <= 0.95 * base:
        return STRICT
    if candidate <= base:
        return LENIENT
    if candidate > base:
        return CATASTROPHIC
    return NEITHER
