"""A federation that heals itself: what Ray's restarts do not bring back, :class:`Healer` replaces.

Two mechanisms, one after the other (docs/reliability.md, "Self-healing"):

1. **Restart.** Every node actor runs under Ray's supervision (``heal.restarts``, Ray's
   ``max_restarts``): when its process dies, Ray starts it again and the new process brings back
   every node it hosted, under the same ids (``node.supervised``): they register, install their
   bundles from their own disk, get their users' adapters back and heartbeat HEALTHY.
2. **Replacement.** A planned node that is not HEALTHY and cannot come back is replaced: at once
   when Ray says its process is dead for good (restarts used up, killed without restart: Ray's
   ``ActorDiedError``), after ``heal.replace_after_s`` seconds otherwise (a process that restarts
   but whose node does not get healthy). The healer starts a new node of the same model and
   bundle, id ``<old id>-r<k>``, on a supervised actor of its own, and moves the old node's users'
   adapters to it (``AssignUser``) once it is healthy, so that every model the scenario asked for
   keeps its healthy nodes.

:func:`strength` says whether the federation is at full strength: every planned node (or its
replacement) healthy on a registration newer than a given time, and every known user's adapter held
by a healthy node. `sim.faults.heal` measures how long that takes after kill -9 of node processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import grpc
import ray.exceptions

from proto import federation_pb2 as pb

from .actors import stop_actor

log = logging.getLogger(__name__)
CHECK_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 2.0  # a status call to a node's actor: an answer, Ray's verdict, or a process still booting


def now_ms() -> int:
    """Wall-clock milliseconds, the registry's clock (``registered_ms``, ``last_heartbeat_ms``)."""
    return int(time.time() * 1000)


class Healer:
    """Replaces planned nodes that stay down (see the module docstring); ``start()``, ``stop()``.

    ``fed`` is the running ``sim.federation.LocalFederation`` (typed Any: that module imports this one)."""

    def __init__(self, fed: Any, *, replace_after_s: float, interval_s: float = CHECK_INTERVAL_S) -> None:
        self.fed = fed
        self.replace_after_s = replace_after_s
        self.interval_s = interval_s
        self.current: dict[str, str] = {p.node_id: p.node_id for p in fed.plans}  # planned id -> node in its place
        self.down_since: dict[str, float] = {}  # node id -> monotonic time first seen not healthy
        self.replacements: list[dict] = []  # what was replaced, when, and when the new node was ready
        self.actors: list[Any] = []
        self.actor_of: dict[str, Any] = {n: a for a, ids in zip(fed.actors, fed.actor_nodes) for n in ids}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Watch the federation in the background."""
        self._task = asyncio.create_task(self._loop(), name="healer")

    async def stop(self) -> None:
        """Stop watching and stop the replacement nodes."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for actor in self.actors:
            await stop_actor(actor)
        self.actors = []

    async def _loop(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # the coordinator restarting, a Ray hiccup: look again next time
                log.warning("healer: check failed", exc_info=True)
            await asyncio.sleep(self.interval_s)

    async def check(self) -> list[str]:
        """One look: start a replacement for every node down too long; the planned ids replaced now."""
        registry = self.fed.coordinator.registry
        t = time.monotonic()
        replaced = []
        for plan in self.fed.plans:
            node_id = self.current[plan.node_id]
            rec = registry.get_node(node_id)
            if rec is not None and rec.healthy:
                self.down_since.pop(node_id, None)
                continue
            since = self.down_since.setdefault(node_id, t)
            if t - since >= self.replace_after_s or await self.dead_for_good(node_id):
                await self.replace(plan.node_id)
                replaced.append(plan.node_id)
        return replaced

    async def dead_for_good(self, node_id: str) -> bool:
        """Whether Ray says the process of ``node_id`` will not come back (``ActorDiedError``); a
        process that answers, is restarting, or does not answer in time may still bring it back."""
        actor = self.actor_of.get(node_id)
        if actor is None:
            return False
        try:
            await asyncio.wait_for(asyncio.wrap_future(actor.status.remote().future()), PROBE_TIMEOUT_S)
        except ray.exceptions.ActorDiedError:
            return True
        except Exception:  # noqa: BLE001 - restarting (ActorUnavailableError), slow, or busy: not dead for good
            return False
        return False

    async def replace(self, planned_id: str) -> dict:
        """Start a new node in the place of ``planned_id`` (its current node stays down); the record."""
        fed = self.fed
        plan = next(p for p in fed.plans if p.node_id == planned_id)
        old = self.current[planned_id]
        k = sum(r["planned"] == planned_id for r in self.replacements) + 1
        new_id = f"{planned_id}-r{k}"
        self.current[planned_id] = new_id
        self.down_since.pop(old, None)
        record = {"planned": planned_id, "replaced": old, "node_id": new_id, "model": plan.model,
                  "at_ms": now_ms(), "ready_s": None, "users_moved": []}
        self.replacements.append(record)
        log.warning("healer: node %s down for %.0f s: starting %s in its place", old, self.replace_after_s, new_id)
        t0 = time.monotonic()
        actor = fed.node_actor([fed.node_spec(plan, new_id)])
        self.actors.append(actor)
        self.actor_of[new_id] = actor
        asyncio.create_task(self._settle(actor, record, old, t0), name=f"replace-{new_id}")
        return record

    async def _settle(self, actor: Any, record: dict, old: str, t0: float) -> None:
        """Once the replacement started: move the old node's users' adapters onto it (base nodes hold users)."""
        try:
            results = await asyncio.wrap_future(actor.start_planned.remote().future())
        except Exception as exc:  # noqa: BLE001 - its process died too: the next check replaces it again
            record["error"] = f"{type(exc).__name__}: {exc}"
            return
        record["error"] = next((r["error"] for r in results if not r["ok"]), None)
        record["ready_s"] = round(time.monotonic() - t0, 3)
        registry = self.fed.coordinator.registry
        if record["model"] != "base" or record["error"]:
            return
        for user in registry.users_on_node(old):
            try:
                await self.fed.stub.AssignUser(pb.AssignUserRequest(user_id=user, node_id=record["node_id"]),
                                               metadata=self.fed.admin, timeout=30)
                record["users_moved"].append(user)
            except grpc.aio.AioRpcError as exc:  # the user may have moved already (its request failed over)
                log.info("healer: user %s stays where it is: %s", user, exc)


def strength(fed: Any, since_ms: int = 0, victims: set[str] | frozenset[str] = frozenset()) -> dict:
    """How whole the federation is now: planned places filled by a healthy node (a node in ``victims``
    counts only once registered again after ``since_ms``), models served, users' adapters held."""
    registry = fed.coordinator.registry
    current = fed.healer.current if fed.healer is not None else {p.node_id: p.node_id for p in fed.plans}
    filled = []
    for plan in fed.plans:
        node_id = current[plan.node_id]
        rec = registry.get_node(node_id)
        fresh = rec is not None and (node_id not in victims or rec.registered_ms >= since_ms)
        if rec is not None and rec.healthy and fresh and rec.bundles:
            filled.append(plan.node_id)
    healthy = {n.node_id: n for n in registry.nodes(pb.NODE_STATE_HEALTHY)}
    models = {p.model for p in fed.plans}
    served = {m for m in models if any(n.model == m for n in healthy.values())}
    held = []
    for user in fed.suite.known_users:
        user_rec = registry.get_user(user)
        node = healthy.get(user_rec.node_id or "") if user_rec is not None else None
        if node is not None and user in node.held_users and (node.node_id not in victims or
                                                             node.registered_ms >= since_ms):
            held.append(user)
    full = len(filled) == len(fed.plans) and served == models and len(held) == len(fed.suite.known_users)
    return {"full": full, "places_filled": len(filled), "places": len(fed.plans),
            "models_served": sorted(served), "models": sorted(models), "adapters_held": len(held),
            "adapters": len(fed.suite.known_users)}
