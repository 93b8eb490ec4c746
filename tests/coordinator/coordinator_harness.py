"""Test harness: a real coordinator on a loopback port, and fake nodes that are real gRPC servers.

A fake node's "model" is a bigram table: log p(x_{t+1} | x_t) = table[x_t, x_{t+1}], drawn from a
seed, so a test can compute every expected log-probability by hand. A user adapter is a blob whose
first byte names a token that the adapter boosts by ADAPTER_BONUS logits.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch
from safetensors.torch import load as st_load
from tokenizers import Tokenizer, models, pre_tokenizers

from coordinator.config import CoordinatorConfig
from coordinator.server import CoordinatorHandle, serve
from coordinator.tokens import load_tokenizer
from model.adapter_blob import encode_adapter
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.auth_metadata import bearer_metadata
from proto.model_labels import model_label

ADMIN = "admin-token-0123456789abcdef"
NODE = "node-token-0123456789abcdef"
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park", "and", "then", "slept", "far", "away"]
ADAPTER_BONUS = 2.0


def meta(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return bearer_metadata(token)


def write_tokenizer(path: Path) -> Path:
    """A word-level tokenizer over WORDS (id 0 is [UNK]) saved as tokenizer.json."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def vocab_size() -> int:
    """Tokens of the test tokenizer."""
    return len(WORDS) + 1


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def bigram_table(seed: int) -> np.ndarray:
    """The fake model of a node: (V, V) log-probabilities, rows summing to 1."""
    return log_softmax(np.random.default_rng(seed).normal(0.0, 1.5, size=(vocab_size(), vocab_size())))


def adapted_table(seed: int, adapter: bytes) -> np.ndarray:
    """The fake model with a user's adapter applied."""
    logits = np.random.default_rng(seed).normal(0.0, 1.5, size=(vocab_size(), vocab_size()))
    logits[:, adapter_boost(adapter) % vocab_size()] += ADAPTER_BONUS
    return log_softmax(logits)


def expected_logps(table: np.ndarray, ids: list[int]) -> np.ndarray:
    """log p(x_{i+1} | x_i) for i = 0 .. n-2, computed by hand from a table."""
    return np.array([table[a, b] for a, b in zip(ids[:-1], ids[1:])])


def make_adapter(user_id: str, boost_token: int) -> bytes:
    """An adapter blob that boosts ``boost_token``: a real (safetensors, norm-only) adapter whose
    ``ln_f.bias`` holds the token id, and a value per character of the user id so blobs differ."""
    values = [float(boost_token), *(float(ord(c)) for c in user_id)]
    return encode_adapter({"ln_f.bias": torch.tensor(values)}, dtype=torch.float32)


def adapter_boost(adapter: bytes) -> int:
    """The token an adapter made by :func:`make_adapter` boosts."""
    return int(st_load(adapter)["ln_f.bias"][0])


class FakeNodeService(rpc.NodeServicer):
    """A Node service over a bigram table; records what it was asked."""

    def __init__(self, node_id: str, seed: int, *, delay_s: float = 0.0) -> None:
        self.node_id, self.seed, self.delay_s = node_id, seed, delay_s
        self.adapters: dict[str, bytes] = {}
        self.calls: list[str] = []
        self.cancelled = asyncio.Event()

    def _auth(self, context) -> None:
        if bearer_metadata(NODE)[0] not in tuple(context.invocation_metadata()):
            raise PermissionError

    def _table(self, user_id: str) -> np.ndarray | None:
        if not user_id:
            return bigram_table(self.seed)
        blob = self.adapters.get(user_id)
        return None if blob is None else adapted_table(self.seed, blob)

    async def _prologue(self, name: str, context, user_id: str = "") -> np.ndarray:
        self.calls.append(name)
        try:
            self._auth(context)
        except PermissionError:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "not the coordinator")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        table = self._table(user_id)
        if table is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no adapter for {user_id}")
        return table

    async def ScoreTokens(self, request, context):
        table = await self._prologue("ScoreTokens", context, request.user_id)
        lp = expected_logps(table, list(request.token_ids))
        return pb.ScoreTokensReply(logprobs=lp.tolist(), node_id=self.node_id,
                                   model=model_label("base", request.user_id))

    async def NextTokenDistribution(self, request, context):
        table = await self._prologue("NextTokenDistribution", context, request.user_id)
        row = table[request.token_ids[-1]]
        if request.top_k:
            top = np.argsort(-row)[: request.top_k]
            rest = np.log(max(1e-300, 1.0 - np.exp(row[top]).sum()))
            return pb.NextTokenReply(top_ids=top.tolist(), top_logprobs=row[top].tolist(), rest_logmass=rest,
                                     vocab_size=row.size, node_id=self.node_id)
        return pb.NextTokenReply(logprobs=row.tolist(), vocab_size=row.size, node_id=self.node_id)

    async def Generate(self, request, context):
        table = await self._prologue("Generate", context, request.user_id)
        last = request.token_ids[-1]
        try:
            for i in range(request.max_new_tokens):
                nxt = int(np.argmax(table[last]))
                done = i + 1 == request.max_new_tokens
                yield pb.NodeToken(token_id=nxt, logprob=float(table[last, nxt]),
                                   finish_reason=pb.FINISH_REASON_LENGTH if done else 0)
                last = nxt
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def LoadUser(self, request, context):
        await self._prologue("LoadUser", context)
        a = request.adapter
        if hashlib.sha256(a.data).digest() != a.sha256:
            await context.abort(grpc.StatusCode.DATA_LOSS, "adapter sha256 mismatch")
        self.adapters[a.user_id] = a.data
        return pb.LoadUserReply(user_id=a.user_id, bytes=len(a.data))

    async def UnloadUser(self, request, context):
        await self._prologue("UnloadUser", context)
        return pb.UnloadUserReply(unloaded=self.adapters.pop(request.user_id, None) is not None)

    async def Status(self, request, context):
        await self._prologue("Status", context)
        return pb.NodeStatus(node_id=self.node_id, state=pb.NODE_STATE_HEALTHY, user_ids=sorted(self.adapters))


@dataclass
class FakeNode:
    """A running fake node."""

    node_id: str
    service: FakeNodeService
    server: grpc.aio.Server
    address: str
    model: str

    async def stop(self) -> None:
        """Kill the node (no grace): its address stops answering."""
        await self.server.stop(None)


async def start_fake_node(coordinator: str, node_id: str, *, seed: int, model: str = "base",
                          delay_s: float = 0.0, heartbeat: bool = True) -> FakeNode:
    """Start a fake node on a free port, register it with the coordinator, send one HEALTHY heartbeat."""
    service = FakeNodeService(node_id, seed, delay_s=delay_s)
    server = grpc.aio.server()
    rpc.add_NodeServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    async with grpc.aio.insecure_channel(coordinator) as channel:
        control = rpc.NodeControlStub(channel)
        await control.Register(pb.RegisterRequest(node_id=node_id, address=address, model=model, n_blocks=2,
                                                  n_experts=16, protocol_version=1), metadata=meta(NODE))
        if heartbeat:
            await control.Heartbeat(pb.HeartbeatRequest(node_id=node_id, state=pb.NODE_STATE_HEALTHY),
                                    metadata=meta(NODE))
    return FakeNode(node_id, service, server, address, model)


def make_config(tmp: Path, **overrides) -> CoordinatorConfig:
    """A coordinator config under ``tmp`` with the test tokens and tokenizer."""
    tokenizer = tmp / "tokenizer.json"
    if not tokenizer.exists():
        write_tokenizer(tokenizer)
    fields = dict(db_path=tmp / "registry.db", bundle_dir=tmp / "bundles", admin_token=ADMIN, node_token=NODE,
                  tokenizer_path=tokenizer, heartbeat_interval_ms=60_000, chunk_size=4096,
                  max_message_bytes=4096 + 64 * 1024)
    fields.update(overrides)
    return CoordinatorConfig(**fields)


async def start_coordinator(tmp: Path, **overrides) -> CoordinatorHandle:
    """A coordinator on a free loopback port."""
    return await serve(make_config(tmp, **overrides))


def encode(tmp: Path, text: str) -> list[int]:
    """Token ids of ``text`` with the test tokenizer (what the coordinator will send nodes)."""
    return load_tokenizer(tmp / "tokenizer.json").encode(text)


@dataclass
class Federation:
    """A coordinator plus fake nodes, and an admin stub."""

    tmp: Path
    coordinator: CoordinatorHandle
    nodes: dict[str, FakeNode] = field(default_factory=dict)
    channel: grpc.aio.Channel | None = None

    @property
    def stub(self) -> rpc.FederationStub:
        """A Federation stub on a shared channel."""
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(self.coordinator.address)
        return rpc.FederationStub(self.channel)

    async def add_node(self, node_id: str, *, seed: int, model: str = "base", delay_s: float = 0.0) -> FakeNode:
        """Start and register a fake node."""
        node = await start_fake_node(self.coordinator.address, node_id, seed=seed, model=model, delay_s=delay_s)
        self.nodes[node_id] = node
        return node

    async def add_user(self, user_id: str, *, persona: str = "novelist", boost: int | None = None,
                       node_id: str = "") -> str:
        """Create a user (with an adapter boosting ``boost`` when given); returns its token."""
        request = pb.PutUserRequest(user_id=user_id, persona=persona)
        if boost is not None:
            data = make_adapter(user_id, boost)
            request.adapter.CopyFrom(pb.Adapter(user_id=user_id, data=data, sha256=hashlib.sha256(data).digest()))
        reply = await self.stub.PutUser(request, metadata=meta(ADMIN))
        if node_id:
            await self.stub.AssignUser(pb.AssignUserRequest(user_id=user_id, node_id=node_id), metadata=meta(ADMIN))
        return reply.token

    async def close(self) -> None:
        """Stop everything."""
        if self.channel is not None:
            await self.channel.close()
        for node in self.nodes.values():
            await node.stop()
        await self.coordinator.stop(grace=None)


async def federation(tmp: Path, **overrides) -> Federation:
    """A started coordinator with no nodes yet."""
    return Federation(tmp, await start_coordinator(tmp, **overrides))


def run(coro):
    """Run a test coroutine on a fresh event loop."""
    return asyncio.run(coro)
