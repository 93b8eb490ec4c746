"""Within-expert compression codecs: how one weight tensor becomes bytes, and back.

Compression happens only *within* experts; no codec ever merges, drops or averages an expert.
Every codec works on a tensor viewed as a matrix (R, K) (R = its first dimension; a vector is one
row) and is vectorised over whole tensors: no Python loop runs per weight.

Codecs (names are used on the command line and in bundles) and what each guarantees on decode
(w the input as float32, w' the decoded tensor):

    fp32                lossless: w' == w
    fp16                |w' - w| <= 2**-11 |w| + 2**-25   (round to nearest half; |w| <= 65504)
    int8                per-row absmax scale s_r = max_k |w_rk| / 127; |w' - w| <= s_r / 2
    ternary             absmean scale s_g per group of rows (TERNARY_GROUP_ROWS; default: one per
                        matrix), w' = s_g * clip(round(w / s_g), -1, 1): 1.58-bit weights, packed
                        5 trits per byte (1.6 bits per weight + 4 bytes per scale)
    ternary-ec          the same trits, entropy-coded (ANS, order-0 model): within a fraction of a
                        percent of the trits' empirical entropy n * H(p)
    prune50             the floor(n/2) smallest |w| become 0 (ties broken by position); the rest
                        are kept in fp16 (bound as fp16); the mask costs 1 bit per weight
    prune50+int8        prune50's mask, kept values in int8 with the per-row absmax of the kept ones
    prune50+ternary     pruned weights are trit 0; the absmean scale is taken over the kept weights
    prune50+ternary-ec  the same trits, entropy-coded (they are >= 50 % zeros: ~1.5 bits per weight)

Payloads are self-describing given (codec, shape, meta); all numbers little-endian. The layouts are
documented byte by byte in docs/bundle-format.md (section "Codec payloads").
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from .config import ModelConfig
from .entropy_coding import EntropyCodingError, decode_symbols, encode_symbols
from .fractal_moe import expert_of

CODECS: tuple[str, ...] = (
    "fp32", "fp16", "int8", "ternary", "ternary-ec",
    "prune50", "prune50+int8", "prune50+ternary", "prune50+ternary-ec",
)
LOSSLESS_CODECS: tuple[str, ...] = ("fp32",)
TERNARY_CODECS: tuple[str, ...] = ("ternary", "ternary-ec", "prune50+ternary", "prune50+ternary-ec")
# Codecs whose decode checks its scales, so that every decoded weight is finite (|q| <= 127 or a
# trit, times a scale s with 127 s finite): a decoded tensor of these needs no pass of its own.
FINITE_CODECS: tuple[str, ...] = ("int8", "prune50+int8") + TERNARY_CODECS

# One absmean scale per matrix. Measured (docs/bundle-format.md, "Choosing the ternary scale"):
# per-block-of-rows scales barely change the reconstruction error of expert matrices, and their
# 4 bytes per block push a 256x1024 matrix past the 1.61 bits-per-weight budget.
TERNARY_GROUP_ROWS: int | None = None

FP16_MAX = 65504.0

_Buffer = bytes | bytearray | memoryview  # a payload: bytes, or a view of the bytes a bundle reader received


class CodecError(ValueError):
    """A tensor cannot be encoded with a codec, or a payload does not decode."""


class EncodedRecord(Protocol):
    """What decoding reads: an :class:`EncodedTensor`, or a bundle's record with the same fields."""

    @property
    def name(self) -> str: ...
    @property
    def codec(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def payload(self) -> _Buffer: ...
    @property
    def meta(self) -> dict: ...


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor as a codec wrote it: ``payload`` decodes back given ``codec``, ``shape`` and ``meta``."""

    name: str
    codec: str
    shape: tuple[int, ...]
    payload: bytes
    meta: dict = field(default_factory=dict)  # JSON-able; empty for most codecs

    @property
    def numel(self) -> int:
        """Number of weights the payload decodes to."""
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        """Payload bits (scales included) per decoded weight."""
        return 8 * len(self.payload) / max(self.numel, 1)


@dataclass(frozen=True)
class _Spec:
    prune: bool
    values: str  # how the (kept) values are stored: fp32, fp16, int8, ternary, ternary-ec


_SPECS: dict[str, _Spec] = {
    "fp32": _Spec(prune=False, values="fp32"),
    "fp16": _Spec(prune=False, values="fp16"),
    "int8": _Spec(prune=False, values="int8"),
    "ternary": _Spec(prune=False, values="ternary"),
    "ternary-ec": _Spec(prune=False, values="ternary-ec"),
    "prune50": _Spec(prune=True, values="fp16"),
    "prune50+int8": _Spec(prune=True, values="int8"),
    "prune50+ternary": _Spec(prune=True, values="ternary"),
    "prune50+ternary-ec": _Spec(prune=True, values="ternary-ec"),
}


def _spec(codec: str) -> _Spec:
    try:
        return _SPECS[codec]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}") from None


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(R, K): rows are the first dimension; a scalar or a vector is a single row."""
    n = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (n // rows if rows else 0)


# ----------------------------------------------------------------------------- quantisation rules
# These functions are the codecs' arithmetic, shared by the encoders and by fake_quantise (which
# the quantisation-aware fine-tune uses), so a fine-tuned model's forward pass sees exactly the
# weights its bundle decodes to.

def prune_keep_mask(w: torch.Tensor) -> torch.Tensor:
    """Bool mask of w's shape keeping the n - floor(n/2) largest |w| (ties prune the earlier position)."""
    flat = w.detach().reshape(-1).abs()  # (n,)
    n_prune = flat.numel() // 2
    if n_prune == 0:
        return torch.ones(w.shape, dtype=torch.bool)
    v = flat.kthvalue(n_prune).values  # the largest pruned magnitude: O(n), unlike a sort
    keep = flat > v
    ties = (flat == v).nonzero().squeeze(1)  # (m,) in position order
    keep[ties[n_prune - int((flat < v).sum()):]] = True  # the first ties are pruned, the rest kept
    return keep.view(w.shape)


def _group_ids(rows: int, group_rows: int | None) -> tuple[torch.Tensor, int]:
    g = rows if not group_rows else min(group_rows, rows)
    ids = torch.arange(rows) // max(g, 1)  # (R,)
    return ids, (int(ids[-1]) + 1 if rows else 0)


def ternarise(w: torch.Tensor, keep: torch.Tensor | None = None,
              group_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The absmean rule: trits (R, K) int8 in {-1, 0, 1} and scales (G,) float32 of w (R, K).

    s_g = mean |w| over group g's (kept) weights; trit = clip(round(w / s_g), -1, 1); unkept
    weights are trit 0. ``group_rows`` rows share a scale (None: the whole matrix).
    """
    w = w.detach().float()
    ids, G = _group_ids(w.shape[0], group_rows)
    if keep is None and G == 1:  # the common case, lean because QAT runs it on every forward
        scales = (w.abs().sum(dtype=torch.float64) / max(w.numel(), 1)).float().reshape(1)  # (1,)
    else:
        # float64 sums keep the scale independent of summation order
        k = torch.ones_like(w, dtype=torch.bool) if keep is None else keep
        a = torch.where(k, w.abs(), 0.0).double()  # (R, K)
        sums = torch.zeros(G, dtype=torch.float64).index_add_(0, ids, a.sum(1))  # (G,)
        counts = torch.zeros(G, dtype=torch.float64).index_add_(0, ids, k.sum(1).double())  # (G,)
        scales = torch.where(counts > 0, sums / counts.clamp_min(1), 0.0).float()  # (G,)
    row_scale = scales[ids][:, None] if G > 1 else scales[:, None]  # (R, 1) or (1, 1)
    trits = torch.round(w / torch.where(row_scale > 0, row_scale, 1.0)).clamp_(-1, 1)  # (R, K)
    if keep is not None:
        trits = torch.where(keep, trits, 0.0)
    return trits.to(torch.int8), scales


def int8_rows(w: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8: q (R, K) int8 in [-127, 127] and scales (R,) float32 of w (R, K)."""
    w = w.detach().float()
    kept = w if keep is None else torch.where(keep, w, 0.0)
    scales = kept.abs().amax(dim=1) / 127.0  # (R,)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]  # (R, 1)
    q = torch.round(kept / safe).clamp_(-127, 127).to(torch.int8)  # (R, K)
    return q, scales.float()


def _check_fp16_range(name: str, w: torch.Tensor) -> None:
    if w.numel() and float(w.abs().max()) > FP16_MAX:
        raise CodecError(f"tensor {name!r} has values beyond the fp16 range (|w| > {FP16_MAX:g})")


def fake_quantise(t: torch.Tensor, codec: str) -> torch.Tensor:
    """What ``decode_tensor(encode_tensor(_, t, codec))`` returns, computed without packing bytes.

    float32, t's shape; no gradient flows (wrap it in a straight-through estimator for training).
    """
    spec = _spec(codec)
    with torch.no_grad():
        w = t.detach().float().reshape(_matrix_shape(tuple(t.shape)))  # (R, K)
        if w.numel() == 0:
            return w.reshape(t.shape).clone()
        keep = prune_keep_mask(w) if spec.prune else None
        if spec.values == "fp32":
            out = w.clone()
        elif spec.values == "fp16":
            out = w.half().float()
        elif spec.values == "int8":
            q, s = int8_rows(w, keep)
            out = q.float() * s[:, None]
        else:
            trits, s = ternarise(w, keep, TERNARY_GROUP_ROWS)
            out = trits.float() * s[_group_ids(w.shape[0], TERNARY_GROUP_ROWS)[0]][:, None]
        if keep is not None:
            out = torch.where(keep, out, 0.0)
        return out.reshape(t.shape)


# ----------------------------------------------------------------------------- bit packing

_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)
# _TRIT_LUT[b, k] is trit k (least significant first) of byte b; bytes 243..255 never occur.
_TRIT_LUT = ((torch.arange(256)[:, None] // _POW3.long()) % 3 - 1).float()  # (256, 5)
_TRIT_VALUES = torch.tensor([-1.0, 0.0, 1.0])  # symbol (trit + 1) -> trit


def pack_trits(trits: torch.Tensor) -> bytes:
    """5 trits per byte, base 3, first trit least significant; the tail is padded with trit 0."""
    d = trits.reshape(-1).to(torch.int16) + 1  # (n,) digits in {0, 1, 2}
    pad = (-d.numel()) % 5
    if pad:
        d = torch.cat([d, torch.ones(pad, dtype=torch.int16)])
    return (d.view(-1, 5) * _POW3).sum(1).to(torch.uint8).numpy().tobytes()


def _trit_bytes(buf: _Buffer, offset: int, n: int) -> torch.Tensor:
    b = _read_only(buf, torch.uint8, -(-n // 5), offset)  # n > 0 here
    if int(b.max()) > 242:
        raise CodecError("packed trits hold a byte above 242 (3**5 - 1): the payload is corrupt")
    return b


def unpack_trits(buf: _Buffer, offset: int, n: int, scale: float = 1.0) -> torch.Tensor:
    """(n,) float32 trits times ``scale`` from ``ceil(n/5)`` packed bytes at ``offset`` of ``buf``."""
    b = _trit_bytes(buf, offset, n)
    lut = _TRIT_LUT if scale == 1.0 else _TRIT_LUT * scale  # (256, 5): one gather decodes and scales
    return torch.index_select(lut, 0, b.long()).view(-1)[:n]


def _pack_mask(keep: torch.Tensor) -> bytes:
    return np.packbits(keep.reshape(-1).numpy(), bitorder="little").tobytes()


def _kept_positions(buf: _Buffer, n: int) -> torch.Tensor:
    """(n,) int32: for each weight, 1 + its index among the kept values, or 0 if pruned.

    A prefix sum over the unpacked mask turns the scatter of kept values into one gather from
    [0, v_0, v_1, ...]: about twice as fast as a masked scatter.
    """
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8, count=-(-n // 8)), count=n, bitorder="little")  # (n,)
    pos = np.cumsum(bits, dtype=np.int32)  # numpy's prefix sum is ~2x torch's on CPU
    pos *= bits
    return torch.from_numpy(pos)


def _gather_kept(pos: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(n,) of kept's dtype: kept values where pos > 0, zero elsewhere."""
    table = torch.cat([torch.zeros(1, dtype=kept.dtype), kept])  # (1 + n_kept,)
    return torch.index_select(table, 0, pos)


_FRESH_OUTPUT = frozenset({"int8", "ternary", "ternary-ec"})  # values whose decode allocates its output


def _read_only(buf: _Buffer, dtype: torch.dtype, count: int, offset: int = 0) -> torch.Tensor:
    """(count,) of ``dtype`` over ``buf``'s bytes, no copy; only read: decoders never write through it.

    torch warns once per process that a read-only buffer (a received chunk's bytes) makes a tensor
    it could write to; nothing here writes, so the warning is silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)


def _f32(buf: _Buffer, offset: int, count: int) -> torch.Tensor:
    """(count,) float32 scales copied out of ``buf`` (a few bytes; aligned, whatever their offset)."""
    if not count:
        return torch.zeros(0)
    return torch.from_numpy(np.frombuffer(buf, dtype=np.float32, count=count, offset=offset).copy())


def _scales(e: EncodedRecord, buf: _Buffer, offset: int, count: int, bound: float) -> torch.Tensor:
    """(count,) scales; CodecError unless ``bound`` (the largest |value| they multiply) times each is
    finite, so that every decoded weight is."""
    s = _f32(buf, offset, count)
    if not bool(torch.isfinite(s * bound).all()):
        raise CodecError(f"tensor {e.name!r}: a scale is not finite, or {bound:g} times it overflows: "
                         f"the payload is corrupt")
    return s


# ----------------------------------------------------------------------------- encode / decode

def _encode_values(name: str, w: torch.Tensor, keep: torch.Tensor | None, values: str) -> tuple[bytes, dict]:
    """Payload and meta of w (R, K) float32 with the kept weights stored as ``values``."""
    mask = _pack_mask(keep) if keep is not None else b""
    if values == "fp32":
        return w.numpy().tobytes(), {}
    if values == "fp16":
        kept = w if keep is None else w[keep]
        _check_fp16_range(name, kept)
        return mask + kept.half().numpy().tobytes(), {}
    if values == "int8":
        q, s = int8_rows(w, keep)
        q = q if keep is None else q[keep]
        return mask + s.numpy().tobytes() + q.numpy().tobytes(), {}
    trits, s = ternarise(w, keep, TERNARY_GROUP_ROWS)
    meta = {"group_rows": TERNARY_GROUP_ROWS} if TERNARY_GROUP_ROWS and w.shape[0] > TERNARY_GROUP_ROWS else {}
    if values == "ternary":
        return s.numpy().tobytes() + pack_trits(trits), meta
    return s.numpy().tobytes() + encode_symbols((trits.reshape(-1) + 1).numpy(), 3), meta


def encode_tensor(name: str, t: torch.Tensor, codec: str) -> EncodedTensor:
    """Encode one tensor with ``codec``; CodecError for an unknown codec or a value it cannot hold."""
    spec = _spec(codec)
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise CodecError(f"tensor {name!r} must be a floating-point torch.Tensor")
    shape = tuple(int(d) for d in t.shape)
    w = t.detach().to("cpu", torch.float32).contiguous().reshape(_matrix_shape(shape))  # (R, K)
    if w.numel() == 0:
        return EncodedTensor(name, codec, shape, b"", {})
    if not bool(torch.isfinite(w).all()):
        raise CodecError(f"tensor {name!r} has non-finite values")
    keep = prune_keep_mask(w) if spec.prune else None
    payload, meta = _encode_values(name, w, keep, spec.values)
    return EncodedTensor(name, codec, shape, payload, meta)


def _expected_length(codec: str, rows: int, n: int, groups: int) -> int | None:
    """Payload bytes of a fixed-size codec; None for the entropy-coded ones (variable)."""
    mask, kept = -(-n // 8), n - n // 2
    return {
        "fp32": 4 * n, "fp16": 2 * n, "int8": 4 * rows + n, "ternary": 4 * groups + -(-n // 5),
        "prune50": mask + 2 * kept, "prune50+int8": mask + 4 * rows + kept,
        "prune50+ternary": 4 * groups + -(-n // 5),
    }.get(codec)


def _group_rows_of(e: EncodedRecord) -> int | None:
    g = e.meta.get("group_rows") if isinstance(e.meta, Mapping) else None
    if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
        raise CodecError(f"tensor {e.name!r}: meta group_rows must be a positive int, got {g!r}")
    return g


def decode_tensor(e: EncodedRecord) -> torch.Tensor:
    """The float32 tensor an EncodedTensor (or any record with name/codec/shape/payload/meta) holds."""
    spec = _spec(e.codec)
    shape = tuple(int(d) for d in e.shape)
    if any(not 0 <= d < 2**31 for d in shape):
        raise CodecError(f"tensor {e.name!r}: shape {list(shape)} is out of range")
    rows, cols = _matrix_shape(shape)
    n = rows * cols
    if n == 0:
        if len(e.payload):
            raise CodecError(f"tensor {e.name!r}: an empty tensor must have an empty payload")
        return torch.zeros(shape)
    group_rows = _group_rows_of(e)
    ids, groups = _group_ids(rows, group_rows)
    expected = _expected_length(e.codec, rows, n, groups)
    if expected is not None and len(e.payload) != expected:
        raise CodecError(f"tensor {e.name!r}: payload of {len(e.payload)} bytes, codec {e.codec} "
                         f"expects {expected} for shape {list(shape)}")
    # int8 and ternary build their output in fresh memory: they read the payload in place (a view
    # of the received bytes, no copy). fp32 and fp16 decode to tensors over the buffer: one copy,
    # so that decoded tensors own writable memory.
    buf = e.payload if spec.values in _FRESH_OUTPUT else bytearray(e.payload)
    try:
        out = _decode_values(e, buf, spec, rows, cols, ids, groups)
    except EntropyCodingError as exc:
        raise CodecError(f"tensor {e.name!r}: {exc}") from None
    return out.view(shape)


def _decode_values(e: EncodedRecord, buf: _Buffer, spec: _Spec, rows: int, cols: int,
                   ids: torch.Tensor, groups: int) -> torch.Tensor:
    n = rows * cols
    at = 0
    pos = None
    if spec.prune and spec.values in ("fp16", "int8"):
        pos = _kept_positions(buf, n)  # (n,)
        at = -(-n // 8)
        if int(pos.max()) != n - n // 2:
            raise CodecError(f"tensor {e.name!r}: pruning mask keeps {int(pos.max())} of {n}, not {n - n // 2}")
    if spec.values == "fp32":
        return torch.frombuffer(buf, dtype=torch.float32, count=n)
    if spec.values == "fp16":
        vals = torch.frombuffer(buf, dtype=torch.float16, count=n if pos is None else n - n // 2, offset=at)
        return vals.float() if pos is None else _gather_kept(pos, vals.float())
    if spec.values == "int8":
        s = _scales(e, buf, at, rows, 127.0)
        q = _read_only(buf, torch.int8, n if pos is None else n - n // 2, at + 4 * rows)
        if pos is not None:
            q = _gather_kept(pos, q)
        # int8 -> float32 is exact, so float(q) * s rounds once, as q * s does; a same-dtype
        # in-place multiply is vectorised, the mixed-dtype one is not (~2x slower)
        return q.view(rows, cols).float().mul_(s[:, None]).view(-1)
    s = _scales(e, buf, 0, groups, 1.0)
    scale = float(s[0]) if groups == 1 else 1.0  # one scale: fold it into the lookup table
    if spec.values == "ternary":
        out = unpack_trits(buf, 4 * groups, n, scale)
    else:
        sym = torch.from_numpy(decode_symbols(memoryview(buf)[4 * groups:], n, 3))  # (n,) in {0, 1, 2}
        out = torch.index_select(_TRIT_VALUES * scale, 0, sym.long())
    if groups > 1:
        out = out.view(rows, cols).mul_(s[ids][:, None]).view(-1)
    return out


# ----------------------------------------------------------------------------- state dicts

def codec_for(name: str, *, expert_codec: str, other_codec: str = "fp16") -> str:
    """The codec a parameter ships in: ``expert_codec`` for expert matrices, ``other_codec`` otherwise."""
    return expert_codec if expert_of(name) is not None else other_codec


def encode_state_dict(sd: Mapping[str, torch.Tensor], *, expert_codec: str,
                      other_codec: str = "fp16") -> list[EncodedTensor]:
    """Every tensor of ``sd`` encoded, in ``sd``'s order: experts with ``expert_codec``, the rest ``other_codec``."""
    _spec(expert_codec)
    _spec(other_codec)
    return [encode_tensor(k, v, codec_for(k, expert_codec=expert_codec, other_codec=other_codec))
            for k, v in sd.items()]


def bundle_meta(cfg: ModelConfig, *, model: str, expert_codec: str, other_codec: str, preset: str | None = None,
                seed: int | None = None) -> dict:
    """The metadata of a model bundle: the model's name, the codecs, its shape (``model_config``, what
    ``node.assembly.config_from_meta`` reads back) and, when known, the preset and seed it came from."""
    meta: dict[str, object] = {"model": model, "expert_codec": expert_codec, "other_codec": other_codec,
            "model_config": dataclasses.asdict(cfg)}
    if preset is not None:
        meta["preset"] = preset
    if seed is not None:
        meta["seed"] = seed
    return meta


def decode_state_dict(entries: Iterable[EncodedTensor]) -> dict[str, torch.Tensor]:
    """{name: float32 tensor} of encoded entries; CodecError on a name that appears twice."""
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        if e.name in out:
            raise CodecError(f"tensor {e.name!r} appears twice")
        out[e.name] = decode_tensor(e)
    return out


def expert_tensors(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The expert matrices of ``sd`` (blocks.B.moe.experts.E.*); a CodecError when it holds none."""
    experts = {k: v for k, v in sd.items() if expert_of(k) is not None}
    if not experts:
        raise CodecError("the state dict holds no expert tensors (blocks.B.moe.experts.E.*)")
    return experts


def codec_sizes(sd: Mapping[str, torch.Tensor], codecs: Iterable[str] = CODECS, *,
                other_codec: str = "fp16") -> dict[str, dict]:
    """Size of the whole model under each codec, measured by encoding it.

    {codec: {"bytes": payload bytes of every tensor (experts in ``codec``, the rest in
    ``other_codec``; scales included, bundle framing not: proto.bundle.bundle_size adds it),
    "bits_per_expert_weight": expert payload bits / expert weights}}.
    """
    experts = expert_tensors(sd)
    n_expert = sum(v.numel() for v in experts.values())
    other = sum(len(encode_tensor(k, v, other_codec).payload) for k, v in sd.items() if k not in experts)
    sizes: dict[str, dict] = {}
    for codec in codecs:
        expert_bytes = sum(len(encode_tensor(k, v, codec).payload) for k, v in experts.items())
        sizes[codec] = {"bytes": other + expert_bytes, "bits_per_expert_weight": 8 * expert_bytes / n_expert}
    return sizes
