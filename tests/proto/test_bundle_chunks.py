"""FetchBundle's chunks without protobuf's copies: the same bytes on the wire as protobuf, both ways,
and over a real gRPC stream with the plain generated code at either end."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.bundle_chunks import ChunkEncoder, ChunkView, add_node_control_servicer, node_control_stub, serialize_chunk
from proto.byte_counting import payload_bytes

U64 = st.integers(0, 2**64 - 1)
NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
FIELDS = ("name", "offset", "data", "total_size", "sha256", "model", "codec")


def fields(msg) -> dict:
    return {f: bytes(getattr(msg, f)) if f in ("data", "sha256") else getattr(msg, f) for f in FIELDS}


@settings(max_examples=200, deadline=None)
@given(name=NAMES, offset=U64, data=st.binary(max_size=3000), total=U64, sha=st.binary(max_size=40))
def test_encoder_writes_what_protobuf_writes(name, offset, data, total, sha):
    want = pb.BundleChunk(name=name, offset=offset, data=data, total_size=total, sha256=sha).SerializeToString()
    enc = ChunkEncoder(name=name, total_size=total, sha256=sha)
    assert enc.encode(offset, data) == want
    assert enc.encode(offset, memoryview(data)) == want
    assert enc.encode(offset, bytearray(data)) == want


def test_encoder_boundaries_and_defaults():
    # proto3 leaves out fields at their default: an empty name, offset 0, empty data, total 0
    assert ChunkEncoder(name="", total_size=0, sha256=b"").encode(0, b"") == b""
    for offset in (0, 1, 127, 128, 16383, 16384, 2**63, 2**64 - 1):
        want = pb.BundleChunk(name="b", offset=offset, data=b"x" * 200, total_size=offset).SerializeToString()
        assert ChunkEncoder(name="b", total_size=offset, sha256=b"").encode(offset, b"x" * 200) == want
    with pytest.raises(ValueError, match="offset"):
        ChunkEncoder(name="b", total_size=1, sha256=b"").encode(-1, b"x")
    with pytest.raises(ValueError, match="total_size"):
        ChunkEncoder(name="b", total_size=2**64, sha256=b"")


@settings(max_examples=200, deadline=None)
@given(name=NAMES, offset=U64, data=st.binary(max_size=3000), total=U64, sha=st.binary(max_size=40),
       model=NAMES, codec=NAMES)
def test_view_reads_what_protobuf_wrote(name, offset, data, total, sha, model, codec):
    msg = pb.BundleChunk(name=name, offset=offset, data=data, total_size=total, sha256=sha, model=model, codec=codec)
    raw = msg.SerializeToString()
    view = ChunkView.from_bytes(raw)
    assert fields(view) == fields(msg)
    assert isinstance(view.data, memoryview) or data == b""
    if data:
        assert view.data.readonly and view.data.obj is raw  # a view of the received message, not a copy


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def test_view_parses_as_protobuf_does_order_repeats_and_unknown_fields():
    raw = (b"\x1a\x03abc"  # data first
           + b"\x10" + _varint(5)  # offset
           + b"\x10" + _varint(7)  # offset again: the last wins
           + b"\x48\x01"  # unknown varint field 9
           + b"\x51" + b"\0" * 8  # unknown fixed64 field 10
           + b"\x5d" + b"\0" * 4  # unknown fixed32 field 11
           + b"\x62\x02zz"  # unknown length-delimited field 12
           + b"\x08\x01"  # field 1 (name) with the wrong wire type: skipped
           + b"\x0a\x01n")
    want = pb.BundleChunk.FromString(raw)
    assert fields(ChunkView.from_bytes(raw)) == fields(want)
    assert ChunkView.from_bytes(raw).offset == 7 and ChunkView.from_bytes(raw).name == "n"


@pytest.mark.parametrize("raw", [
    b"\x10",  # a key without its value
    b"\x10\xff",  # a cut varint
    b"\x10" + b"\xff" * 10 + b"\x01",  # a varint over 64 bits
    b"\x1a\x05abc",  # data longer than the message
    b"\x51\0\0",  # a cut fixed64
    b"\x0a\x02\xc3\x28",  # a name that is not UTF-8
    b"\x00\x01",  # field number 0
    b"\x1b",  # a group (wire type 3)
])
def test_malformed_messages_are_decode_errors_as_in_protobuf(raw):
    with pytest.raises(DecodeError):
        pb.BundleChunk.FromString(raw)
    with pytest.raises(DecodeError):
        ChunkView.from_bytes(raw)


def test_serializer_passes_encoded_chunks_and_serializes_messages():
    msg = pb.BundleChunk(name="b", offset=3, data=b"xyz", total_size=9)
    assert serialize_chunk(msg) == msg.SerializeToString()
    encoded = ChunkEncoder(name="b", total_size=9, sha256=b"").encode(3, b"xyz")
    assert serialize_chunk(encoded) is encoded
    assert payload_bytes(ChunkView.from_bytes(encoded)) == payload_bytes(msg) == 3


class _Servicer(rpc.NodeControlServicer):
    """Streams three chunks, encoded or as messages, and records the requests."""

    def __init__(self, encoded: bool) -> None:
        self.encoded = encoded
        self.requests: list[pb.FetchBundleRequest] = []

    async def FetchBundle(self, request, context):
        self.requests.append(request)
        enc = ChunkEncoder(name=request.name, total_size=9, sha256=b"s" * 32)
        for off in (0, 3, 6):
            data = bytes(range(off, off + 3))
            yield enc.encode(off, data) if self.encoded else pb.BundleChunk(
                name=request.name, offset=off, data=data, total_size=9, sha256=b"s" * 32)


@pytest.mark.parametrize("encoded_server", [True, False])
@pytest.mark.parametrize("view_client", [True, False])
def test_either_end_talks_to_plain_generated_code(encoded_server, view_client):
    async def main():
        servicer = _Servicer(encoded_server)
        server = grpc.aio.server()
        add_node_control_servicer(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = node_control_stub(channel) if view_client else rpc.NodeControlStub(channel)
                got = [c async for c in stub.FetchBundle(pb.FetchBundleRequest(name="b", offset=4))]
                # the other methods keep the generated code's (de)serializers
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Register(pb.RegisterRequest(node_id="n"))
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await server.stop(None)
        return servicer, got

    servicer, got = asyncio.run(main())
    assert [r.offset for r in servicer.requests] == [4] and servicer.requests[0].name == "b"
    assert [(c.name, c.offset, bytes(c.data), c.total_size, c.sha256) for c in got] == [
        ("b", off, bytes(range(off, off + 3)), 9, b"s" * 32) for off in (0, 3, 6)]
    assert all(isinstance(c, ChunkView) == view_client for c in got)
