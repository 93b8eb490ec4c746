"""Fetching a bundle from the coordinator: streamed, verified as it arrives, resumed where it broke.

``NodeControl.FetchBundle`` streams chunks from an offset. :func:`fetch_bundle` feeds every chunk
to ``proto.bundle.BundleReader``, which checks the header, the manifest and each tensor's digest (BLAKE3)
as soon as its last byte arrives. So:

- a cut stream (transport error, a stream that ends early, a chunk at the wrong offset) is asked
  for again from the end of the last good chunk: a cut costs only the bytes in flight;
- a tensor whose bytes fail their digest (a chunk corrupted in flight) is dropped with everything
  after it, and the stream resumes from that tensor's first byte: a corruption costs at most one
  tensor plus what followed it in flight, not the whole bundle; the header and manifest, being
  checked as a whole, are fetched again from byte 0;
- every byte is hashed once: the reader's chain (header crc32 -> manifest sha256 -> each tensor's
  digest and byte range, the ranges tiling the payload) covers the whole bundle, so the bytes are
  exactly the bundle whose manifest the header names. The bundle's identity is the sha256 the
  coordinator names (``ref.sha256`` or the first chunk's), which the coordinator checks against
  its store at every stream start (``expected_sha256``) and every chunk repeats; the node does not
  hash the whole bundle a second time. Chunks are not copied into one buffer: the reader hands out
  views of them, and assembles only the tensors that span chunks.

It returns only a bundle whose every checksum passed (``Fetched.bundle``), or raises FetchError.
Installing is the caller's (``node.runtime``), all or nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.bundle import Bundle, BundleError, BundleReader, ChecksumMismatch, CorruptBundle, NotABundle, UnknownVersion

# Codes after which asking again cannot help: the request itself or the bundle is wrong.
_FATAL = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
}
# Reader errors that bytes damaged in flight can cause (a flipped magic or version byte included).
_DAMAGE = (CorruptBundle, NotABundle, UnknownVersion)


class FetchError(RuntimeError):
    """A bundle could not be fetched intact; ``code`` is the gRPC status to report."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, kw_only=True)
class FetchPolicy:
    """How hard a node tries: chunk size asked for, resumes without progress, refetches after corruption."""

    chunk_size: int = 0  # 0: the coordinator's default
    max_stalls: int = 5  # consecutive broken streams that brought no new byte
    max_refetch: int = 3  # corruptions tolerated (each refetches from the damaged tensor, or byte 0)
    backoff_s: float = 0.05  # first pause after a broken stream, doubled per stall, at most 1 s
    stream_timeout_s: float | None = None  # deadline of one FetchBundle stream
    allowed_codecs: tuple[str, ...] | None = None  # codecs the node decodes (None: any)

    def __post_init__(self) -> None:
        if self.chunk_size < 0 or self.max_stalls < 1 or self.max_refetch < 0 or self.backoff_s < 0:
            raise ValueError(f"invalid fetch policy {self}")


def broken_stream(exc: grpc.aio.AioRpcError, what: str) -> str:
    """The shared rule for a stream that ended in an error (whole bundles and byte ranges): FetchError
    with the call's own status when no retry can fix it, else the text naming the cut, to resume after."""
    if exc.code() in _FATAL:
        raise FetchError(f"fetching {what}: {exc.code().name}: {exc.details()}", exc.code()) from None
    return f"{exc.code().name}: {exc.details()}"


async def resume_after(policy: FetchPolicy, stalls: int, *, progressed: bool, broken: str, what: str,
                       tail: str = "") -> int:
    """The shared resume rule after a broken stream (whole bundles and byte ranges): the count of broken
    streams in a row that brought no data (0 after progress); FetchError once it reaches
    ``policy.max_stalls``, else a pause (``backoff_s`` doubled per stall, at most 1 s) before the caller
    asks again from where the good bytes end."""
    stalls = 0 if progressed else stalls + 1
    if stalls >= policy.max_stalls:
        raise FetchError(f"fetching {what}: {stalls} streams in a row brought no data "
                         f"(last: {broken or 'stream ended early'}){tail}")
    if stalls:
        await asyncio.sleep(min(1.0, policy.backoff_s * 2 ** (stalls - 1)))
    return stalls


@dataclass
class Fetched:
    """A bundle received whole, every checksum verified, with what it cost."""

    name: str
    bundle: Bundle
    size: int
    sha256: bytes
    payload_bytes: int  # chunk data received, including bytes discarded and fetched again
    resumes: int  # streams reopened after a cut
    refetches: int  # corruptions recovered from


class _Received:
    """Where the verified bytes end, and the reader that verified them (it holds the records)."""

    def __init__(self, codecs: Iterable[str] | None) -> None:
        self.reader = BundleReader(allowed_codecs=codecs)

    @property
    def size(self) -> int:
        """Bytes received and accepted so far (those of a tensor still arriving included): where to resume."""
        return self.reader.offset

    def rollback(self, offset: int) -> None:
        """Keep only the first ``offset`` bytes (a tensor's first byte, or 0) and what was verified before."""
        self.reader.rewind(offset)

    def damaged_from(self, exc: BundleError) -> int:
        """Where good bytes end after ``exc``: the damaged tensor's first byte, or 0 for the head."""
        m = self.reader.manifest
        if isinstance(exc, ChecksumMismatch) and m is not None:
            for e in m.entries:
                if e.name == exc.tensor:
                    return m.payload_start + e.offset
        return 0


async def fetch_bundle(stub: rpc.NodeControlStub, ref: pb.BundleRef, *, node_id: str,
                       metadata: tuple[tuple[str, str], ...], policy: FetchPolicy = FetchPolicy()) -> Fetched:
    """Fetch bundle ``ref`` (name, and size/sha256 when known) whole and verified; FetchError otherwise."""
    got = _Received(policy.allowed_codecs)
    want_sha = bytes(ref.sha256)
    total = int(ref.size) or None
    payload = resumes = refetches = stalls = 0
    while True:
        start = got.size
        request = pb.FetchBundleRequest(node_id=node_id, name=ref.name, offset=start,
                                        chunk_size=policy.chunk_size, expected_sha256=want_sha)
        broken = ""
        call = stub.FetchBundle(request, metadata=metadata, timeout=policy.stream_timeout_s)
        try:
            async for chunk in call:
                data = chunk.data  # a view (ChunkView); upb copies a message's bytes field per read
                payload += len(data)
                total = total or int(chunk.total_size)
                sha = chunk.sha256
                want_sha = want_sha or sha
                if chunk.total_size != total or sha != want_sha:
                    raise FetchError(f"bundle {ref.name!r} changed while it was being fetched "
                                     f"(size or sha256 differs from what was expected)",
                                     grpc.StatusCode.FAILED_PRECONDITION)
                if chunk.offset != got.size or got.size + len(data) > total:
                    broken = f"chunk at offset {chunk.offset} (+{len(data)}), expected {got.size}"
                    break
                try:
                    got.reader.feed(data)
                except _DAMAGE as exc:
                    refetches += 1
                    if refetches > policy.max_refetch:
                        raise FetchError(f"bundle {ref.name!r}: {exc} ({refetches} corruptions); nothing installed",
                                         grpc.StatusCode.DATA_LOSS) from None
                    got.rollback(got.damaged_from(exc))
                    broken = str(exc)
                    break
                except BundleError as exc:  # well-formed but not for us (an unknown codec...)
                    raise FetchError(f"bundle {ref.name!r} refused: {exc}",
                                     grpc.StatusCode.FAILED_PRECONDITION) from None
                if got.size == total:
                    break
        except grpc.aio.AioRpcError as exc:
            broken = broken_stream(exc, f"bundle {ref.name!r}")
        finally:
            call.cancel()  # a stream left early must not keep sending
        if total is not None and got.size == total:
            try:
                bundle = got.reader.finish()
            except BundleError as exc:
                bundle, broken = None, str(exc)
            if bundle is not None:
                return Fetched(name=ref.name, bundle=bundle, size=total, sha256=want_sha, payload_bytes=payload,
                               resumes=resumes, refetches=refetches)
            refetches += 1
            if refetches > policy.max_refetch:
                raise FetchError(f"bundle {ref.name!r} failed its checks {refetches} times; nothing installed",
                                 grpc.StatusCode.DATA_LOSS)
            got.rollback(0)
            continue
        stalls = await resume_after(policy, stalls, progressed=got.size > start, broken=broken,
                                    what=f"bundle {ref.name!r}", tail=f"; stopped at byte {got.size} of {total}")
        resumes += 1
