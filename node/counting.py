"""Byte accounting at the node's gRPC boundary: every message it receives or sends, by kind.

Counting happens where messages are (de)serialized, so the figures are the exact serialized
protobuf sizes that crossed the socket (the same definition the coordinator's ``Stats`` uses),
including messages whose handler later failed, and every message of a stream.

Two wrappers do it without touching the generated code:
- :func:`add_counted_servicer` registers a servicer on a ``grpc.aio`` server with counting
  (de)serializers, for the ``Node`` service a node serves;
- :class:`CountingChannel` wraps a client channel so that stubs built on it (``NodeControlStub``)
  count what they send and receive.

The kind of a message is fixed by its RPC (:data:`KIND_OF_METHOD`). A node cannot tell a mixture's
scoring call from a single-user one, so ``ScoreTokens`` is always counted as ``SCORE`` here; the
coordinator, which knows, may count the same bytes as ``MIXTURE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import grpc

from proto import federation_pb2 as pb

_PKG = "/fractal.federation.v1."

KIND_OF_METHOD: dict[str, int] = {
    _PKG + "Node/ScoreTokens": pb.BYTE_KIND_SCORE,
    _PKG + "Node/NextTokenDistribution": pb.BYTE_KIND_GENERATE,
    _PKG + "Node/Generate": pb.BYTE_KIND_GENERATE,
    _PKG + "Node/LoadUser": pb.BYTE_KIND_ADAPTER,
    _PKG + "Node/UnloadUser": pb.BYTE_KIND_ADAPTER,
    _PKG + "Node/InstallBundles": pb.BYTE_KIND_CONTROL,
    _PKG + "Node/Status": pb.BYTE_KIND_CONTROL,
    _PKG + "NodeControl/Register": pb.BYTE_KIND_CONTROL,
    _PKG + "NodeControl/Heartbeat": pb.BYTE_KIND_CONTROL,
    _PKG + "NodeControl/FetchBundle": pb.BYTE_KIND_BUNDLE,
    _PKG + "NodeControl/FetchAdapter": pb.BYTE_KIND_ADAPTER,
    _PKG + "NodeControl/ReportRouting": pb.BYTE_KIND_CONTROL,
}

KIND_NAMES: dict[int, str] = {
    pb.BYTE_KIND_BUNDLE: "bundle",
    pb.BYTE_KIND_ADAPTER: "adapter",
    pb.BYTE_KIND_SCORE: "score",
    pb.BYTE_KIND_MIXTURE: "mixture",
    pb.BYTE_KIND_GENERATE: "generate",
    pb.BYTE_KIND_CONTROL: "control",
}


def payload_of(msg: Any) -> int:
    """Bulk data carried by ``msg`` (bundle chunk bytes, adapter blobs), as the proto defines it."""
    if isinstance(msg, pb.BundleChunk | pb.Adapter):
        return len(msg.data)
    if isinstance(msg, pb.LoadUserRequest):
        return len(msg.adapter.data)
    return 0


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
        self.by_kind: dict[int, KindCount] = {}

    def add(self, kind: int, *, sent: int = 0, received: int = 0, payload: int = 0) -> None:
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
                KIND_NAMES.get(k, str(k)): {"sent": c.sent, "received": c.received,
                                            "messages": c.messages, "payload": c.payload}
                for k, c in sorted(self.by_kind.items())
            },
        }

    def as_proto(self) -> list[pb.KindBytes]:
        """The counters as ``KindBytes`` messages."""
        return [pb.KindBytes(kind=k, sent=c.sent, received=c.received, messages=c.messages, payload=c.payload)
                for k, c in sorted(self.by_kind.items())]


def _counting_deserializer(counter: ByteCounter, kind: int,
                           deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def run(data: bytes) -> Any:
        msg = deserialize(data) if deserialize else data
        counter.add(kind, received=len(data), payload=payload_of(msg))
        return msg
    return run


def _counting_serializer(counter: ByteCounter, kind: int,
                         serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    def run(msg: Any) -> bytes:
        data = serialize(msg) if serialize else msg
        counter.add(kind, sent=len(data), payload=payload_of(msg))
        return data
    return run


class _HandlerCollector:
    """Stands in for a server while a generated ``add_*Servicer_to_server`` registers handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # rebuilt from the registered handlers below

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service = service
        self.handlers = dict(handlers)


def add_counted_servicer(add_fn: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server,
                         counter: ByteCounter) -> None:
    """Register ``servicer`` on ``server`` through the generated ``add_fn``, counting every message."""
    collector = _HandlerCollector()
    add_fn(servicer, collector)
    wrapped = {}
    for name, h in collector.handlers.items():
        kind = KIND_OF_METHOD.get(f"/{collector.service}/{name}", pb.BYTE_KIND_CONTROL)
        wrapped[name] = h._replace(
            request_deserializer=_counting_deserializer(counter, kind, h.request_deserializer),
            response_serializer=_counting_serializer(counter, kind, h.response_serializer),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(collector.service, wrapped),))
    server.add_registered_method_handlers(collector.service, wrapped)


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
        kind = KIND_OF_METHOD.get(method, pb.BYTE_KIND_CONTROL)
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
