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
from proto.auth_metadata import bearer_metadata
from proto.byte_counting import payload_bytes
from proto.message_limits import message_size_options

from .registry import NodeRecord
from .traffic import Traffic


class NodeClients:
    """Counted calls to nodes."""

    def __init__(self, traffic: Traffic, node_token: str, *, max_message_bytes: int,
                 root_certificates: bytes | None = None) -> None:
        self.traffic = traffic
        self._metadata = bearer_metadata(node_token)
        self._options = message_size_options(max_message_bytes)
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

    async def score_tokens(self, node: NodeRecord, request: pb.ScoreTokensRequest, *, kind: pb.ByteKind.ValueType,
                           user_id: str, timeout: float) -> pb.ScoreTokensReply:
        """``Node.ScoreTokens``: the log-prob of each observed token (counted as ``kind``: score or mixture)."""
        stub = self.stub(node.address)
        return await self._counted(node, stub.ScoreTokens, request, kind=kind, user_id=user_id, timeout=timeout)

    async def next_token_distribution(self, node: NodeRecord, request: pb.NextTokenRequest, *, user_id: str,
                                      timeout: float) -> pb.NextTokenReply:
        """``Node.NextTokenDistribution``: one step of a mixture's generation."""
        stub = self.stub(node.address)
        return await self._counted(node, stub.NextTokenDistribution, request, kind=pb.BYTE_KIND_GENERATE,
                                   user_id=user_id, timeout=timeout)

    async def load_user(self, node: NodeRecord, request: pb.LoadUserRequest, *, timeout: float) -> pb.LoadUserReply:
        """``Node.LoadUser``: install a user's adapter on ``node``."""
        stub = self.stub(node.address)
        return await self._counted(node, stub.LoadUser, request, kind=pb.BYTE_KIND_ADAPTER,
                                   user_id=request.adapter.user_id, timeout=timeout)

    async def unload_user(self, node: NodeRecord, request: pb.UnloadUserRequest, *,
                          timeout: float) -> pb.UnloadUserReply:
        """``Node.UnloadUser``: drop a user's adapter from ``node``."""
        stub = self.stub(node.address)
        return await self._counted(node, stub.UnloadUser, request, kind=pb.BYTE_KIND_ADAPTER,
                                   user_id=request.user_id, timeout=timeout)

    async def instantiate_soup(self, node: NodeRecord, request: pb.InstantiateSoupRequest, *,
                               timeout: float) -> pb.InstantiateSoupReply:
        """``Node.InstantiateSoup``: a soup node instantiates the specialist for ``request``'s h."""
        stub = self.stub(node.address)
        return await self._counted(node, stub.InstantiateSoup, request, kind=pb.BYTE_KIND_CONTROL, timeout=timeout)

    async def _counted(self, node: NodeRecord, method: grpc.aio.UnaryUnaryMultiCallable, request, *,
                       kind: pb.ByteKind.ValueType, user_id: str = "", timeout: float):
        # both messages are counted; a failed call still counts what was sent
        sent = request.ByteSize()
        try:
            reply = await method(request, metadata=self._metadata, timeout=timeout)
        except BaseException:
            self.traffic.count(kind, node.node_id, sent=sent, payload=payload_bytes(request), user_id=user_id)
            raise
        self.traffic.count(kind, node.node_id, sent=sent, received=reply.ByteSize(), payload=payload_bytes(request),
                           user_id=user_id)
        return reply

    async def generate(self, node: NodeRecord, request: pb.NodeGenerateRequest, *, user_id: str,
                       timeout: float) -> AsyncIterator[pb.NodeToken]:
        """Stream ``Node.Generate`` from ``node``, counting each token; cancels the call if abandoned."""
        call = self.stub(node.address).Generate(request, metadata=self._metadata, timeout=timeout)
        self.traffic.count(pb.BYTE_KIND_GENERATE, node.node_id, sent=request.ByteSize(), user_id=user_id)
        try:
            async for token in call:
                self.traffic.count(pb.BYTE_KIND_GENERATE, node.node_id, received=token.ByteSize(), user_id=user_id)
                yield token
        finally:
            call.cancel()
