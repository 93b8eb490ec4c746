"""The text-source contract every corpus implements, and the checks they share.

A source has a train split and an independent eval split; real sources split by document, so no
document lies in both. This module imports nothing else of ours.
"""

from __future__ import annotations

import abc
import zlib
from dataclasses import dataclass

SPLITS = ("train", "eval")


class CorpusError(ValueError):
    """A corpus cannot be built or read: unknown persona or split, missing, empty or unreadable folder."""


def stable_hash(text: str) -> int:
    """A 32-bit hash that, unlike ``hash()``, is the same in every process."""
    return zlib.crc32(text.encode("utf-8"))


def check_split(split: str, n_chars: int) -> None:
    """CorpusError unless ``split`` is a known split and ``n_chars`` a non-negative integer."""
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if isinstance(n_chars, bool) or not isinstance(n_chars, int) or n_chars < 0:
        raise CorpusError(f"n_chars must be a non-negative integer, got {n_chars!r}")


def check_seed(seed: int) -> None:
    """CorpusError unless ``seed`` is a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CorpusError(f"seed must be a non-negative integer, got {seed!r}")


def zlib_bpc(text: str) -> float:
    """zlib (level 9) on ``text``'s UTF-8 bytes, in bits per character: the bar a language model of
    real text must beat (a model that compresses worse than zlib is not a model of that text)."""
    if not text:
        raise CorpusError("zlib_bpc of an empty text")
    return len(zlib.compress(text.encode("utf-8"), 9)) * 8 / len(text)


@dataclass(frozen=True, kw_only=True)
class TextSource(abc.ABC):
    """A stream of text for one persona or user, with a train split and an independent eval split."""

    name: str  # "programmer" (a persona), "programmer-0" (a user), or a --corpus sub-folder's name
    persona: str
    floor_bpc: float | None  # exact entropy rate in bits per character; None for real text

    @abc.abstractmethod
    def text(self, split: str, n_chars: int) -> str:
        """Deterministic text of the split ("train" or "eval"): exactly ``n_chars`` characters for a
        synthetic source; at most ``n_chars`` for real text (fewer when the split holds less)."""

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A short stable digest of everything the text depends on, for cache keys."""


