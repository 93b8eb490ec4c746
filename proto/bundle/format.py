"""The bundle format, version 2: fixed header, JSON manifest, payload (docs/bundle-format.md).

    offset  size  field
    0       8     magic             89 46 46 42 0D 0A 1A 0A  ("\\x89FFB\\r\\n\\x1a\\n")
    8       2     version           uint16 LE, = 2 (1 is still read)
    10      2     flags             uint16 LE, = 0 (reserved)
    12      4     manifest_length   uint32 LE, M
    16      8     payload_length    uint64 LE, P
    24      4     header_crc32      zlib crc32 of bytes 0..23
    28      32    manifest_sha256   sha256 of the M manifest bytes
    60      M     manifest          UTF-8 JSON (below)
    60+M    P     payload           the tensors' payloads, back to back, in manifest order

Manifest: {"meta": {...}, "tensors": [{"name", "codec", "shape", "dtype", "meta", "offset",
"length", "blake3"}, ...]} where offset is relative to the payload start and blake3 is the hex
BLAKE3-256 digest of that tensor's payload bytes. Version 1 is the same but for its tensor digest:
the key "sha256", a SHA-256 hex digest. Both are cryptographic, so the chain header -> manifest ->
tensors keeps its meaning; BLAKE3 is hashed 3-4x faster (the node verifies every byte it receives).
The bundle layer treats payloads as opaque bytes: it knows codec names only as strings the caller
may allow or refuse.
This module imports nothing else of ours.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import blake3

from .errors import (
    CorruptHeader,
    CorruptManifest,
    InvalidRecord,
    NotABundle,
    ShapeMismatch,
    UnknownCodec,
    UnknownTensor,
    UnknownVersion,
)

MAGIC = b"\x89FFB\r\n\x1a\n"
VERSION = 2
# Each version's per-tensor digest: its manifest key, which names its hash (both 256-bit hex).
TENSOR_DIGESTS = {1: "sha256", 2: "blake3"}
SUPPORTED_VERSIONS = frozenset(TENSOR_DIGESTS)
_FIXED = struct.Struct("<8sHHIQ")  # magic, version, flags, manifest_length, payload_length
_CRC = struct.Struct("<I")
HEADER_SIZE = _FIXED.size + _CRC.size + 32  # 60
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 256 * 1024  # a few hundred KiB: fastest in Python gRPC on our machines
DEFAULT_MAX_CHUNK_SIZE = 4 * 1024 * 1024  # gRPC's default message limit
# a 256-bit hex digest; one regex match, not 64 generator steps: a 1,024-node start checks ~250 k of them
_HEX64 = re.compile(r"[0-9a-f]{64}")


class TensorHash(Protocol):
    """An incremental hash of a tensor's payload (hashlib's and blake3's objects both are)."""

    def update(self, data: bytes | bytearray | memoryview, /) -> Any:
        """Hash ``data`` after what was given before."""

    def hexdigest(self) -> str:
        """The digest of everything given so far, as lowercase hex."""


def _check_version(version: int) -> None:
    if version not in TENSOR_DIGESTS:
        known = ", ".join(map(str, sorted(SUPPORTED_VERSIONS)))
        raise UnknownVersion(f"unknown version {version} (this reader knows {known})")


def tensor_hash(version: int = VERSION) -> TensorHash:
    """A fresh hash of the kind bundles of ``version`` give each tensor (1: SHA-256, 2: BLAKE3)."""
    _check_version(version)
    return hashlib.sha256() if TENSOR_DIGESTS[version] == "sha256" else blake3.blake3()


def tensor_digest(payload: bytes | bytearray | memoryview, version: int = VERSION) -> str:
    """The hex digest a version-``version`` manifest records for a tensor whose payload is ``payload``."""
    h = tensor_hash(version)
    h.update(payload)
    return h.hexdigest()


class _Shaped:
    """Mixin for records that know their decoded shape."""

    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of weights the payload decodes to."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorRecord(_Shaped):
    """One tensor as the bundle carries it: an opaque payload plus what is needed to decode it."""

    name: str
    codec: str
    shape: tuple[int, ...]
    payload: bytes | bytearray | memoryview  # a reader's records may be views of the chunks received
    meta: dict = field(default_factory=dict)
    dtype: str = "float32"  # the dtype the payload decodes to


@dataclass(frozen=True)
class ManifestEntry(_Shaped):
    """A tensor's line in the manifest: where its payload lies and what it must hash to."""

    name: str
    codec: str
    shape: tuple[int, ...]
    dtype: str
    meta: dict
    offset: int  # from the start of the payload section
    length: int
    digest: str  # hex, of the hash its manifest's version names (Manifest.tensor_hash)

    @property
    def bits_per_weight(self) -> float:
        """Payload bits per decoded weight (scales included, framing not)."""
        return 8 * self.length / max(self.numel, 1)


@dataclass(frozen=True)
class Manifest:
    """A parsed, checksum-verified header and manifest."""

    version: int
    meta: dict
    entries: tuple[ManifestEntry, ...]
    manifest_length: int
    payload_length: int

    @property
    def digest_name(self) -> str:
        """The hash of the entries' ``digest``: "blake3" (version 2) or "sha256" (version 1)."""
        return TENSOR_DIGESTS[self.version]

    def tensor_hash(self) -> TensorHash:
        """A fresh hash of the kind this manifest's entries record."""
        return tensor_hash(self.version)

    @property
    def payload_start(self) -> int:
        """Offset of the payload section in the bundle."""
        return HEADER_SIZE + self.manifest_length

    @property
    def total_size(self) -> int:
        """Size of the whole bundle in bytes."""
        return self.payload_start + self.payload_length


@dataclass(frozen=True)
class Chunk:
    """A piece of a bundle in transit: where it starts, its bytes, and (optionally) their crc32."""

    offset: int
    data: bytes
    crc32: int | None = None


@dataclass(frozen=True)
class Bundle:
    """A fully verified bundle: its metadata and every tensor record, in manifest order."""

    meta: dict
    records: tuple[TensorRecord, ...]
    version: int = VERSION  # the format it was read from (re-encoding it in that version gives its bytes back)

    def __iter__(self):
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def by_name(self) -> dict[str, TensorRecord]:
        """{name: record}."""
        return {r.name: r for r in self.records}


def _json(obj: Any) -> bytes:
    # sorted keys, no spaces: the same records always give the same bytes (content addressing)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _check_record(r: Any) -> tuple[str, str, tuple[int, ...], bytes, dict, str]:
    """(name, codec, shape, payload, meta, dtype) of a record-like object; InvalidRecord otherwise."""
    try:
        name, codec, shape, payload = r.name, r.codec, r.shape, r.payload
    except AttributeError as exc:
        raise InvalidRecord(f"invalid record: {exc}") from None
    meta = getattr(r, "meta", None) or {}
    dtype = getattr(r, "dtype", "float32")
    if not isinstance(name, str) or not name:
        raise InvalidRecord(f"invalid record: name must be a non-empty string, got {name!r}")
    if not isinstance(codec, str) or not codec:
        raise InvalidRecord(f"invalid record {name!r}: codec must be a non-empty string")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidRecord(f"invalid record {name!r}: shape must be non-negative ints, got {shape!r}")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise InvalidRecord(f"invalid record {name!r}: payload must be bytes")
    if not isinstance(meta, Mapping):
        raise InvalidRecord(f"invalid record {name!r}: meta must be a mapping")
    try:
        _json(dict(meta))
    except (TypeError, ValueError) as exc:
        raise InvalidRecord(f"invalid record {name!r}: meta is not JSON-able ({exc})") from None
    return name, codec, tuple(int(d) for d in shape), bytes(payload), dict(meta), str(dtype)


def build_manifest(records: Iterable[Any], meta: Mapping | None = None,
                   version: int = VERSION) -> tuple[bytes, list[bytes]]:
    """(manifest JSON bytes, payloads in order) for records with name/codec/shape/payload[/meta/dtype],
    as format ``version`` writes it (its tensor digest)."""
    _check_version(version)
    key = TENSOR_DIGESTS[version]
    tensors, payloads, seen, offset = [], [], set(), 0
    for r in records:
        name, codec, shape, payload, rmeta, dtype = _check_record(r)
        if name in seen:
            raise InvalidRecord(f"invalid record {name!r}: the name appears twice")
        seen.add(name)
        tensors.append({"name": name, "codec": codec, "shape": list(shape), "dtype": dtype, "meta": rmeta,
                        "offset": offset, "length": len(payload), key: tensor_digest(payload, version)})
        payloads.append(payload)
        offset += len(payload)
    try:
        manifest = _json({"meta": dict(meta or {}), "tensors": tensors})
    except (TypeError, ValueError) as exc:
        raise InvalidRecord(f"bundle meta is not JSON-able ({exc})") from None
    if len(manifest) > MAX_MANIFEST_BYTES:
        raise InvalidRecord(f"manifest of {len(manifest)} bytes exceeds {MAX_MANIFEST_BYTES}")
    return manifest, payloads


def pack_header(manifest: bytes, payload_length: int, version: int = VERSION) -> bytes:
    """The 60 header bytes for a manifest and a payload section of ``payload_length`` bytes."""
    _check_version(version)
    fixed = _FIXED.pack(MAGIC, version, 0, len(manifest), payload_length)
    return fixed + _CRC.pack(zlib.crc32(fixed)) + hashlib.sha256(manifest).digest()


@dataclass(frozen=True)
class Header:
    """The fixed header's fields, checked."""

    version: int
    manifest_length: int
    payload_length: int
    manifest_sha256: bytes


def parse_header(head: bytes | bytearray | memoryview) -> Header:
    """Check and unpack the first HEADER_SIZE bytes: magic, version, crc32, limits."""
    magic, version, flags, mlen, plen = _FIXED.unpack_from(head, 0)
    if magic != MAGIC:
        raise NotABundle(f"not a bundle: the file starts with {bytes(magic[:8]).hex()}, not the bundle magic")
    _check_version(version)
    (crc,) = _CRC.unpack_from(head, _FIXED.size)
    if zlib.crc32(bytes(head[: _FIXED.size])) != crc:
        raise CorruptHeader("corrupted header: crc32 mismatch")
    if flags:
        raise CorruptHeader(f"corrupted header: flags {flags:#06x} set, version {version} defines none")
    if mlen > MAX_MANIFEST_BYTES:
        raise CorruptHeader(f"corrupted header: manifest of {mlen} bytes exceeds {MAX_MANIFEST_BYTES}")
    return Header(version, mlen, plen, bytes(head[_FIXED.size + _CRC.size: HEADER_SIZE]))


def _entry(i: int, t: Any, offset: int, digest_key: str) -> ManifestEntry:
    if not isinstance(t, dict):
        raise CorruptManifest(f"corrupted manifest: tensor #{i} is not an object")
    try:
        name, codec, shape, dtype = t["name"], t["codec"], t["shape"], t["dtype"]
        meta, off, length, digest = t["meta"], t["offset"], t["length"], t[digest_key]
    except KeyError as exc:
        raise CorruptManifest(f"corrupted manifest: tensor #{i} lacks {exc}") from None
    ok = (isinstance(name, str) and name and isinstance(codec, str) and codec and isinstance(dtype, str)
          and isinstance(meta, dict) and isinstance(shape, list)
          and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
          and isinstance(length, int) and not isinstance(length, bool) and length >= 0
          and isinstance(digest, str) and _HEX64.fullmatch(digest) is not None)
    if not ok:
        raise CorruptManifest(f"corrupted manifest: tensor #{i} has a malformed field")
    if not isinstance(off, int) or isinstance(off, bool) or off != offset:
        raise CorruptManifest(f"corrupted manifest: tensor {name!r} starts at {off}, expected {offset}")
    return ManifestEntry(name, codec, tuple(shape), dtype, meta, off, length, digest)


def parse_manifest(header: Header, manifest: bytes | bytearray | memoryview) -> Manifest:
    """Verify the manifest's sha256 and structure; CorruptManifest otherwise."""
    if hashlib.sha256(manifest).digest() != header.manifest_sha256:
        raise CorruptManifest("corrupted manifest: sha256 mismatch")
    try:
        doc = json.loads(bytes(manifest).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptManifest(f"corrupted manifest: not JSON ({type(exc).__name__})") from None
    if not (isinstance(doc, dict) and isinstance(doc.get("tensors"), list) and isinstance(doc.get("meta", {}), dict)):
        raise CorruptManifest("corrupted manifest: expected {\"meta\": {...}, \"tensors\": [...]}")
    entries: list[ManifestEntry] = []
    seen: set[str] = set()
    offset = 0
    for i, t in enumerate(doc["tensors"]):
        e = _entry(i, t, offset, TENSOR_DIGESTS[header.version])
        if e.name in seen:
            raise CorruptManifest(f"corrupted manifest: tensor {e.name!r} appears twice")
        seen.add(e.name)
        entries.append(e)
        offset += e.length
    if offset != header.payload_length:
        raise CorruptManifest(f"corrupted manifest: tensors span {offset} bytes, header says {header.payload_length}")
    return Manifest(header.version, doc.get("meta", {}), tuple(entries), len(manifest), header.payload_length)


def check_entries(manifest: Manifest, *, allowed_codecs: Iterable[str] | None,
                  expected_shapes: Mapping[str, Sequence[int]] | None) -> None:
    """UnknownCodec / UnknownTensor / ShapeMismatch for the first entry the caller cannot accept."""
    allowed = None if allowed_codecs is None else frozenset(allowed_codecs)
    for e in manifest.entries:
        if allowed is not None and e.codec not in allowed:
            raise UnknownCodec(f"unknown codec {e.codec!r} for tensor {e.name!r} "
                               f"(accepted: {', '.join(sorted(allowed))})")
        if expected_shapes is not None:
            if e.name not in expected_shapes:
                raise UnknownTensor(f"shape mismatch: tensor {e.name!r} is not in the model")
            want = tuple(int(d) for d in expected_shapes[e.name])
            if e.shape != want:
                raise ShapeMismatch(f"shape mismatch: tensor {e.name!r} is {list(e.shape)}, "
                                    f"the model expects {list(want)}")
