"""Fetching a bundle from the coordinator: streamed, resumed where a stream was cut, verified.

``NodeControl.FetchBundle`` streams chunks from an offset. :func:`fetch_bundle` keeps what it
received, and when a stream breaks (a transport error, a stream that ends early, a chunk at the
wrong offset) asks again from the end of the last good chunk, so a cut costs only the bytes in
flight. When every byte has arrived it checks the whole bundle's sha256; a mismatch (a chunk
corrupted in flight) discards the bytes and fetches the bundle again, up to ``max_refetch`` times.
Nothing it returns is unverified; decoding and installing are the caller's (``node.install``).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

import grpc

from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc

# Codes after which asking again cannot help: the request itself or the bundle is wrong.
_FATAL = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
}


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
    max_refetch: int = 2  # whole-bundle refetches after a checksum mismatch
    backoff_s: float = 0.05  # first pause after a broken stream, doubled per stall, at most 1 s
    stream_timeout_s: float | None = None  # deadline of one FetchBundle stream

    def __post_init__(self) -> None:
        if self.chunk_size < 0 or self.max_stalls < 1 or self.max_refetch < 0 or self.backoff_s < 0:
            raise ValueError(f"invalid fetch policy {self}")


@dataclass
class Fetched:
    """A bundle received whole and verified, with what it cost."""

    name: str
    data: bytes
    sha256: bytes
    payload_bytes: int  # chunk data received, including bytes discarded and fetched again
    resumes: int  # streams reopened after a cut
    refetches: int  # whole refetches after a checksum mismatch


async def fetch_bundle(stub: rpc.NodeControlStub, ref: pb.BundleRef, *, node_id: str,
                       metadata: tuple[tuple[str, str], ...], policy: FetchPolicy = FetchPolicy()) -> Fetched:
    """Fetch bundle ``ref`` (name, and size/sha256 when known) whole and verified; FetchError otherwise."""
    buf = bytearray()
    want_sha = bytes(ref.sha256)
    total = int(ref.size) or None
    payload = resumes = refetches = stalls = 0
    while True:
        start = len(buf)
        request = pb.FetchBundleRequest(node_id=node_id, name=ref.name, offset=start,
                                        chunk_size=policy.chunk_size, expected_sha256=want_sha)
        broken = ""
        call = stub.FetchBundle(request, metadata=metadata, timeout=policy.stream_timeout_s)
        try:
            async for chunk in call:
                payload += len(chunk.data)
                if total is None:
                    total = int(chunk.total_size)
                if not want_sha:
                    want_sha = bytes(chunk.sha256)
                if chunk.total_size != total or bytes(chunk.sha256) != want_sha:
                    raise FetchError(f"bundle {ref.name!r} changed while it was being fetched "
                                     f"(size or sha256 differs from what was expected)",
                                     grpc.StatusCode.FAILED_PRECONDITION)
                if chunk.offset != len(buf):
                    broken = f"chunk at offset {chunk.offset}, expected {len(buf)}"
                    break
                if len(buf) + len(chunk.data) > total:
                    broken = f"chunk overruns the bundle's {total} bytes"
                    break
                buf += chunk.data
                if len(buf) == total:
                    break
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _FATAL:
                raise FetchError(f"fetching bundle {ref.name!r}: {exc.code().name}: {exc.details()}",
                                 exc.code()) from None
            broken = f"{exc.code().name}: {exc.details()}"
        finally:
            call.cancel()  # a stream left early must not keep sending
        if total is not None and len(buf) == total:
            if hashlib.sha256(buf).digest() == want_sha:
                return Fetched(name=ref.name, data=bytes(buf), sha256=want_sha, payload_bytes=payload,
                               resumes=resumes, refetches=refetches)
            if refetches >= policy.max_refetch:
                raise FetchError(f"bundle {ref.name!r} failed its sha256 check {refetches + 1} times; "
                                 f"nothing installed", grpc.StatusCode.DATA_LOSS)
            refetches += 1
            buf.clear()
            continue
        if not broken:
            broken = "stream ended early"
        stalls = 0 if len(buf) > start else stalls + 1
        if stalls >= policy.max_stalls:
            raise FetchError(f"fetching bundle {ref.name!r}: {stalls} streams in a row brought no data "
                             f"(last: {broken}); stopped at byte {len(buf)} of {total}")
        resumes += 1
        if stalls:
            await asyncio.sleep(min(1.0, policy.backoff_s * 2 ** (stalls - 1)))
