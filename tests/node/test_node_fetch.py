"""Fetching a bundle over a real gRPC stream: resumed after cuts, refetched after corruption, counted."""

from __future__ import annotations

import asyncio
import hashlib
import sys

import blake3
import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from node_support import META, FakeCoordinator, Faults, bundle_bytes, serve_fake, tiny_model

from model.fractal_moe import expert_of
from node.counting import ByteCounter, CountingChannel
from node.fetch import FetchError, FetchPolicy, fetch_bundle
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.bundle import encode_bundle, read_bundle_verified, read_manifest

# a real bundle of five experts of block 0 (fp32): about 11 chunks of 4 KiB
DATA = bundle_bytes(tiny_model(0), lambda n: (expert_of(n) or (9, 9)) in {(0, e) for e in range(5)})
FAST = FetchPolicy(backoff_s=0.0)
reference = read_bundle_verified([DATA])


def fetch(coord: FakeCoordinator, ref: pb.BundleRef | None = None, policy: FetchPolicy = FAST):
    """Fetch ``ref`` (default: bundle "b" with size and sha256) from ``coord``; (result or error, counter)."""

    async def main():
        server, address = await serve_fake(coord)
        counter = ByteCounter()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = rpc.NodeControlStub(CountingChannel(channel, counter))
                try:
                    return await fetch_bundle(stub, ref or coord.ref("b"), node_id="n1", metadata=META,
                                              policy=policy), counter
                except FetchError as exc:
                    return exc, counter
        finally:
            await server.stop(None)

    return asyncio.run(main())


def test_clean_fetch_is_exact_and_counted_at_both_ends():
    coord = FakeCoordinator(bundles={"b": DATA})
    got, counter = fetch(coord)
    assert got.size == len(DATA) and got.resumes == 0 and got.refetches == 0
    assert got.payload_bytes == len(DATA) == coord.bundle_bytes_sent["n1"]
    bundle = counter.by_kind[pb.BYTE_KIND_BUNDLE]
    assert bundle.received == coord.bundle_message_bytes["n1"] and bundle.payload == len(DATA)
    assert bundle.sent == pb.FetchBundleRequest(node_id="n1", name="b", expected_sha256=got.sha256).ByteSize()


def test_cut_stream_resumes_from_the_offset_reached():
    coord = FakeCoordinator(bundles={"b": DATA}, faults={"b": Faults(cut_after_chunks=5, cuts=1)})
    got, _ = fetch(coord)
    assert got.size == len(DATA) and got.resumes == 1
    assert [off for _, _, off in coord.fetches] == [0, 5 * 4096]
    assert got.payload_bytes == len(DATA)  # nothing shipped twice


def test_name_only_ref_learns_size_and_sha_from_the_stream():
    coord = FakeCoordinator(bundles={"b": DATA}, faults={"b": Faults(cut_after_chunks=2, cuts=3)})
    got, _ = fetch(coord, pb.BundleRef(name="b"))
    assert got.size == len(DATA) and got.resumes == 3 and got.sha256 == hashlib.sha256(DATA).digest()


def test_corrupt_tensor_is_fetched_again_from_its_first_byte():
    coord = FakeCoordinator(bundles={"b": DATA}, faults={"b": Faults(corrupt_chunk=4, corruptions=1)})
    got, _ = fetch(coord)
    assert got.refetches == 1 and hashlib.sha256(encode_bundle(got.bundle, got.bundle.meta)).digest() == got.sha256
    # the flipped byte sits in the middle of chunk 4; the node resumes where that tensor starts
    flipped = 4 * 4096 + 4096 // 2
    m = read_manifest(DATA)
    start, end = next((m.payload_start + e.offset, m.payload_start + e.offset + e.length) for e in m.entries
                      if m.payload_start + e.offset <= flipped < m.payload_start + e.offset + e.length)
    offsets = [off for _, _, off in coord.fetches]  # [0, start] unless the transport also cut a stream
    assert offsets[0] == 0 and offsets.count(start) == 1 and len(offsets) == got.resumes + 1
    # the damage shows when the tensor's last byte arrives: the first stream stops with that chunk
    first_stream = min(len(DATA), ((end - 1) // 4096 + 1) * 4096)
    assert 0 < start < flipped and got.payload_bytes == first_stream + len(DATA) - start < 2 * len(DATA)


def test_corrupt_header_is_fetched_again_from_byte_zero():
    coord = FakeCoordinator(bundles={"b": DATA}, faults={"b": Faults(corrupt_chunk=0, corruptions=1)})
    got, _ = fetch(coord)
    assert got.refetches == 1 and [off for _, _, off in coord.fetches] == [0, 0]
    assert len(got.bundle.records) == 10


def test_persistent_corruption_is_data_loss():
    coord = FakeCoordinator(bundles={"b": DATA}, faults={"b": Faults(corrupt_chunk=0, corruptions=99)})
    err, _ = fetch(coord, policy=FetchPolicy(backoff_s=0.0, max_refetch=2))
    assert isinstance(err, FetchError) and err.code == grpc.StatusCode.DATA_LOSS
    assert len(coord.fetches) == 3


def test_bytes_that_are_not_a_bundle_are_refused():
    coord = FakeCoordinator(bundles={"b": b"x" * 5000})
    err, _ = fetch(coord)
    assert isinstance(err, FetchError) and err.code == grpc.StatusCode.DATA_LOSS


@pytest.mark.parametrize("ref, code", [
    (pb.BundleRef(name="missing"), grpc.StatusCode.NOT_FOUND),
    (pb.BundleRef(name="b", sha256=b"\1" * 32), grpc.StatusCode.FAILED_PRECONDITION),
])
def test_errors_that_retrying_cannot_fix_stop_at_once(ref, code):
    coord = FakeCoordinator(bundles={"b": DATA})
    err, _ = fetch(coord, ref)
    assert isinstance(err, FetchError) and err.code == code


def test_streams_that_bring_nothing_give_up_after_max_stalls():
    coord = FakeCoordinator(bundles={"b": DATA}, faults={"b": Faults(cut_after_chunks=0, cuts=99)})
    err, _ = fetch(coord, policy=FetchPolicy(backoff_s=0.0, max_stalls=3))
    assert isinstance(err, FetchError) and err.code == grpc.StatusCode.UNAVAILABLE
    assert len(coord.fetches) == 3


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(0, 11), cuts=st.integers(0, 3), corrupt=st.integers(0, 11), corruptions=st.integers(0, 2))
def test_any_mix_of_cuts_and_corruption_yields_the_exact_bytes_or_an_error(cut, cuts, corrupt, corruptions):
    coord = FakeCoordinator(bundles={"b": DATA}, faults={"b": Faults(cut_after_chunks=cut, cuts=cuts,
                                                                     corrupt_chunk=corrupt,
                                                                     corruptions=corruptions)})
    got, _ = fetch(coord, policy=FetchPolicy(backoff_s=0.0, max_refetch=1, max_stalls=4))
    if isinstance(got, FetchError):
        assert got.code in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNAVAILABLE)
    else:
        assert got.size == len(DATA) and [r.payload for r in got.bundle] == [r.payload for r in reference]


def test_the_node_hashes_each_byte_of_the_bundle_once(monkeypatch):
    """The reader's chain (manifest sha256, each tensor's BLAKE3) covers the bundle; the node does
    not hash the whole bundle a second time (the fake coordinator's own hashing is not counted)."""
    coord = FakeCoordinator(bundles={"b": DATA})
    ref = coord.ref("b")
    m = read_manifest(DATA)
    hashed: dict[str, int] = {}

    def counting(real):
        class Counting:
            def __init__(self, data=b"") -> None:
                self._module = sys._getframe(1).f_globals["__name__"]
                self._h = real()
                self.update(data)

            def update(self, data) -> None:
                hashed[self._module] = hashed.get(self._module, 0) + memoryview(data).nbytes
                self._h.update(data)

            def digest(self) -> bytes:
                return self._h.digest()

            def hexdigest(self) -> str:
                return self._h.hexdigest()
        return Counting

    monkeypatch.setattr(hashlib, "sha256", counting(hashlib.sha256))
    monkeypatch.setattr(blake3, "blake3", counting(blake3.blake3))
    got, _ = fetch(coord, ref)
    ours = sum(n for mod, n in hashed.items() if mod.split(".")[0] in ("node", "proto"))
    assert got.size == len(DATA) and ours == m.manifest_length + m.payload_length
