"""Entropy coding of small-alphabet symbol streams (trits, mostly) with an order-0 model.

This module imports nothing else of ours. The coder is `constriction`'s ANS coder (Rust, vectorised
over whole arrays); the model is the stream's own symbol counts, stored in front of the coded words,
so the cost is n * H_empirical plus a few bytes: the counts (4 bytes per symbol of the alphabet)
and ANS's final state (at most two 32-bit words).

Layout of an encoded stream (all little-endian):

    counts   alphabet x uint32     how often each symbol occurs (they sum to n)
    words    k x uint32            the ANS coder's compressed words
"""

from __future__ import annotations

import constriction
import numpy as np


class EntropyCodingError(ValueError):
    """An entropy-coded stream does not decode to the number of symbols it claims."""


def _model(counts: np.ndarray) -> constriction.stream.model.Categorical:
    # Encoder and decoder build the model from the same integer counts with the same float
    # arithmetic, so the quantised model (and thus the code) is identical on both sides.
    probs = counts.astype(np.float64) / max(int(counts.sum()), 1)
    return constriction.stream.model.Categorical(probs, perfect=False)


def empirical_entropy_bits(symbols: np.ndarray, alphabet: int) -> float:
    """n * H(p) in bits, where p is the symbols' own frequency: the order-0 floor for coding them."""
    counts = np.bincount(np.asarray(symbols).reshape(-1), minlength=alphabet).astype(np.float64)
    n = counts.sum()
    if n == 0:
        return 0.0
    nz = counts[counts > 0]
    return float(-(nz * np.log2(nz / n)).sum())


def encode_symbols(symbols: np.ndarray, alphabet: int) -> bytes:
    """Code ``symbols`` (ints in [0, alphabet)) with their own order-0 model; see the module layout."""
    sym = np.ascontiguousarray(np.asarray(symbols).reshape(-1), dtype=np.int32)
    if sym.size and (int(sym.min()) < 0 or int(sym.max()) >= alphabet):
        raise EntropyCodingError(f"symbols outside the alphabet [0, {alphabet})")
    counts = np.bincount(sym, minlength=alphabet).astype("<u4")
    coder = constriction.stream.stack.AnsCoder()
    if sym.size:
        coder.encode_reverse(sym, _model(counts))
    words = coder.get_compressed().astype("<u4", copy=False)
    return counts.tobytes() + words.tobytes()


def decode_symbols(data: bytes | bytearray | memoryview, n: int, alphabet: int) -> np.ndarray:
    """The ``n`` symbols coded in ``data`` as int32 (n,); EntropyCodingError if it does not fit."""
    head = 4 * alphabet
    if len(data) < head or (len(data) - head) % 4:
        raise EntropyCodingError(f"entropy-coded stream of {len(data)} bytes is malformed")
    counts = np.frombuffer(data, dtype="<u4", count=alphabet)
    if int(counts.sum(dtype=np.uint64)) != n:
        raise EntropyCodingError(f"stream counts {int(counts.sum(dtype=np.uint64))} symbols, expected {n}")
    words = np.frombuffer(data, dtype="<u4", offset=head).astype(np.uint32)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    decoder = constriction.stream.stack.AnsCoder(words)
    try:
        out = decoder.decode(_model(counts), n)
    except Exception as exc:  # noqa: BLE001 - constriction raises its own (pyo3) exception types
        raise EntropyCodingError(f"entropy-coded stream does not decode: {exc}") from None
    if not decoder.is_empty():
        raise EntropyCodingError("entropy-coded stream has data left after its last symbol")
    return out

