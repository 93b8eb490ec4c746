"""A faulty link: :class:`FaultyLink`, a loopback gRPC proxy in front of the coordinator's
NodeControl service that cuts and corrupts bundle streams as each node's :class:`LinkFaults` says."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc

from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.auth_metadata import auth_entries
from proto.message_limits import message_size_options

from ..federation import CHANNEL_OPTIONS, SIM_MAX_MESSAGE_BYTES

NODE_CONTROL = pb.DESCRIPTOR.services_by_name["NodeControl"]


@dataclass
class LinkFaults:
    """What a faulty link does to one node's FetchBundle streams.

    ``cut_at``: the first stream is cut (UNAVAILABLE) before the first chunk that would cross
    this byte. ``corrupt``: stream i flips the byte at ``corrupt[i]`` (one corruption per stream,
    so each is seen by the node however many chunks are in flight when it gives up a stream).
    ``corrupt_always``: this byte is flipped on every stream.
    """

    cut_at: int | None = None
    corrupt: list[int] = field(default_factory=list)
    corrupt_always: int | None = None
    streams: list[dict] = field(default_factory=list)  # per stream: offset asked for, bytes passed, what was done


def _flip(chunk: pb.BundleChunk, offset: int) -> bool:
    """Flip the byte at absolute ``offset`` if ``chunk`` carries it."""
    i = offset - chunk.offset
    if not 0 <= i < len(chunk.data):
        return False
    data = bytearray(chunk.data)
    data[i] ^= 0xFF
    chunk.data = bytes(data)
    return True


class FaultyLink:
    """A loopback gRPC proxy in front of the coordinator's NodeControl service.

    Every NodeControl call is forwarded as raw bytes with its authorization metadata; FetchBundle
    streams of the nodes named in ``faults`` are cut or corrupted as their :class:`LinkFaults`
    says. Nodes dial the proxy's address as if it were the coordinator.
    """

    def __init__(self, upstream: str, faults: dict[str, LinkFaults]) -> None:
        self.upstream = upstream
        self.faults = faults
        self.channel: grpc.aio.Channel | None = None
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> str:
        """Listen on a free loopback port; returns host:port."""
        self.channel = channel = grpc.aio.insecure_channel(self.upstream, options=CHANNEL_OPTIONS)
        self.server = grpc.aio.server(options=message_size_options(SIM_MAX_MESSAGE_BYTES))
        handlers = {}
        for m in NODE_CONTROL.methods:
            if m.server_streaming:
                handlers[m.name] = grpc.unary_stream_rpc_method_handler(
                    self._fetch, request_deserializer=pb.FetchBundleRequest.FromString,
                    response_serializer=pb.BundleChunk.SerializeToString)
            else:
                path = f"/{NODE_CONTROL.full_name}/{m.name}"
                handlers[m.name] = grpc.unary_unary_rpc_method_handler(self._forwarder(channel, path))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(NODE_CONTROL.full_name, handlers),))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        """Stop the proxy."""
        if self.server is not None:
            await self.server.stop(None)
        if self.channel is not None:
            await self.channel.close()

    @staticmethod
    def _auth(context) -> list[tuple[str, str | bytes]]:
        return auth_entries(context.invocation_metadata())

    def _forwarder(self, channel: grpc.aio.Channel, path: str):
        call = channel.unary_unary(path)  # no (de)serializers: bytes pass through untouched

        async def forward(request: bytes, context) -> bytes:
            try:
                return await call(request, metadata=self._auth(context), timeout=context.time_remaining())
            except grpc.aio.AioRpcError as err:
                await context.abort(err.code(), err.details() or "")
                raise  # not reached: abort raises
        return forward

    async def _fetch(self, request: pb.FetchBundleRequest, context):
        plan = self.faults.get(request.node_id)
        stream: dict[str, Any] = {"offset": request.offset, "bytes": 0, "cut_at": None, "corrupted": []}
        index = len(plan.streams) if plan else 0
        if plan is not None:
            plan.streams.append(stream)
        stub = rpc.NodeControlStub(self.channel)
        call = stub.FetchBundle(request, metadata=self._auth(context), timeout=context.time_remaining())
        try:
            async for chunk in call:
                if plan is not None:
                    end = chunk.offset + len(chunk.data)
                    if plan.cut_at is not None and index == 0 and end > plan.cut_at:
                        stream["cut_at"] = chunk.offset
                        await context.abort(grpc.StatusCode.UNAVAILABLE, "link cut (fault injection)")
                    targets = ([plan.corrupt[index]] if index < len(plan.corrupt) else []) + (
                        [plan.corrupt_always] if plan.corrupt_always is not None else [])
                    stream["corrupted"] += [o for o in targets if _flip(chunk, o)]
                    stream["bytes"] += len(chunk.data)
                yield chunk
        except grpc.aio.AioRpcError as err:
            await context.abort(err.code(), err.details() or "")
        finally:
            call.cancel()
