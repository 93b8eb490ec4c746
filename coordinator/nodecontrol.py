"""The ``NodeControl`` service: how nodes register, report, and fetch bundles and adapters."""

from __future__ import annotations

import asyncio
import re

import grpc
import numpy as np

from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.bundle_chunks import ChunkEncoder
from proto.byte_counting import payload_bytes

from .core import Core, handles_errors, handles_stream_errors
from .limits import RequestError, check_bundle_name, check_codec, check_enum, check_id, check_int, invalid

PROTOCOL_VERSION = 1
_ADDRESS_RE = re.compile(r"[A-Za-z0-9._\-\[\]:]{1,253}:(\d{1,5})")
_MIN_CHUNK = 4096
_MAX_SHAPE = 1024
_MAX_LIST = 100_000
_MAX_MASK_BYTES = _MAX_SHAPE * _MAX_SHAPE // 8


def _check_address(address: str) -> str:
    m = _ADDRESS_RE.fullmatch(address or "")
    if not m or not 1 <= int(m.group(1)) <= 65535:
        raise invalid(f"address {address[:60]!r} is not host:port")
    return address


def _check_ids(values, what: str) -> list[str]:
    check_int(len(values), f"{what} count", 0, _MAX_LIST)
    return [check_id(v, what) for v in values]


def _check_names(values, what: str) -> list[str]:
    check_int(len(values), f"{what} count", 0, _MAX_LIST)
    return [check_bundle_name(v) for v in values]


class NodeControlService(rpc.NodeControlServicer):
    """Implements ``fractal.federation.v1.NodeControl`` (node token only)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def _count(self, node_id: str, request, reply, kind: pb.ByteKind.ValueType = pb.BYTE_KIND_CONTROL, payload: int = 0,
               user_id: str = "") -> None:
        self.core.traffic.count(kind, node_id, sent=reply.ByteSize(), received=request.ByteSize(), payload=payload,
                                user_id=user_id)

    @handles_errors
    async def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterReply:
        self.core.auth.node(context.invocation_metadata())
        node_id = check_id(request.node_id, "node_id")
        _check_address(request.address)
        model = check_id(request.model, "model")
        check_codec(request.codec)
        installed = [check_bundle_name(b.name) for b in request.installed]
        held = _check_ids(request.user_ids, "user_ids")
        check_int(request.n_blocks, "n_blocks", 0, _MAX_SHAPE)
        check_int(request.n_experts, "n_experts", 0, _MAX_SHAPE)
        if request.protocol_version not in (0, PROTOCOL_VERSION):
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"protocol version {request.protocol_version} unsupported; this is {PROTOCOL_VERSION}")
        old = self.core.registry.get_node(node_id)
        if old is not None and old.address != request.address:
            await self.core.clients.forget(old.address)
        self.core.registry.upsert_node(node_id=node_id, address=request.address, model=model, codec=request.codec,
                                       state=pb.NODE_STATE_REGISTERED, bundles=installed, held_users=held,
                                       n_blocks=request.n_blocks, n_experts=request.n_experts)
        self.core.note_registered(node_id)
        reply = pb.RegisterReply(node_id=node_id, heartbeat_interval_ms=self.core.config.heartbeat_interval_ms,
                                 bundles=self.core.bundles_for(model, request.codec, installed),
                                 user_ids=self.core.registry.users_on_node(node_id),
                                 chunk_size=self.core.config.chunk_size)
        self._count(node_id, request, reply)
        return reply

    @handles_errors
    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        self.core.auth.node(context.invocation_metadata())
        node_id = check_id(request.node_id, "node_id")
        check_enum(request.state, "state", (pb.NODE_STATE_REGISTERED, pb.NODE_STATE_HEALTHY, pb.NODE_STATE_DRAINING,
                                            pb.NODE_STATE_DOWN))
        bundles = _check_names(request.bundles, "bundles")
        held = _check_ids(request.user_ids, "user_ids")
        check_int(len(request.expert_mask), "expert_mask bytes", 0, _MAX_MASK_BYTES)
        node = self.core.registry.get_node(node_id)
        if node is None:
            reply = pb.HeartbeatReply(known=False)
        else:
            # An admin's DRAINING outlives HEALTHY heartbeats; DOWN (missed heartbeats, failed calls) does not.
            draining = node.state == pb.NODE_STATE_DRAINING and request.state == pb.NODE_STATE_HEALTHY
            state = pb.NODE_STATE_DRAINING if draining else request.state
            self.core.registry.heartbeat(node_id=node_id, state=state, bundles=bundles, held_users=held,
                                         expert_mask=request.expert_mask, inflight=request.inflight)
            reply = pb.HeartbeatReply(known=True, bundles=self.core.bundles_for(node.model, node.codec, bundles))
            if state == pb.NODE_STATE_HEALTHY:
                self.core.resume_soup(node)
            planner = self.core.prefetch_planner
            if planner is not None:
                reply.prefetch.extend(planner(self.core.registry.existing_node(node_id)))
            if self.core.expert_peer is not None:
                reply.expert_peer = self.core.expert_peer(self.core.registry.existing_node(node_id))
            if self.core.router_prior is not None:
                prior = self.core.router_prior(self.core.registry.existing_node(node_id))
                if prior is not None:
                    reply.router_prior.CopyFrom(prior)
        self._count(node_id, request, reply)
        return reply

    @handles_stream_errors
    async def FetchBundle(self, request: pb.FetchBundleRequest, context):
        self.core.auth.node(context.invocation_metadata())
        node_id = check_id(request.node_id, "node_id", allow_empty=True)
        name = check_bundle_name(request.name)
        chunk = request.chunk_size or self.core.config.chunk_size
        chunk = min(max(chunk, _MIN_CHUNK), self.core.config.chunk_size)
        # The first fetch of a bundle reads its file (0.1 s for 155 MB from the page cache, more from
        # a disk): on a worker thread, so that heartbeats and requests go on meanwhile.
        await asyncio.to_thread(self.core.store.hold, name)
        meta, chunks = self.core.store.read_chunks(name, request.offset, request.length, chunk, views=True)
        try:
            if request.expected_sha256 and request.expected_sha256 != meta.sha256:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"bundle {name!r} changed: its sha256 is no longer the expected one")
            self.core.traffic.count(pb.BYTE_KIND_BUNDLE, node_id, received=request.ByteSize())
            # Each chunk leaves as the BundleChunk's bytes, encoded around a view of the held bundle
            # (proto.bundle_chunks: one copy, no message object; FetchBundle's serializer passes them on).
            encoder = ChunkEncoder(name=name, total_size=meta.size, sha256=meta.sha256)
            count = self.core.traffic.count
            for offset, data in chunks:
                message = encoder.encode(offset, data)
                # Counted before the write: a chunk handed to gRPC has left as far as the node can tell.
                count(pb.BYTE_KIND_BUNDLE, node_id, sent=len(message), payload=len(data))
                yield message
        finally:
            chunks.close()

    @handles_errors
    async def FetchAdapter(self, request: pb.FetchAdapterRequest, context) -> pb.Adapter:
        self.core.auth.node(context.invocation_metadata())
        node_id = check_id(request.node_id, "node_id", allow_empty=True)
        user = self.core.user(check_id(request.user_id, "user_id"))
        if not user.has_adapter:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"user {user.user_id!r} has no adapter")
        assert user.adapter is not None  # read with its blob (core.user), and has_adapter
        reply = pb.Adapter(user_id=user.user_id, format=user.adapter_format, data=user.adapter,
                           sha256=user.adapter_sha256 or b"")
        self._count(node_id, request, reply, kind=pb.BYTE_KIND_ADAPTER, payload=payload_bytes(reply),
                    user_id=user.user_id)
        return reply

    @handles_errors
    async def ReportRouting(self, request: pb.RoutingReport, context) -> pb.RoutingReportReply:
        self.core.auth.node(context.invocation_metadata())
        node_id = check_id(request.node_id, "node_id")
        if self.core.registry.get_node(node_id) is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"unknown node {node_id!r}")
        h = request.histogram
        check_int(h.n_blocks, "histogram.n_blocks", 1, _MAX_SHAPE)
        check_int(h.n_experts, "histogram.n_experts", 1, _MAX_SHAPE)
        if len(h.counts) != h.n_blocks * h.n_experts:
            raise invalid(f"histogram has {len(h.counts)} counts, expected n_blocks * n_experts = "
                          f"{h.n_blocks * h.n_experts}")
        counts = np.asarray(h.counts, dtype=np.uint64).reshape(h.n_blocks, h.n_experts)
        self.core.registry.set_routing(node_id, counts, h.tokens)
        reply = pb.RoutingReportReply()
        self._count(node_id, request, reply)
        return reply
