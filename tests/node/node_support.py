"""Helpers for the node tests: tiny models, decoded bundles, a fake coordinator (NodeControl).

The fake coordinator is a real grpc.aio server serving NodeControl from bundles and adapters held
in memory, with faults to inject: a stream cut after some chunks, a chunk corrupted in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
from dataclasses import dataclass, field

import grpc
import torch

from model.codecs import encode_state_dict
from model.config import PRESETS
from model.fractal_moe import FractalMoE, build_model, is_norm_param
from node.assembly import DecodedBundle
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.auth_metadata import AUTH_HEADER, bearer_metadata, bearer_value
from proto.bundle import encode_bundle

TOKEN = "node-token-for-tests"
META = bearer_metadata(TOKEN)
TINY = PRESETS["tiny"].model


def tiny_model(seed: int = 0) -> FractalMoE:
    """A random tiny model whose norms are not the identity and whose routers are sharp enough
    that tokens spread over many experts (so masks, adapters and routes all matter)."""
    m = build_model(TINY, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if is_norm_param(name):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("router.weight"):
                p.mul_(20.0)
    return m.eval()


def random_adapter(model: FractalMoE, seed: int) -> dict[str, torch.Tensor]:
    """A norm-only adapter that moves the norms far enough to change every prediction."""
    g = torch.Generator().manual_seed(seed)
    return {n: (p.detach() + 0.5 * torch.randn(p.shape, generator=g)).half().float()
            for n, p in model.named_parameters() if is_norm_param(n)}


def decoded(name: str, model: FractalMoE, keep=lambda n: True) -> DecodedBundle:
    """A DecodedBundle of ``model``'s tensors that ``keep(name)`` selects (no wire format involved)."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if keep(k)}
    sha = hashlib.sha256(name.encode() + b"".join(t.numpy().tobytes() for t in tensors.values())).digest()
    return DecodedBundle(name=name, sha256=sha, size=0, meta={}, config=model.cfg, tensors=tensors)


def bundle_bytes(model: FractalMoE, keep=lambda n: True, *, expert_codec: str = "fp32",
                 other_codec: str = "fp32", model_config: bool = True) -> bytes:
    """A real bundle (proto.bundle framing, model.codecs payloads) of the tensors ``keep`` selects."""
    sd = {k: v for k, v in model.state_dict().items() if keep(k)}
    records = encode_state_dict(sd, expert_codec=expert_codec, other_codec=other_codec)
    meta = {"model": "base", "expert_codec": expert_codec}
    meta.update({"model_config": dataclasses.asdict(model.cfg)} if model_config else {"preset": "tiny"})
    return encode_bundle(records, meta)


def log_softmax_next(model: FractalMoE, ids: list[int], adapter: dict | None = None) -> torch.Tensor:
    """Independent reference: log p(x_{i+1} | x_0..x_i) from one forward pass (ids within the context)."""
    m = model
    if adapter:
        m = build_model(model.cfg, 0)
        m.load_state_dict(model.state_dict())
        m.load_state_dict(adapter, strict=False)
    with torch.no_grad():
        logits = m.eval()(torch.tensor([ids])).logits[0].double()  # (n, V)
    lp = torch.log_softmax(logits, dim=-1)
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


@dataclass
class Faults:
    """Faults the fake coordinator injects into FetchBundle streams of one bundle."""

    cut_after_chunks: int | None = None  # abort with UNAVAILABLE after this many chunks...
    cuts: int = 0  # ...this many times
    corrupt_chunk: int | None = None  # flip a byte of this chunk (index in the stream)...
    corruptions: int = 0  # ...this many times


@dataclass
class FakeCoordinator(rpc.NodeControlServicer):
    """NodeControl from memory, checking the node token; records every call it gets."""

    bundles: dict[str, bytes] = field(default_factory=dict)
    adapters: dict[str, bytes] = field(default_factory=dict)
    assign: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)  # node -> (bundles, users)
    faults: dict[str, Faults] = field(default_factory=dict)
    chunk_size: int = 4096
    fetches: list[tuple[str, str, int]] = field(default_factory=list)  # (node, bundle, offset)
    registered: dict[str, pb.RegisterRequest] = field(default_factory=dict)
    heartbeats: list[pb.HeartbeatRequest] = field(default_factory=list)
    reports: list[pb.RoutingReport] = field(default_factory=list)
    bundle_bytes_sent: dict[str, int] = field(default_factory=dict)  # node -> chunk data bytes
    bundle_message_bytes: dict[str, int] = field(default_factory=dict)  # node -> serialized chunk sizes
    forget_nodes: bool = False  # answer heartbeats with known=False

    def ref(self, name: str) -> pb.BundleRef:
        data = self.bundles[name]
        return pb.BundleRef(name=name, size=len(data), sha256=hashlib.sha256(data).digest())

    async def _auth(self, context) -> None:
        md = dict(context.invocation_metadata())
        if not hmac.compare_digest(md.get(AUTH_HEADER, ""), bearer_value(TOKEN)):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad node token")

    async def Register(self, request, context):
        await self._auth(context)
        self.registered[request.node_id] = request
        names, users = self.assign.get(request.node_id, ([], []))
        return pb.RegisterReply(node_id=request.node_id, heartbeat_interval_ms=200,
                                bundles=[self.ref(n) for n in names], user_ids=users, chunk_size=self.chunk_size)

    async def Heartbeat(self, request, context):
        await self._auth(context)
        self.heartbeats.append(request)
        return pb.HeartbeatReply(known=not self.forget_nodes and request.node_id in self.registered)

    async def ReportRouting(self, request, context):
        await self._auth(context)
        self.reports.append(request)
        return pb.RoutingReportReply()

    async def FetchAdapter(self, request, context):
        await self._auth(context)
        data = self.adapters.get(request.user_id)
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no adapter for {request.user_id!r}")
        return pb.Adapter(user_id=request.user_id, format="safetensors", data=data,
                          sha256=hashlib.sha256(data).digest())

    async def FetchBundle(self, request, context):
        await self._auth(context)
        data = self.bundles.get(request.name)
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no bundle {request.name!r}")
        sha = hashlib.sha256(data).digest()
        if request.expected_sha256 and request.expected_sha256 != sha:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "bundle replaced")
        if request.offset > len(data):
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, "offset past the end")
        self.fetches.append((request.node_id, request.name, request.offset))
        f = self.faults.get(request.name, Faults())
        size = request.chunk_size or self.chunk_size
        for i, at in enumerate(range(request.offset, len(data), size)):
            if f.cut_after_chunks is not None and f.cuts > 0 and i == f.cut_after_chunks:
                f.cuts -= 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "stream cut (injected)")
            piece = bytearray(data[at:at + size])
            if f.corrupt_chunk == i and f.corruptions > 0:
                f.corruptions -= 1
                piece[len(piece) // 2] ^= 0xFF
            msg = pb.BundleChunk(name=request.name, offset=at, data=bytes(piece), total_size=len(data), sha256=sha)
            node = request.node_id
            self.bundle_bytes_sent[node] = self.bundle_bytes_sent.get(node, 0) + len(piece)
            self.bundle_message_bytes[node] = self.bundle_message_bytes.get(node, 0) + msg.ByteSize()
            yield msg
            await asyncio.sleep(0)


async def serve_fake(coord: FakeCoordinator, tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.aio.Server, str]:
    """Start ``coord`` on a loopback port (TLS with ``(key, cert)`` PEM bytes); the server and its address."""
    server = grpc.aio.server()
    rpc.add_NodeControlServicer_to_server(coord, server)
    if tls:
        port = server.add_secure_port("localhost:0", grpc.ssl_server_credentials([tls]))
        address = f"localhost:{port}"
    else:
        port = server.add_insecure_port("127.0.0.1:0")
        address = f"127.0.0.1:{port}"
    await server.start()
    return server, address
