"""The coordinator's view of the tokenizer: text to token ids and back.

The coordinator takes any object with ``encode(text) -> list[int]``, ``decode(ids) -> str`` and
``vocab_size`` (dependency injection, so tests can pass their own); :func:`load_tokenizer` wraps
a ``tokenizer.json`` (what model/tokenizer.py writes) loaded with ``tokenizers.Tokenizer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import tokenizers


class Tokenizer(Protocol):
    """What the coordinator needs of a tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    def token_id(self, token: str) -> int | None:
        """Id of a special token, or None."""


class HFTokenizer:
    """A :class:`Tokenizer` over a ``tokenizers.Tokenizer``."""

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens kept, so decode(encode(t)) == t for byte-level BPE)."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        """Id of ``token`` or None."""
        return self._tok.token_to_id(token)


def load_tokenizer(path: str | Path) -> HFTokenizer:
    """The tokenizer saved at ``path`` (a tokenizer.json); ValueError with a one-line message
    naming the path when it is missing or not a tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer {path}: no such file (the models' tokenizer.json; see --help)")
    try:
        return HFTokenizer(tokenizers.Tokenizer.from_file(str(path)))
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        raise ValueError(f"tokenizer {path} is not a tokenizer.json: {str(err).splitlines()[0]}") from None


class IncrementalDecoder:
    """Turns generated ids into text pieces whose concatenation is decode(all ids).

    Byte-level tokens can split a UTF-8 character; a piece is held back while the decoded text
    ends in an incomplete character (U+FFFD) and released with the token that completes it.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        """The new text that ``token_id`` completes (possibly empty)."""
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def flush(self) -> str:
        """Whatever is still held back, at the end of generation."""
        return self._take(self._tokenizer.decode(self._ids))

    def _take(self, text: str) -> str:
        # Byte-level decoding of a longer sequence extends the shorter one's complete text.
        piece = text[len(self._emitted):]
        self._emitted = text
        return piece
