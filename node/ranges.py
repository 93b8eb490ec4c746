"""Fetching byte ranges of a bundle: its head once, then whole tensors, each checked against the manifest.

``InstallBundlesRequest.ranges`` (and a heartbeat's prefetch plan) name byte ranges of a bundle held in
the coordinator's store; the rule that makes a range cover whole tensors is ``proto.expert_ranges``. A
node fetches the bundle's head (header and manifest, whose own checksums :func:`proto.bundle.read_manifest`
verifies) once per bundle and keeps it, then each range with ``NodeControl.FetchBundle(offset, length)``:

- a cut stream resumes from the last byte received (up to ``FetchPolicy.max_stalls`` streams without
  progress);
- every tensor of the range must hash to its manifest digest, else the whole range is fetched again
  (up to ``FetchPolicy.max_refetch`` times), then ``DATA_LOSS``;
- the result is a ``proto.bundle.Bundle`` holding only verified records, which ``node.assembly``
  decodes like any bundle. Nothing is installed here (``node.partial`` does that, atomically).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.bundle import Bundle, BundleError, Manifest, TensorRecord, read_manifest, tensor_digest
from proto.bundle.format import HEADER_SIZE, parse_header
from proto.expert_ranges import RangeError, entries_in, head_range

from .fetch import FetchError, FetchPolicy, broken_stream, resume_after


@dataclass
class RangeFetch:
    """Bytes a range fetch cost (chunk data, refetched bytes included) and its retries."""

    payload_bytes: int = 0
    resumes: int = 0
    refetches: int = 0


async def _read(stub: rpc.NodeControlStub, name: str, offset: int, length: int, *, node_id: str,
                metadata: tuple[tuple[str, str], ...], policy: FetchPolicy, sha256: bytes,
                cost: RangeFetch) -> bytes:
    """Bytes [offset, offset + length) of bundle ``name``, resumed after cuts; FetchError otherwise."""
    got = bytearray()
    stalls = 0
    while len(got) < length:
        start = len(got)
        request = pb.FetchBundleRequest(node_id=node_id, name=name, offset=offset + start, length=length - start,
                                        chunk_size=policy.chunk_size, expected_sha256=sha256)
        call = stub.FetchBundle(request, metadata=metadata, timeout=policy.stream_timeout_s)
        broken = ""
        try:
            async for chunk in call:
                cost.payload_bytes += len(chunk.data)
                if chunk.offset != offset + len(got) or len(got) + len(chunk.data) > length:
                    broken = f"chunk at offset {chunk.offset} (+{len(chunk.data)}), expected {offset + len(got)}"
                    break
                got += chunk.data
                if len(got) == length:
                    break
        except grpc.aio.AioRpcError as exc:
            broken = broken_stream(exc, f"{name!r} bytes {offset}+{length}")
        finally:
            call.cancel()
        if len(got) == length:
            break
        stalls = await resume_after(policy, stalls, progressed=len(got) > start, broken=broken,
                                    what=f"{name!r} bytes {offset}+{length}")
        cost.resumes += 1
    return bytes(got)


async def fetch_head(stub: rpc.NodeControlStub, ref: pb.BundleRef, *, node_id: str,
                     metadata: tuple[tuple[str, str], ...], policy: FetchPolicy, cost: RangeFetch) -> Manifest:
    """The bundle's verified header and manifest (two reads: the fixed header gives the manifest's length)."""
    sha = bytes(ref.sha256)
    for attempt in range(policy.max_refetch + 1):
        head = await _read(stub, ref.name, 0, HEADER_SIZE, node_id=node_id, metadata=metadata, policy=policy,
                           sha256=sha, cost=cost)
        try:
            mlen = parse_header(head).manifest_length
            _, length = head_range(mlen)
            rest = await _read(stub, ref.name, HEADER_SIZE, length - HEADER_SIZE, node_id=node_id,
                               metadata=metadata, policy=policy, sha256=sha, cost=cost)
            return read_manifest(head + rest)
        except BundleError as exc:
            if attempt == policy.max_refetch:
                raise FetchError(f"bundle {ref.name!r}: its head is corrupt after {attempt + 1} tries: {exc}",
                                 grpc.StatusCode.DATA_LOSS) from None
            cost.refetches += 1
    raise AssertionError("unreachable")


async def fetch_range(stub: rpc.NodeControlStub, ref: pb.BundleRef, manifest: Manifest, offset: int, length: int,
                      *, node_id: str, metadata: tuple[tuple[str, str], ...], policy: FetchPolicy,
                      cost: RangeFetch) -> Bundle:
    """The tensors of range [offset, offset + length), each verified against its manifest digest."""
    try:
        entries = entries_in(manifest, offset, length)
    except RangeError as exc:
        raise FetchError(f"bundle {ref.name!r}: {exc}", grpc.StatusCode.INVALID_ARGUMENT) from None
    for attempt in range(policy.max_refetch + 1):
        data = await _read(stub, ref.name, offset, length, node_id=node_id, metadata=metadata, policy=policy,
                           sha256=bytes(ref.sha256), cost=cost)
        records, bad = [], ""
        for e in entries:
            at = manifest.payload_start + e.offset - offset
            piece = data[at:at + e.length]
            if tensor_digest(piece, manifest.version) != e.digest:
                bad = e.name
                break
            records.append(TensorRecord(e.name, e.codec, e.shape, piece, dict(e.meta), e.dtype))
        if not bad:
            return Bundle(meta=dict(manifest.meta), records=tuple(records), version=manifest.version)
        if attempt == policy.max_refetch:
            raise FetchError(f"bundle {ref.name!r}: tensor {bad!r} failed its {manifest.digest_name} check "
                             f"{attempt + 1} times; nothing installed", grpc.StatusCode.DATA_LOSS)
        cost.refetches += 1
    raise AssertionError("unreachable")
