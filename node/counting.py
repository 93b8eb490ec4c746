"""Byte accounting at the node's gRPC boundary: every message it receives or sends, by kind.

Counting happens where messages are (de)serialized, so the figures are the exact serialized
protobuf sizes that crossed the socket, including messages whose handler later failed, and every
message of a stream. What counts, under which kind, is ``proto.byte_counting``'s rule, the one the
coordinator's ``Stats`` uses too.

Two wrappers do it without touching the generated code:
- :func:`add_counted_servicer` registers a servicer on a ``grpc.aio`` server with counting
  (de)serializers, for the ``Node`` service a node serves;
- :class:`CountingChannel` wraps a client channel so that stubs built on it (``NodeControlStub``)
  count what they send and receive.

The kind of a message is fixed by its RPC (``proto.byte_counting.kind_of_method``). A node cannot
tell a mixture's scoring call from a single-user one, so ``ScoreTokens`` is always counted as
``SCORE`` here; the coordinator, which knows, may count the same bytes as ``MIXTURE``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from proto import federation_pb2 as pb
from proto.byte_counting import kind_name, kind_of_method, payload_bytes
from proto.handlers import register, registered_handlers


@dataclass
class KindCount:
    """Bytes and messages of one kind of traffic."""

    sent: int = 0
    received: int = 0
    messages: int = 0
    payload: int = 0


class ByteCounter:
    """Per-kind counters of one node's traffic (serialized message sizes).

    Updated from the event loop thread only (grpc.aio runs (de)serializers there), so no lock.
    """

    def __init__(self) -> None:
        self.by_kind: dict[pb.ByteKind.ValueType, KindCount] = {}

    def add(self, kind: pb.ByteKind.ValueType, *, sent: int = 0, received: int = 0, payload: int = 0) -> None:
        """Count one message of ``kind``."""
        c = self.by_kind.setdefault(kind, KindCount())
        c.sent += sent
        c.received += received
        c.payload += payload
        c.messages += 1

    @property
    def sent(self) -> int:
        """Bytes sent, all kinds."""
        return sum(c.sent for c in self.by_kind.values())

    @property
    def received(self) -> int:
        """Bytes received, all kinds."""
        return sum(c.received for c in self.by_kind.values())

    def as_dict(self) -> dict:
        """JSON-able summary: totals and ``by_kind`` keyed by kind name."""
        return {
            "sent": self.sent,
            "received": self.received,
            "total": self.sent + self.received,
            "by_kind": {
                kind_name(k).lower(): {"sent": c.sent, "received": c.received,
                                            "messages": c.messages, "payload": c.payload}
                for k, c in sorted(self.by_kind.items())
            },
        }

    def as_proto(self) -> list[pb.KindBytes]:
        """The counters as ``KindBytes`` messages."""
        return [pb.KindBytes(kind=k, sent=c.sent, received=c.received, messages=c.messages, payload=c.payload)
                for k, c in sorted(self.by_kind.items())]


def _counting_deserializer(counter: ByteCounter, kind: pb.ByteKind.ValueType,
                           deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def run(data: bytes) -> Any:
        msg = deserialize(data) if deserialize else data
        counter.add(kind, received=len(data), payload=payload_bytes(msg))
        return msg
    return run


def _counting_serializer(counter: ByteCounter, kind: pb.ByteKind.ValueType,
                         serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    def run(msg: Any) -> bytes:
        data = serialize(msg) if serialize else msg
        counter.add(kind, sent=len(data), payload=payload_bytes(msg))
        return data
    return run


def add_counted_servicer(add_fn: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server,
                         counter: ByteCounter) -> None:
    """Register ``servicer`` on ``server`` through the generated ``add_fn``, counting every message."""
    service, handlers = registered_handlers(add_fn, servicer)
    wrapped = {}
    for name, h in handlers.items():
        kind = kind_of_method(f"/{service}/{name}")
        wrapped[name] = h._replace(
            request_deserializer=_counting_deserializer(counter, kind, h.request_deserializer),
            response_serializer=_counting_serializer(counter, kind, h.response_serializer),
        )
    register(server, service, wrapped)


class CountingChannel:
    """A client channel whose multicallables count every message into a :class:`ByteCounter`.

    Stubs only call ``unary_unary`` / ``unary_stream`` / ``stream_unary`` / ``stream_stream``;
    several nodes may share one underlying channel, each with its own counter.
    """

    def __init__(self, channel: grpc.aio.Channel, counter: ByteCounter) -> None:
        self._channel = channel
        self.counter = counter

    def _wrap(self, factory: Callable, method: str, request_serializer=None, response_deserializer=None,
              **kwargs: Any) -> Any:
        kind = kind_of_method(method)
        return factory(method,
                       request_serializer=_counting_serializer(self.counter, kind, request_serializer),
                       response_deserializer=_counting_deserializer(self.counter, kind, response_deserializer),
                       **kwargs)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Counted ``unary_unary`` multicallable."""
        return self._wrap(self._channel.unary_unary, method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Counted ``unary_stream`` multicallable."""
        return self._wrap(self._channel.unary_stream, method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Counted ``stream_unary`` multicallable."""
        return self._wrap(self._channel.stream_unary, method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Counted ``stream_stream`` multicallable."""
        return self._wrap(self._channel.stream_stream, method, *args, **kwargs)
