"""Node processes that Ray restarts: :class:`SupervisedHost` and the Ray actor ``SupervisedNodeActor``.

Ray restarts an actor whose process dies (``max_restarts``, see docs/reliability.md) by running its
constructor again with the arguments it was first given; nothing else of the old process survives.
So a supervised host is given everything it hosts up front: the coordinator's address, the node
token, and the specs of its virtual nodes (one or several: a process may host many, and they all
come back together). When it is constructed again after a crash
(``was_current_actor_reconstructed``) it starts those nodes by itself, on the actor's event loop,
with no call from anyone: each node registers again under its own id, installs its bundles from its
local store (``bundle_dir``, verified again; fetched only when missing or damaged), gets back the
adapters of the users the coordinator still assigns to it (``RegisterReply.user_ids``), and
heartbeats HEALTHY, after which the coordinator routes to it again.

    actor = SupervisedNodeActor.options(max_restarts=3, num_cpus=0).remote(
        coordinator=address, specs=specs, node_token=token, bundle_dir="work/node-store")
    results = ray.get(actor.start_planned.remote())   # first start; after a crash it runs on its own
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import ray

from .actor import NodeHost


def reconstructed() -> bool:
    """True inside an actor that Ray restarted after its process died; False anywhere else."""
    with contextlib.suppress(Exception):  # outside Ray, or outside an actor: a first start
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    return False


@dataclass(frozen=True)
class StartPlan:
    """What a supervised host starts, first and after every restart (``NodeHost.start``'s arguments)."""

    coordinator_address: str
    node_specs: tuple[dict, ...]
    node_token: str
    tls_root_cert: bytes | None = None
    tls_server_name: str | None = None


class SupervisedHost(NodeHost):
    """A :class:`NodeHost` that knows its nodes from its constructor, so a restart brings them back."""

    def __init__(self, *, coordinator: str, specs: list[dict], node_token: str, tls_root_cert: bytes | None = None,
                 tls_server_name: str | None = None, **host_options: Any) -> None:
        super().__init__(**host_options)
        self.plan = StartPlan(coordinator, tuple(specs), node_token, tls_root_cert, tls_server_name)
        self.restarted = reconstructed()
        self.started_at = time.time()
        self.results: list[dict] | None = None
        self._starting: asyncio.Task | None = None
        if self.restarted:
            # an async actor's constructor runs on its event loop's thread: the loop is running
            self._starting = asyncio.get_event_loop().create_task(self._start_planned())

    async def _start_planned(self) -> list[dict]:
        p = self.plan
        self.results = await self.start(p.coordinator_address, list(p.node_specs), p.node_token,
                                        tls_root_cert=p.tls_root_cert, tls_server_name=p.tls_server_name)
        return self.results

    async def start_planned(self) -> list[dict]:
        """Start the planned nodes (once: a second call, or a call after a restart, waits for that start)."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start_planned())
        return await asyncio.shield(self._starting)

    async def status(self) -> dict:
        """``NodeHost.status`` plus whether this process is a restart and when it started."""
        return await super().status() | {"restarted": self.restarted, "started_at": self.started_at,
                                         "node_ids": [s["node_id"] for s in self.plan.node_specs]}


SupervisedNodeActor = ray.remote(SupervisedHost)
