"""Writing bundles (whole models or any subset of tensors, e.g. one expert) and cutting them into chunks."""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from .errors import BundleError, MissingTensor
from .format import (
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    VERSION,
    Bundle,
    Chunk,
    TensorRecord,
    build_manifest,
    pack_header,
)


def encode_bundle(records: Iterable[Any], meta: Mapping | None = None, *, version: int = VERSION) -> bytes:
    """The bundle bytes of ``records`` (objects with name, codec, shape, payload and optionally meta, dtype).

    ``version``: the format to write (default the current one; 1 for readers that know only SHA-256).
    """
    manifest, payloads = build_manifest(records, meta, version)
    return b"".join([pack_header(manifest, sum(map(len, payloads)), version), manifest, *payloads])


def bundle_size(records: Iterable[Any], meta: Mapping | None = None) -> int:
    """Bytes the bundle of ``records`` takes, framing included, without building it."""
    manifest, payloads = build_manifest(records, meta)
    return HEADER_SIZE + len(manifest) + sum(map(len, payloads))


def write_bundle(dest: str | os.PathLike | BinaryIO, records: Iterable[Any], meta: Mapping | None = None) -> int:
    """Write a bundle to a path (atomically: a temporary file renamed into place) or a binary file; bytes written."""
    data = encode_bundle(records, meta)
    if hasattr(dest, "write"):
        dest.write(data)
        return len(data)
    path = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(data)


def sub_bundle(bundle: Bundle | Iterable[TensorRecord], names: Iterable[str] | Callable[[str], bool],
               meta: Mapping | None = None) -> bytes:
    """A bundle of just some tensors of a verified bundle (e.g. the two matrices of one expert).

    ``names`` is a collection of tensor names (MissingTensor if one is absent) or a predicate on names.
    ``meta`` defaults to the source bundle's metadata.
    """
    records = list(bundle)
    if callable(names):
        chosen = [r for r in records if names(r.name)]
    else:
        wanted = list(dict.fromkeys(names))
        by_name = {r.name: r for r in records}
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise MissingTensor(f"tensor {missing[0]!r} is not in the bundle")
        chosen = [by_name[n] for n in wanted]
    if meta is None:
        meta = bundle.meta if isinstance(bundle, Bundle) else {}
    return encode_bundle(chosen, meta)


def iter_chunks(data: bytes | bytearray | memoryview, chunk_size: int = DEFAULT_CHUNK_SIZE,
                start: int = 0) -> Iterator[Chunk]:
    """Chunks of ``data`` from byte ``start`` (to resume a cut transfer), each with its offset and crc32."""
    if chunk_size < 1:
        raise BundleError(f"chunk_size must be >= 1, got {chunk_size}")
    if not 0 <= start <= len(data):
        raise BundleError(f"start {start} is outside the bundle's {len(data)} bytes")
    view = memoryview(data)
    for offset in range(start, len(data), chunk_size):
        piece = bytes(view[offset: offset + chunk_size])
        yield Chunk(offset, piece, zlib.crc32(piece))
