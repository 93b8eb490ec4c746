"""``NodeControl.FetchBundle``'s chunk messages without protobuf's copies, wire-compatible both ways.

A ``BundleChunk`` stream is almost all ``data`` bytes, and protobuf copies them at every step
(setting the field, serializing, parsing, and each read of ``chunk.data``). So both ends of
FetchBundle skip the message objects while keeping the bytes on the wire exactly the same:

- the coordinator yields chunks already encoded (:class:`ChunkEncoder`: the few header bytes
  around the data, joined in one copy; byte for byte what ``BundleChunk.SerializeToString()``
  writes), registered with a serializer that passes bytes through (:func:`serialize_chunk`,
  :func:`add_node_control_servicer`);
- a node decodes each message into a :class:`ChunkView`, whose ``data`` is a read-only view of the
  received message (:meth:`ChunkView.from_bytes`; :func:`node_control_stub` uses it for FetchBundle).

Either end works with the plain generated code on the other side. Dependency rule: this module
imports nothing else of ours but the generated code and ``proto.handlers``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from . import federation_pb2 as pb
from . import federation_pb2_grpc as rpc
from .handlers import register, registered_handlers

SERVICE = pb.DESCRIPTOR.services_by_name["NodeControl"].full_name
FETCH_BUNDLE = f"/{SERVICE}/FetchBundle"

# BundleChunk's fields, read from the generated descriptor (federation.proto is their one definition):
# number -> (attribute, wire type: 0 varint, 2 length-delimited)
_WIRE_TYPE = {FieldDescriptor.TYPE_UINT64: 0, FieldDescriptor.TYPE_STRING: 2, FieldDescriptor.TYPE_BYTES: 2}
_CHUNK_FIELDS = pb.BundleChunk.DESCRIPTOR.fields
if any(f.type not in _WIRE_TYPE for f in _CHUNK_FIELDS):  # a new field type needs its encoding here
    raise ImportError("proto.bundle_chunks: BundleChunk has a field type this module does not encode")
_FIELDS = {f.number: (f.name, _WIRE_TYPE[f.type]) for f in _CHUNK_FIELDS}
_NUMBER = {f.name: f.number for f in _CHUNK_FIELDS}
_STRINGS = frozenset(f.name for f in _CHUNK_FIELDS if f.type == FieldDescriptor.TYPE_STRING)
# bytes fields copied out of the message (small: the sha256); ``data`` alone stays a view
_COPIED = frozenset(f.name for f in _CHUNK_FIELDS if f.type == FieldDescriptor.TYPE_BYTES) - {"data"}
_MAX_VARINT = 1 << 64


def _varint(n: int) -> bytes:
    """``n`` (0 <= n < 2**64) as a protobuf base-128 varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, value: bytes | str | int) -> bytes:
    """One field as protobuf writes it, or b"" for a proto3 default (0, empty), which is not written."""
    if not value:
        return b""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    raw = value.encode() if isinstance(value, str) else bytes(value)
    return _varint(number << 3 | 2) + _varint(len(raw)) + raw


_DATA_TAG = _varint(_NUMBER["data"] << 3 | 2)


class ChunkEncoder:
    """Encodes the chunks of one bundle stream: ``encode(offset, data)`` is byte for byte
    ``pb.BundleChunk(name=, offset=, data=, total_size=, sha256=).SerializeToString()``, with one
    copy of ``data`` (the fields around it are encoded once per stream, or per chunk for the offset)."""

    def __init__(self, *, name: str, total_size: int, sha256: bytes) -> None:
        if not 0 <= total_size < _MAX_VARINT:
            raise ValueError(f"total_size must be 0..2**64-1, got {total_size}")
        self._name = _field(_NUMBER["name"], name)
        # protobuf writes fields in number order: name, offset, data, then these
        self._tail = _field(_NUMBER["total_size"], total_size) + _field(_NUMBER["sha256"], sha256)

    def encode(self, offset: int, data: bytes | bytearray | memoryview) -> bytes:
        """The serialized ``BundleChunk`` of ``data`` at ``offset``."""
        if not 0 <= offset < _MAX_VARINT:
            raise ValueError(f"offset must be 0..2**64-1, got {offset}")
        n = memoryview(data).nbytes
        head = self._name + _field(_NUMBER["offset"], offset) + (_DATA_TAG + _varint(n) if n else b"")
        return b"".join((head, data, self._tail)) if n else head + self._tail


def serialize_chunk(chunk: bytes | pb.BundleChunk) -> bytes:
    """FetchBundle's response serializer: an encoded chunk passes through as is, a message is serialized."""
    if isinstance(chunk, bytes):
        return chunk
    return chunk.SerializeToString()


def _read_varint(raw: memoryview, i: int) -> tuple[int, int]:
    """The varint at ``raw[i:]`` and the index after it; DecodeError when cut or longer than 64 bits."""
    value = shift = 0
    while i < len(raw):
        b = raw[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            if value >= _MAX_VARINT:
                break
            return value, i
        shift += 7
        if shift >= 70:
            break
    raise DecodeError("BundleChunk: truncated or overlong varint")


class ChunkView:
    """A received ``BundleChunk`` whose ``data`` is a read-only view of the message bytes (no copy).

    Parsed as protobuf does: fields in any order, the last occurrence wins, unknown fields and
    fields of an unexpected wire type skipped, names UTF-8 checked; DecodeError on malformed input.
    """

    __slots__ = ("name", "offset", "data", "total_size", "sha256", "model", "codec")

    def __init__(self) -> None:
        self.name = self.model = self.codec = ""
        self.offset = self.total_size = 0
        self.data: memoryview | bytes = b""
        self.sha256 = b""

    @classmethod
    def from_bytes(cls, raw: bytes) -> ChunkView:
        """Decode a serialized ``BundleChunk`` (FetchBundle's response deserializer)."""
        chunk = cls()
        view = memoryview(raw).toreadonly()  # already read-only for bytes; a bytearray's view too
        n = len(view)
        i = 0
        value: int | memoryview | str | bytes
        while i < n:
            key, i = _read_varint(view, i)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise DecodeError("BundleChunk: field number 0")
            if wire == 0:
                value, i = _read_varint(view, i)
            elif wire == 2:
                length, i = _read_varint(view, i)
                if length > n - i:
                    raise DecodeError("BundleChunk: a field runs past the end of the message")
                value, i = view[i:i + length], i + length
            elif wire in (1, 5):
                i += 8 if wire == 1 else 4
                if i > n:
                    raise DecodeError("BundleChunk: a fixed-width field runs past the end of the message")
                continue
            else:  # groups (3, 4) and the undefined 6, 7
                raise DecodeError(f"BundleChunk: wire type {wire} of field {number}")
            attr, want = _FIELDS.get(number, ("", -1))
            if wire != want:
                continue  # unknown field, or a known number with another wire type: skipped as protobuf does
            if attr in _STRINGS:
                assert isinstance(value, memoryview)  # wire type 2
                try:
                    value = str(value, "utf-8")
                except UnicodeDecodeError:
                    raise DecodeError(f"BundleChunk: {attr} is not valid UTF-8") from None
            elif attr in _COPIED:
                assert isinstance(value, memoryview)  # wire type 2
                value = bytes(value)
            setattr(chunk, attr, value)
        return chunk


def node_control_stub(channel: Any) -> rpc.NodeControlStub:
    """The generated ``NodeControl`` stub on ``channel``, but its FetchBundle yields :class:`ChunkView`
    (the fields of a ``BundleChunk``, ``data`` a view: no copies of the data)."""
    stub = rpc.NodeControlStub(channel)
    stub.FetchBundle = channel.unary_stream(
        FETCH_BUNDLE, request_serializer=pb.FetchBundleRequest.SerializeToString,
        response_deserializer=ChunkView.from_bytes, _registered_method=True)
    return stub


def add_node_control_servicer(servicer: rpc.NodeControlServicer, server: Any) -> None:
    """``add_NodeControlServicer_to_server``, with FetchBundle accepting encoded chunks (:func:`serialize_chunk`)."""
    service, handlers = registered_handlers(rpc.add_NodeControlServicer_to_server, servicer)
    handlers["FetchBundle"] = handlers["FetchBundle"]._replace(response_serializer=serialize_chunk)
    register(server, service, handlers)
