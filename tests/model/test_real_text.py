"""The built-in real prose (reference documentation and docstrings): split by document, zlib's bar."""

from __future__ import annotations

import zlib

import pytest

from model.corpora import REFERENCE, persona_source, reference_source, zlib_bpc
from model.real_text import is_eval_doc
from model.text_sources import CorpusError


def test_no_document_lies_in_both_splits():
    src = reference_source(0)
    assert src.train_docs and src.eval_docs
    assert not set(src.train_docs) & set(src.eval_docs)
    assert set(src.eval_docs) == set(reference_source(7).eval_docs)  # the seed orders, never re-splits
    assert {d.split(":")[0] for d in src.train_docs} == {"topic", "doc"}  # both kinds of prose are used


def test_reference_split_agrees_with_stdlib_split():
    """A source file held out of stdlib has its docstrings held out of reference too."""
    ref, std = reference_source(0), persona_source("stdlib", 0)
    held_files = {d.partition(":")[2] for d in ref.eval_docs if d.startswith("doc:")}
    assert held_files == set(std.eval_files)
    assert all(is_eval_doc(f) for f in held_files)


def test_reference_text_is_english_prose_and_deterministic():
    src = reference_source(0)
    text = src.text("train", 50_000)
    assert len(text) == 50_000 and text == reference_source(0).text("train", 50_000)
    words = text.split()
    assert sum(w.lower() in {"the", "a", "of", "is", "to"} for w in words) / len(words) > 0.05
    assert src.name == REFERENCE and src.floor_bpc is None


def test_zlib_bpc_is_zlib_level_9():
    text = reference_source(0).text("eval", 5000)
    c = zlib.compressobj(level=9)
    independent = len(c.compress(text.encode("utf-8")) + c.flush()) * 8 / len(text)
    assert zlib_bpc(text) == pytest.approx(independent, abs=1e-12)
    assert zlib_bpc("ab" * 5000) < 0.1  # a repetitive text compresses far below 8 bits a character
    with pytest.raises(CorpusError):
        zlib_bpc("")
