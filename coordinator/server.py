"""Start and stop a coordinator in-process: :func:`serve` returns a running :class:`CoordinatorHandle`.

    handle = await serve(CoordinatorConfig(db_path=..., bundle_dir=..., admin_token=..., node_token=...,
                                           tokenizer_path=...))
    handle.address        # "127.0.0.1:PORT" actually bound
    await handle.stop()   # flushes counters, closes channels and the database

The server carries the Federation and NodeControl services, gRPC health checking and server
reflection; a guard caps concurrent RPCs per service and bounds message sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import grpc
import tokenizers
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.bundle_chunks import add_node_control_servicer
from proto.message_limits import message_size_options

from .auth import server_credentials
from .config import CoordinatorConfig
from .core import Core
from .federation import FederationService
from .limits import GuardInterceptor
from .nodecontrol import NodeControlService
from .registry import Registry, now_ms
from .store import BundleStore
from .tokens import HFTokenizer, Tokenizer, load_tokenizer
from .traffic import Traffic

log = logging.getLogger(__name__)

FEDERATION = pb.DESCRIPTOR.services_by_name["Federation"].full_name
NODE_CONTROL = pb.DESCRIPTOR.services_by_name["NodeControl"].full_name


@dataclass
class CoordinatorHandle:
    """A running coordinator: its address, its state (for in-process inspection), and how to stop it."""

    server: grpc.aio.Server
    core: Core
    host: str
    port: int
    health: health_aio.HealthServicer
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _stopped: bool = False

    @property
    def address(self) -> str:
        """host:port to dial."""
        return f"{self.host}:{self.port}"

    @property
    def registry(self) -> Registry:
        """The persisted registry."""
        return self.core.registry

    @property
    def store(self) -> BundleStore:
        """The bundle store."""
        return self.core.store

    @property
    def traffic(self) -> Traffic:
        """The byte counters."""
        return self.core.traffic

    def flush(self) -> None:
        """Write the byte and request counters to the database now."""
        self.core.registry.save_traffic(self.core.traffic.rows())
        self.core.registry.save_counters(self.core.request_counters())

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving (in-flight RPCs get ``grace`` seconds), flush counters, close everything."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.stop(grace)
        self.flush()
        await self.core.clients.close()
        self.core.registry.close()

    async def wait(self) -> None:
        """Block until the server stops."""
        await self.server.wait_for_termination()


async def _every(seconds: float, action) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            action()
        except Exception:  # a periodic chore must not kill the server
            log.exception("periodic task failed")


async def serve(config: CoordinatorConfig, *,
                tokenizer: Tokenizer | tokenizers.Tokenizer | None = None) -> CoordinatorHandle:
    """Start a coordinator for ``config`` and return once it is listening.

    ``tokenizer`` (a ``tokenizers.Tokenizer``, or any object with encode/decode/vocab_size/token_id)
    overrides ``config.tokenizer_path``; with neither, Score and Generate answer FAILED_PRECONDITION.
    """
    if isinstance(tokenizer, tokenizers.Tokenizer):
        tokenizer = HFTokenizer(tokenizer)
    elif tokenizer is None and config.tokenizer_path is not None:
        tokenizer = load_tokenizer(config.tokenizer_path)
    registry = Registry(config.db_path)
    try:
        store = BundleStore(config.bundle_dir, chunk_size=config.chunk_size, memory_bytes=config.bundle_memory_bytes)
        traffic = Traffic()
        traffic.load(registry.load_traffic())
        guard = GuardInterceptor({FEDERATION: config.max_concurrent_rpcs,
                                  NODE_CONTROL: config.max_concurrent_node_rpcs})
        core = Core(config, registry=registry, store=store, traffic=traffic, tokenizer=tokenizer, guard=guard)
        core.restore_counters(registry.load_counters())

        server = grpc.aio.server(interceptors=[guard], options=message_size_options(config.max_message_bytes))
        rpc.add_FederationServicer_to_server(FederationService(core), server)
        add_node_control_servicer(NodeControlService(core), server)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        names = (FEDERATION, NODE_CONTROL, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)

        target = f"{config.host}:{config.port}"
        if config.tls_cert is not None:
            assert config.tls_key is not None  # CoordinatorConfig.__post_init__ requires the pair
            port = server.add_secure_port(target, server_credentials(config.tls_cert, config.tls_key))
        else:
            port = server.add_insecure_port(target)
        await server.start()
    except BaseException:
        registry.close()
        raise
    for name in ("", FEDERATION, NODE_CONTROL):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    handle = CoordinatorHandle(server=server, core=core, host=config.host, port=port, health=health)
    interval = config.heartbeat_interval_ms / 1000
    handle._tasks = [
        asyncio.create_task(_every(interval, lambda: registry.mark_silent_nodes_down(
            now_ms() - config.heartbeat_timeout_ms))),
        asyncio.create_task(_every(config.flush_interval_s, handle.flush)),
    ]
    return handle
