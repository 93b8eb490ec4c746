"""The tokenizer wrapper and the incremental decoder used to stream generated text."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from coordinator.tokens import HFTokenizer, IncrementalDecoder, load_tokenizer


def _byte_level(tmp_path=None) -> Tokenizer:
    """A byte-level BPE with no merges beyond a few: multi-byte characters span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat"] * 5, trainer=trainer)
    return tok


TOKENIZER = HFTokenizer(_byte_level())


def test_tokenizer_round_trips_and_loads_from_file(tmp_path):
    text = "the café – ok 🙂"
    assert TOKENIZER.decode(TOKENIZER.encode(text)) == text
    assert TOKENIZER.token_id("<|endoftext|>") == 0 and TOKENIZER.token_id("nope") is None
    path = tmp_path / "tokenizer.json"
    _byte_level().save(str(path))
    loaded = load_tokenizer(path)
    assert loaded.encode(text) == TOKENIZER.encode(text) and loaded.vocab_size == TOKENIZER.vocab_size


def test_a_split_character_is_held_back_until_complete():
    ids = TOKENIZER.encode("é")
    assert len(ids) == 2  # two UTF-8 bytes, two tokens
    dec = IncrementalDecoder(TOKENIZER)
    assert dec.push(ids[0]) == ""
    assert dec.push(ids[1]) == "é"


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=40))
def test_pieces_concatenate_to_the_decoded_text(text):
    ids = TOKENIZER.encode(text)
    dec = IncrementalDecoder(TOKENIZER)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == TOKENIZER.decode(ids) == text
