"""The federation's tokenizer: byte-level BPE trained locally with the `tokenizers` library.

Byte-level means any UTF-8 text encodes (no unknown token) and decode(encode(text)) == text.
Training is deterministic for the same texts and vocabulary size, and the result is cached as
tokenizer.json, which is also what the coordinator and nodes load.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on ``texts``."""
    tok = Tokenizer(models.BPE())
    # use_regex=True splits on GPT-2's pattern first, so merges never cross word boundaries
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json written by :func:`save_tokenizer`."""
    return Tokenizer.from_file(str(path))


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write ``tok`` atomically as JSON."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(path)


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text``."""
    return tok.encode(text).ids


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Text of token ids (exact inverse of :func:`encode` for byte-level BPE)."""
    return tok.decode(list(ids), skip_special_tokens=False)
