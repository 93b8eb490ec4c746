"""Reading bundles: a streaming reader that verifies chunk by chunk, and an all-or-nothing wrapper.

The streaming reader hands out each tensor record as soon as its last byte has arrived and its
digest matches; a caller that *installs* tensors must still wait for ``finish()`` (or use
``read_bundle_verified``), because a later fault rejects the whole bundle.

Each byte is hashed once and copied at most once. The checks form a chain that covers every byte:
the header's crc32 covers its fixed fields, the header carries the manifest's sha256, the manifest
carries each tensor's digest (BLAKE3 in version 2, SHA-256 in version 1) and byte range, and the
ranges tile the payload. A tensor whose bytes
lie inside one read-only chunk (``bytes``, or a read-only memoryview) is handed out as a view of
that chunk, without a copy; one that spans chunks is assembled in a buffer of its own length,
allocated once. Writable chunks are never kept: the caller may reuse them.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence

from .errors import (
    BundleError,
    ChecksumMismatch,
    CorruptChunk,
    DuplicateChunk,
    OutOfOrderChunk,
    OversizedChunk,
    TruncatedBundle,
)
from .format import (
    HEADER_SIZE,
    Bundle,
    Chunk,
    Header,
    Manifest,
    TensorHash,
    TensorRecord,
    check_entries,
    parse_header,
    parse_manifest,
)


class BundleReader:
    """Feed it chunks in order; it verifies everything and yields complete, checksummed tensor records.

    ``allowed_codecs``: codec names the caller can decode (None: any). ``expected_shapes``: {name:
    shape} of the caller's model (None: no check). ``max_chunk_size``: the largest chunk accepted
    (None: no limit). After any error the reader stays failed and re-raises it.
    """

    def __init__(self, *, allowed_codecs: Iterable[str] | None = None,
                 expected_shapes: Mapping[str, Sequence[int]] | None = None,
                 max_chunk_size: int | None = None) -> None:
        self._allowed = None if allowed_codecs is None else frozenset(allowed_codecs)
        self._expected = expected_shapes
        self._max_chunk = max_chunk_size
        self._reset()

    def _reset(self) -> None:
        """The state of a reader that has received nothing."""
        self._received = 0
        self._head = bytearray()  # header and manifest bytes, until the manifest is parsed
        self._header: Header | None = None
        self._manifest: Manifest | None = None
        self._index = 0  # the entry whose payload is arriving
        self._pieces: list[bytes | memoryview] = []  # its bytes so far, when they span chunks
        self._filled = 0  # bytes of that entry received so far
        self._hash: TensorHash | None = None  # the arriving entry's, once the manifest names the hash
        self._records: list[TensorRecord] = []
        self._error: BundleError | None = None

    @property
    def offset(self) -> int:
        """Bytes received and accepted so far: where a cut transfer resumes."""
        return self._received

    @property
    def manifest(self) -> Manifest | None:
        """The verified manifest, once its bytes have arrived."""
        return self._manifest

    @property
    def total_size(self) -> int | None:
        """The bundle's size, once the header has arrived."""
        h = self._header
        return None if h is None else HEADER_SIZE + h.manifest_length + h.payload_length

    def feed(self, chunk: Chunk | bytes | bytearray | memoryview) -> list[TensorRecord]:
        """Accept the next chunk; the tensor records it completed (verified). A bare bytes chunk follows the last."""
        if self._error is not None:
            raise self._error
        try:
            return self._feed(chunk)
        except BundleError as exc:
            self._error = exc
            raise

    def finish(self) -> Bundle:
        """The whole verified bundle; TruncatedBundle if bytes are missing."""
        if self._error is not None:
            raise self._error
        total = self.total_size
        if self._manifest is None or total is None or self._received < total:  # no manifest without a header
            where = "its header" if self._header is None else ("its manifest" if self._manifest is None else "")
            msg = (f"truncated: bundle ends at byte {self._received}"
                   + (f" of {total}" if total is not None else "") + (f", inside {where}" if where else ""))
            self._error = TruncatedBundle(msg)
            raise self._error
        return Bundle(dict(self._manifest.meta), tuple(self._records), self._manifest.version)

    def rewind(self, offset: int) -> None:
        """Forget everything from ``offset`` on (0, or the first byte of a tensor already reached) and
        clear any error: the bytes from ``offset`` are fed again. Records before it stay verified."""
        m = self._manifest
        if offset == 0 or m is None:
            if offset:
                raise ValueError(f"cannot rewind to byte {offset} before the manifest has arrived")
            self._reset()
            return
        starts = [m.payload_start + e.offset for e in m.entries[: self._index + 1]]
        if offset not in starts:
            raise ValueError(f"cannot rewind to byte {offset}: not the first byte of a tensor already reached")
        self._index = starts.index(offset)
        del self._records[self._index:]
        self._received, self._pieces, self._filled, self._error = offset, [], 0, None
        self._hash = m.tensor_hash()

    # -- internals

    def _feed(self, chunk: Chunk | bytes | bytearray | memoryview) -> list[TensorRecord]:
        data: bytes | bytearray | memoryview
        if isinstance(chunk, Chunk):
            offset, data, crc = chunk.offset, chunk.data, chunk.crc32
        else:
            offset, data, crc = self._received, chunk, None
        if self._max_chunk is not None and len(data) > self._max_chunk:
            raise OversizedChunk(f"oversized chunk: {len(data)} bytes at offset {offset}, limit {self._max_chunk}")
        if crc is not None and zlib.crc32(data) != crc:
            raise CorruptChunk(f"corrupted chunk at offset {offset}: crc32 mismatch")
        if offset < self._received:
            raise DuplicateChunk(f"duplicate chunk: offset {offset} was already received (next byte {self._received})")
        if offset > self._received:
            raise OutOfOrderChunk(f"out-of-order chunk: offset {offset}, expected {self._received}")
        total = self.total_size
        if total is not None and offset + len(data) > total:
            raise OversizedChunk(f"oversized chunk: runs {offset + len(data) - total} bytes past the end of the "
                                 f"{total}-byte bundle")
        view = memoryview(data).cast("B")
        out: list[TensorRecord] = []
        while view.nbytes:
            used = self._take_head(view) if self._manifest is None else self._take_payload(view, out)
            view = view[used:]
            self._received += used
        if self._manifest is not None:
            self._take_payload(view, out)  # empty tensors complete without bytes of their own
        return out

    def _take_head(self, view: memoryview) -> int:
        """Consume header/manifest bytes; parse each part as soon as it is complete."""
        want = HEADER_SIZE if self._header is None else HEADER_SIZE + self._header.manifest_length
        used = min(want - len(self._head), view.nbytes)
        self._head += view[:used]
        if len(self._head) == want:
            if self._header is None:
                self._header = parse_header(self._head)
                total = self.total_size
                assert total is not None  # the header, parsed just above, gives it
                over = self._received + view.nbytes - total  # this chunk's end past the bundle's
                if over > 0:
                    raise OversizedChunk(f"oversized chunk: runs {over} bytes past the end of the {total}-byte bundle")
            else:
                self._manifest = parse_manifest(self._header, memoryview(self._head)[HEADER_SIZE:])
                check_entries(self._manifest, allowed_codecs=self._allowed, expected_shapes=self._expected)
                self._hash = self._manifest.tensor_hash()
                self._head = bytearray()
        return used

    def _take_payload(self, view: memoryview, out: list[TensorRecord]) -> int:
        m = self._manifest
        assert m is not None and self._hash is not None  # payload bytes are taken only once the manifest is parsed
        entries = m.entries
        used = 0
        while self._index < len(entries):
            e = entries[self._index]
            piece = view[used: used + e.length - self._filled]  # (n,) bytes of this tensor in this chunk
            n = piece.nbytes
            self._hash.update(piece)
            used += n
            self._filled += n
            # kept as a view when nobody can change the bytes under it (a read-only chunk), else copied
            kept = piece if view.readonly else bytes(piece)
            if self._filled < e.length:  # the tensor goes on in the next chunk
                self._pieces.append(kept)
                break
            payload: bytes | memoryview
            if self._pieces:  # spans chunks: joined once, into memory of its exact length
                self._pieces.append(kept)
                payload = b"".join(self._pieces)
            else:
                payload = kept if n else b""
            if self._hash.hexdigest() != e.digest:
                raise ChecksumMismatch(f"corrupted tensor {e.name!r}: {m.digest_name} mismatch", e.name)
            record = TensorRecord(e.name, e.codec, e.shape, payload, dict(e.meta), e.dtype)
            self._records.append(record)
            out.append(record)
            self._index += 1
            self._pieces, self._filled = [], 0
            self._hash = m.tensor_hash()
        return used


def read_bundle_verified(chunks: Iterable[Chunk | bytes | bytearray | memoryview], *,
                         allowed_codecs: Iterable[str] | None = None,
                         expected_shapes: Mapping[str, Sequence[int]] | None = None,
                         max_chunk_size: int | None = None) -> Bundle:
    """All or nothing: the verified bundle, or a BundleError before anything is returned."""
    reader = BundleReader(allowed_codecs=allowed_codecs, expected_shapes=expected_shapes,
                          max_chunk_size=max_chunk_size)
    for chunk in chunks:
        reader.feed(chunk)
    return reader.finish()


def read_manifest(data: bytes | bytearray | memoryview) -> Manifest:
    """The verified header and manifest at the start of ``data`` (payload not checked)."""
    view = memoryview(data)
    if view.nbytes < HEADER_SIZE:
        raise TruncatedBundle(f"truncated: {view.nbytes} bytes, shorter than the {HEADER_SIZE}-byte header")
    header = parse_header(view[:HEADER_SIZE])
    end = HEADER_SIZE + header.manifest_length
    if view.nbytes < end:
        raise TruncatedBundle(f"truncated: bundle ends at byte {view.nbytes}, inside its manifest (ends at {end})")
    return parse_manifest(header, view[HEADER_SIZE:end])
