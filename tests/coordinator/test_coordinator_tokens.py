"""The tokenizer wrapper and the incremental decoder used to stream generated text."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from coordinator.tokens import HFTokenCodec, IncrementalDecoder, load_token_codec


def _byte_level(tmp_path=None) -> Tokenizer:
    """A byte-level BPE with no merges beyond a few: multi-byte characters span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat"] * 5, trainer=trainer)
    return tok


CODEC = HFTokenCodec(_byte_level())


def test_codec_round_trips_and_loads_from_file(tmp_path):
    text = "the café – ok 🙂"
    assert CODEC.decode(CODEC.encode(text)) == text
    assert CODEC.token_id("<|endoftext|>") == 0 and CODEC.token_id("nope") is None
    path = tmp_path / "tokenizer.json"
    _byte_level().save(str(path))
    loaded = load_token_codec(path)
    assert loaded.encode(text) == CODEC.encode(text) and loaded.vocab_size == CODEC.vocab_size


def test_a_split_character_is_held_back_until_complete():
    ids = CODEC.encode("é")
    assert len(ids) == 2  # two UTF-8 bytes, two tokens
    dec = IncrementalDecoder(CODEC)
    assert dec.push(ids[0]) == ""
    assert dec.push(ids[1]) == "é"


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=40))
def test_pieces_concatenate_to_the_decoded_text(text):
    ids = CODEC.encode(text)
    dec = IncrementalDecoder(CODEC)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == CODEC.decode(ids) == text
