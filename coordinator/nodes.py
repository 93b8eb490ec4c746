"""Calls from the coordinator to nodes' own ``Node`` services, every byte counted.

One grpc.aio channel per node address, reused (TLS when the coordinator is given the nodes' CA).
Each call presents the node token and is counted by :class:`coordinator.traffic.Traffic` under a
kind, the node and the user it serves: the request's serialized size as sent, the reply's as
received (a failed call still counts what was sent).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc

from .auth import call_metadata
from .limits import server_options
from .registry import NodeRecord
from .traffic import Traffic


def _payload(message) -> int:
    """Bulk bytes inside a message (adapter blobs)."""
    if isinstance(message, pb.LoadUserRequest):
        return len(message.adapter.data)
    return 0


class NodeClients:
    """Counted calls to nodes."""

    def __init__(self, traffic: Traffic, node_token: str, *, max_message_bytes: int,
                 root_certificates: bytes | None = None) -> None:
        self.traffic = traffic
        self._metadata = call_metadata(node_token)
        self._options = server_options(max_message_bytes)
        # TLS to every node when given the CA their certificates chain to
        self._credentials = grpc.ssl_channel_credentials(root_certificates) if root_certificates else None
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> rpc.NodeStub:
        """A stub on the (cached) channel to ``address``."""
        channel = self._channels.get(address)
        if channel is None:
            channel = (grpc.aio.secure_channel(address, self._credentials, options=self._options)
                       if self._credentials else grpc.aio.insecure_channel(address, options=self._options))
            self._channels[address] = channel
        return rpc.NodeStub(channel)

    async def forget(self, address: str) -> None:
        """Close the channel to ``address`` (a node that moved or went down)."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        """Close every channel."""
        for address in list(self._channels):
            await self.forget(address)

    async def unary(self, node: NodeRecord, method: str, request, *, kind: int, user_id: str = "",
                    timeout: float | None = None):
        """Call unary ``method`` of ``node``'s Node service and count both messages."""
        call = getattr(self.stub(node.address), method)
        sent = request.ByteSize()
        try:
            reply = await call(request, metadata=self._metadata, timeout=timeout)
        except BaseException:
            self.traffic.count(kind, node.node_id, sent=sent, payload=_payload(request), user_id=user_id)
            raise
        self.traffic.count(kind, node.node_id, sent=sent, received=reply.ByteSize(), payload=_payload(request),
                           user_id=user_id)
        return reply

    async def generate(self, node: NodeRecord, request: pb.NodeGenerateRequest, *, user_id: str = "",
                       timeout: float | None = None) -> AsyncIterator[pb.NodeToken]:
        """Stream ``Node.Generate`` from ``node``, counting each token; cancels the call if abandoned."""
        call = self.stub(node.address).Generate(request, metadata=self._metadata, timeout=timeout)
        self.traffic.count(pb.BYTE_KIND_GENERATE, node.node_id, sent=request.ByteSize(), user_id=user_id)
        try:
            async for token in call:
                self.traffic.count(pb.BYTE_KIND_GENERATE, node.node_id, received=token.ByteSize(), user_id=user_id)
                yield token
        finally:
            call.cancel()
