"""How fast each codec encodes and decodes a model's expert matrices, beside a plain copy
(the figures docs/bundle-format.md reports)."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import torch

from .codecs import CODECS, CodecError, EncodedTensor, decode_tensor, encode_tensor, expert_tensors

_T = TypeVar("_T")


def _encode_all(tensors: Mapping[str, torch.Tensor], codec: str) -> list[EncodedTensor]:
    """Every tensor of ``tensors`` encoded with ``codec``, in order."""
    return [encode_tensor(k, v, codec) for k, v in tensors.items()]


def _decode_all(encoded: Iterable[EncodedTensor]) -> list[torch.Tensor]:
    """Every tensor of ``encoded`` decoded, in order."""
    return [decode_tensor(e) for e in encoded]


def _timed(fn: Callable[[], _T], repeats: int) -> tuple[float, _T]:
    """Best wall time of ``repeats`` (>= 1) calls, and the last call's result."""
    t0 = time.perf_counter()
    result = fn()
    best = time.perf_counter() - t0
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def codec_throughput(sd: Mapping[str, torch.Tensor], codecs: Iterable[str] = CODECS, *,
                     repeats: int = 3) -> dict[str, dict[str, float]]:
    """Encode and decode speed of the expert tensors of ``sd`` per codec, beside a plain copy.

    Figures are MB/s (1e6 bytes) of *decoded float32* and the best of ``repeats`` passes over all
    expert tensors; "copy_MBps" clones the same decoded tensors (fresh memory each, as decode gets),
    "decode_over_copy" is the ratio (goal: >= 0.25).
    {codec: {"encode_MBps", "decode_MBps", "copy_MBps", "decode_over_copy", "bits_per_weight"}}
    """
    if repeats < 1:
        raise CodecError(f"repeats must be >= 1, got {repeats}")
    experts = {k: v.detach().float().contiguous() for k, v in expert_tensors(sd).items()}
    mb = sum(v.numel() for v in experts.values()) * 4 / 1e6
    result: dict[str, dict[str, float]] = {}
    for codec in codecs:
        enc_s, encoded = _timed(functools.partial(_encode_all, experts, codec), repeats)
        copy_s = dec_s = math.inf
        _decode_all(encoded)  # warm-up: the allocator's first pages cost page faults
        for _ in range(repeats):  # interleaved, so a busy machine slows both alike
            copy_s = min(copy_s, _timed(lambda: [v.clone() for v in experts.values()], 1)[0])
            dec_s = min(dec_s, _timed(functools.partial(_decode_all, encoded), 1)[0])
        result[codec] = {
            "encode_MBps": mb / enc_s, "decode_MBps": mb / dec_s, "copy_MBps": mb / copy_s,
            "decode_over_copy": copy_s / dec_s,
            "bits_per_weight": 8 * sum(len(e.payload) for e in encoded) / (mb * 1e6 / 4),
        }
    return result

