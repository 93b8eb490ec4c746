"""The bundle store: bundle files on disk by name, each with its size and SHA-256, shipped in chunks.

Layout under the store's root: ``<name>.bundle`` (the bytes) and ``<name>.meta.json`` (size,
sha256, model, codec). Names match ``proto.ids.BUNDLE_NAME_PATTERN`` and are never paths.
Writes go to a temporary file and are renamed into place, so a reader never sees half a bundle,
and a stream that opened the old file keeps reading the old bytes when a bundle is replaced.

Bundles are shipped from memory: the store holds the bytes of the bundles it ships (read on first
need, least recently used dropped first, ``memory_bytes`` at most), so that a chunk is a view of
them rather than a read from the file (one copy fewer per chunk, and the file read once for all
the nodes that fetch it; `read_chunks(views=True)`). A bundle larger than the budget is read from
its file chunk by chunk.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from proto.bundle.errors import BundleError
from proto.bundle.format import HEADER_SIZE, parse_header, parse_manifest
from proto.ids import is_valid_bundle_name

DEFAULT_CHUNK = 1024 * 1024
DEFAULT_MEMORY = 512 * 1024 * 1024
_HASH_BLOCK = 1024 * 1024


class StoreError(Exception):
    """Base class of bundle store errors."""


class BundleNameError(StoreError):
    """A bundle name that is not allowed."""


class BundleNotFound(StoreError):
    """No bundle of that name."""


class BundleRangeError(StoreError):
    """An offset or length outside the bundle."""


class BundleIntegrityError(StoreError):
    """Bytes that do not match their declared size or SHA-256, or non-contiguous writes."""


@dataclass(frozen=True)
class BundleMeta:
    """What the store knows of a bundle."""

    name: str
    size: int
    sha256: bytes
    model: str = ""
    codec: str = ""


def _check_name(name: str) -> str:
    if not is_valid_bundle_name(name):
        raise BundleNameError(f"bundle name {name!r:.60} is not valid ([A-Za-z0-9][A-Za-z0-9._-]{{0,127}})")
    return name


def file_sha256(path: Path) -> bytes:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.digest()


class BundleWriter:
    """Receives a bundle in contiguous pieces; :meth:`commit` verifies size and SHA-256 and installs it."""

    def __init__(self, store: BundleStore, name: str, size: int, sha256: bytes, model: str, codec: str) -> None:
        self._store, self.name, self.size, self.sha256 = store, name, size, sha256
        self.model, self.codec = model, codec
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=store.root)
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.written = 0

    def write(self, offset: int, data: bytes) -> None:
        """Append ``data``, which must start at ``offset`` == bytes written so far."""
        if offset != self.written:
            raise BundleIntegrityError(f"bundle {self.name}: chunk at offset {offset}, expected {self.written}")
        if self.written + len(data) > self.size:
            raise BundleIntegrityError(f"bundle {self.name}: more than the declared {self.size} bytes")
        self._file.write(data)
        self._hash.update(data)
        self.written += len(data)

    def commit(self) -> BundleMeta:
        """Verify and install atomically; the temporary file is removed on failure."""
        self._file.close()
        try:
            if self.written != self.size:
                raise BundleIntegrityError(f"bundle {self.name}: got {self.written} bytes, declared {self.size}")
            if self._hash.digest() != self.sha256:
                raise BundleIntegrityError(f"bundle {self.name}: sha256 does not match the declared one")
            meta = BundleMeta(self.name, self.size, self.sha256, self.model, self.codec)
            self._store._install(self._tmp, meta)
            return meta
        finally:
            self._tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        """Discard what was written."""
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class BundleStore:
    """Bundles on disk under ``root``, by name, with size and SHA-256; chunked reads from an offset."""

    def __init__(self, root: str | Path, *, chunk_size: int = DEFAULT_CHUNK,
                 memory_bytes: int = DEFAULT_MEMORY) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.chunk_size = chunk_size
        self.memory_bytes = memory_bytes
        self._meta: dict[str, BundleMeta] = {}
        self._shapes: dict[tuple[str, bytes], dict[str, tuple[int, ...]]] = {}
        self._held: OrderedDict[str, tuple[bytes, bytes]] = OrderedDict()  # name -> (sha256, bytes), LRU first
        self._held_bytes = 0
        # Bundles are read into memory on worker threads (hold), so _held is guarded; a bundle being
        # read has its own lock, so that nodes asking for it at once read the file once.
        self._mem_lock = threading.RLock()
        self._loading: dict[str, threading.Lock] = {}

    @property
    def held_bytes(self) -> int:
        """Bytes of bundles held in memory for shipping (at most ``memory_bytes``)."""
        return self._held_bytes

    def _forget(self, name: str) -> None:
        with self._mem_lock:
            held = self._held.pop(name, None)
            if held is not None:
                self._held_bytes -= len(held[1])

    def _held_copy(self, meta: BundleMeta) -> bytes | None:
        """The bytes of ``meta``'s version if held (now the most recently used), else None."""
        with self._mem_lock:
            held = self._held.get(meta.name)
            if held is not None and held[0] == meta.sha256:
                self._held.move_to_end(meta.name)
                return held[1]
            return None

    def _bytes_of(self, meta: BundleMeta) -> bytes | None:
        """The bytes of bundle ``meta`` from memory (read from its file on first need), or None when
        it does not fit ``memory_bytes``; the least recently shipped bundles make room.

        Blocking while the file is read: the coordinator calls :meth:`hold` on a worker thread first."""
        data = self._held_copy(meta)
        if data is not None:
            return data
        self._forget(meta.name)  # an older version of the same name
        if meta.size > self.memory_bytes:
            return None
        with self._mem_lock:
            loading = self._loading.setdefault(meta.name, threading.Lock())
        with loading:
            data = self._held_copy(meta)  # read by another thread while this one waited
            if data is not None:
                return data
            data = self._data(meta.name).read_bytes()
            if len(data) != meta.size:
                raise BundleIntegrityError(f"bundle {meta.name!r} has {len(data)} bytes on disk, "
                                           f"expected {meta.size}")
            with self._mem_lock:
                while self._held and self._held_bytes + len(data) > self.memory_bytes:
                    self._forget(next(iter(self._held)))
                self._held[meta.name] = (meta.sha256, data)
                self._held_bytes += len(data)
            return data

    def hold(self, name: str) -> BundleMeta:
        """Read bundle ``name`` into memory for shipping unless it is there already (or is larger than
        ``memory_bytes``); its metadata. Blocking: run it on a worker thread (``asyncio.to_thread``)
        so that a first read of a large bundle does not stall the event loop."""
        meta = self.get(name)
        self._bytes_of(meta)
        return meta

    def _data(self, name: str) -> Path:
        return self.root / f"{name}.bundle"

    def _metafile(self, name: str) -> Path:
        return self.root / f"{name}.meta.json"

    def _install(self, tmp: Path, meta: BundleMeta) -> None:
        record = {"size": meta.size, "sha256": meta.sha256.hex(), "model": meta.model, "codec": meta.codec}
        fd, tmp_meta = tempfile.mkstemp(prefix=".tmp-", dir=self.root)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, self._data(meta.name))
        os.replace(tmp_meta, self._metafile(meta.name))
        self._meta[meta.name] = meta
        self._forget(meta.name)

    def writer(self, name: str, *, size: int, sha256: bytes, model: str = "", codec: str = "") -> BundleWriter:
        """A writer for a bundle of declared ``size`` and ``sha256``."""
        _check_name(name)
        if size < 0 or len(sha256) != 32:
            raise BundleIntegrityError(f"bundle {name}: declared size must be >= 0 and sha256 32 bytes")
        return BundleWriter(self, name, size, bytes(sha256), model, codec)

    def put_bytes(self, name: str, data: bytes, *, model: str = "", codec: str = "") -> BundleMeta:
        """Store ``data`` as bundle ``name`` (replacing any previous one)."""
        w = self.writer(name, size=len(data), sha256=hashlib.sha256(data).digest(), model=model, codec=codec)
        w.write(0, data)
        return w.commit()

    def put_file(self, name: str, path: str | Path, *, model: str = "", codec: str = "") -> BundleMeta:
        """Copy the file at ``path`` into the store as bundle ``name``."""
        path = Path(path)
        w = self.writer(name, size=path.stat().st_size, sha256=file_sha256(path), model=model, codec=codec)
        try:
            with open(path, "rb") as f:
                while block := f.read(_HASH_BLOCK):
                    w.write(w.written, block)
        except BaseException:
            w.abort()
            raise
        return w.commit()

    def get(self, name: str) -> BundleMeta:
        """Metadata of bundle ``name``; BundleNotFound when absent."""
        _check_name(name)
        data = self._data(name)
        if not data.is_file():
            self._meta.pop(name, None)
            raise BundleNotFound(f"no bundle named {name!r}")
        cached = self._meta.get(name)
        if cached is not None and cached.size == data.stat().st_size:
            return cached
        meta = self._read_meta(name, data)
        self._meta[name] = meta
        return meta

    def _read_meta(self, name: str, data: Path) -> BundleMeta:
        try:
            record = json.loads(self._metafile(name).read_text())
            if int(record["size"]) == data.stat().st_size:
                return BundleMeta(name, int(record["size"]), bytes.fromhex(record["sha256"]),
                                  record.get("model", ""), record.get("codec", ""))
        except (OSError, ValueError, KeyError):
            pass
        # A file dropped into the directory by hand, or a stale sidecar: hash it once.
        meta = BundleMeta(name, data.stat().st_size, file_sha256(data))
        self._install_meta_only(meta)
        return meta

    def _install_meta_only(self, meta: BundleMeta) -> None:
        record = {"size": meta.size, "sha256": meta.sha256.hex(), "model": meta.model, "codec": meta.codec}
        fd, tmp_meta = tempfile.mkstemp(prefix=".tmp-", dir=self.root)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp_meta, self._metafile(meta.name))

    def list(self) -> list[BundleMeta]:
        """Every bundle in the store, by name."""
        names = sorted(p.name[: -len(".bundle")] for p in self.root.glob("*.bundle"))
        return [self.get(n) for n in names if is_valid_bundle_name(n)]

    def shapes(self, name: str) -> dict[str, tuple[int, ...]]:
        """{tensor name: shape} from bundle ``name``'s manifest (read once per version of the bundle);
        {} for a file that is not a readable bundle."""
        meta = self.get(name)
        key = (name, meta.sha256)
        if key not in self._shapes:
            try:
                with self._data(name).open("rb") as f:
                    header = parse_header(f.read(HEADER_SIZE))
                    manifest = parse_manifest(header, f.read(header.manifest_length))
                self._shapes[key] = {e.name: e.shape for e in manifest.entries}
            except (BundleError, OSError, ValueError, struct.error):
                self._shapes[key] = {}
        return self._shapes[key]

    def delete(self, name: str) -> bool:
        """Remove a bundle; False when absent."""
        _check_name(name)
        self._meta.pop(name, None)
        self._forget(name)
        existed = self._data(name).is_file()
        self._data(name).unlink(missing_ok=True)
        self._metafile(name).unlink(missing_ok=True)
        return existed

    def read_chunks(self, name: str, offset: int = 0, length: int = 0, chunk_size: int | None = None, *,
                    views: bool = False) -> tuple[BundleMeta, ChunkReader]:
        """Metadata and a :class:`ChunkReader` of (offset, bytes) chunks of ``[offset, offset+length)``.

        ``length`` 0 means to the end. The chunks are ``bytes`` read from the file, opened before
        returning; with ``views`` (shipping), read-only memoryviews of the bundle's bytes held in
        memory instead, unless it is larger than ``memory_bytes``. Either way they come from the
        bundle as it was at the call even if it is replaced meanwhile.
        """
        meta = self.get(name)
        if offset < 0 or offset > meta.size:
            raise BundleRangeError(f"offset {offset} is outside bundle {name!r} of {meta.size} bytes")
        if length < 0:
            raise BundleRangeError(f"length must be >= 0, got {length}")
        end = meta.size if length == 0 else min(meta.size, offset + length)
        step = self.chunk_size if not chunk_size else max(1, min(chunk_size, self.chunk_size))
        held = self._bytes_of(meta) if views else None
        return meta, ChunkReader(self._data(name) if held is None else held, name, offset, end, step)


class ChunkReader:
    """Iterates (offset, bytes) chunks of a bundle's bytes in memory (as views) or of its open file;
    :meth:`close` releases the file."""

    def __init__(self, source: bytes | Path, name: str, start: int, end: int, step: int) -> None:
        self._view = memoryview(source) if isinstance(source, bytes) else None
        self._file = None if self._view is not None else open(source, "rb")  # noqa: SIM115 - until close()
        if self._file is not None:
            self._file.seek(start)
        self.name, self.pos, self.end, self.step = name, start, end, step

    def __iter__(self) -> ChunkReader:
        return self

    def __next__(self) -> tuple[int, bytes | memoryview]:
        if self.pos >= self.end:
            self.close()
            raise StopIteration
        n = min(self.step, self.end - self.pos)
        if self._view is not None:
            data: bytes | memoryview = self._view[self.pos:self.pos + n]
        else:
            assert self._file is not None  # one of the two sources, set in __init__
            data = self._file.read(n)
        if not data:
            self.close()
            raise BundleIntegrityError(f"bundle {self.name!r} ended at {self.pos}, expected {self.end} bytes")
        offset = self.pos
        self.pos += len(data)
        return offset, data

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None:
            self._file.close()
