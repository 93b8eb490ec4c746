"""A real coordinator with fake nodes, served on a background event-loop thread, for blocking clients.

Table-driven cases and hypothesis examples are synchronous; they call one long-lived server through
plain (blocking) gRPC stubs instead of starting a server per case. The server side is the same as in
``coordinator_harness`` (real grpc.aio coordinator, fake nodes with hand-computable bigram models).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
from coordinator_harness import ADMIN, NODE, Federation, federation, meta
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc

TEXT = "the cat sat on the mat and then the dog ran to the park"


class LiveCoordinator:
    """A coordinator (config ``overrides``) with fake base nodes and users, on its own loop thread.

    ``tokens`` maps "admin", "node" and each user id to its bearer token.
    """

    def __init__(self, tmp: Path, **overrides) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-coordinator", daemon=True)
        self.thread.start()
        self.fed: Federation = self.call(federation(tmp, **overrides))
        self.tokens: dict[str, str] = {"admin": ADMIN, "node": NODE}
        self.channel = grpc.insecure_channel(self.fed.coordinator.address)
        self.stub = rpc.FederationStub(self.channel)
        self.control = rpc.NodeControlStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def address(self) -> str:
        """host:port of the coordinator."""
        return self.fed.coordinator.address

    def call(self, coro, timeout: float = 60.0):
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add_node(self, node_id: str, *, seed: int, model: str = "base", delay_s: float = 0.0) -> None:
        """Start and register a fake node."""
        self.call(self.fed.add_node(node_id, seed=seed, model=model, delay_s=delay_s))

    def add_user(self, user_id: str, *, boost: int | None = None, node_id: str = "") -> str:
        """Create a user (with an adapter when ``boost`` is given); remembers and returns its token."""
        self.tokens[user_id] = self.call(self.fed.add_user(user_id, boost=boost, node_id=node_id))
        return self.tokens[user_id]

    def meta(self, who: str) -> tuple[tuple[str, str], ...]:
        """Metadata with the token of ``who`` ("admin", "node" or a user id)."""
        return meta(self.tokens[who])

    def alive(self) -> bool:
        """The server answers a health check and a valid Score (a fresh channel: nothing cached)."""
        with grpc.insecure_channel(self.address) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            reply = rpc.FederationStub(ch).Score(pb.ScoreRequest(text=TEXT), metadata=meta(ADMIN), timeout=10)
        return status == health_pb2.HealthCheckResponse.SERVING and len(reply.logprobs) == len(TEXT.split()) - 1

    def close(self) -> None:
        """Stop the server, the nodes and the loop thread."""
        self.channel.close()
        self.call(self.fed.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def status_of(fn) -> grpc.StatusCode:
    """Call ``fn()`` (a blocking RPC, or one returning a stream, which is drained); its status code."""
    try:
        result = fn()
        if hasattr(result, "__next__"):
            for _ in result:
                pass
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK
