"""Which node serves a request.

- A user with an adapter goes to the node holding it (Bet 61: the own adapter wins by 5-29%).
- A user without one, or a request for the base model, goes to the base model on any healthy
  base node (Bet 55: an ensemble of other users' adapters does worse than the base), spread
  round-robin.
- When the user's node is down (or fails during the request), the adapter is reinstalled from
  the coordinator's store on the healthy base node with the fewest users, and the registry is
  updated: the next request goes straight there.
- A mixture component names a model ("base" or a specialist); any healthy node serving it will do.

Routing only decides; installing an adapter is an injected coroutine so the policy is testable
without a network.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from proto import federation_pb2 as pb

from .registry import NodeRecord, Registry, UserRecord

BASE_MODEL = "base"


class NoNodeAvailable(Exception):
    """No healthy node can serve the request."""


class NodeUnavailable(Exception):
    """A node did not answer (raised by the injected installer; routing then tries another node)."""

    def __init__(self, node_id: str, message: str) -> None:
        super().__init__(f"node {node_id}: {message}")
        self.node_id = node_id


@dataclass(frozen=True)
class Route:
    """Where a request goes: the node, the adapter to apply ("" for none), and whether it failed over."""

    node: NodeRecord
    adapter_user_id: str = ""
    failed_over: bool = False


Installer = Callable[[NodeRecord, UserRecord], Awaitable[None]]


class Router:
    """Routing decisions over the registry; ``install`` puts a user's adapter on a node."""

    def __init__(self, registry: Registry, install: Installer) -> None:
        self.registry = registry
        self.install = install
        self._turn = itertools.count()

    def healthy(self, model: str = BASE_MODEL, exclude: Collection[str] = ()) -> list[NodeRecord]:
        """Healthy nodes serving ``model``, by id, minus ``exclude``."""
        return [n for n in self.registry.nodes(pb.NODE_STATE_HEALTHY) if n.model == model and n.node_id not in exclude]

    def mark_down(self, node_id: str) -> None:
        """Take a node out of routing until its next healthy heartbeat."""
        self.registry.set_node_state(node_id, pb.NODE_STATE_DOWN)

    def any_node(self, model: str = BASE_MODEL, exclude: Collection[str] = ()) -> NodeRecord:
        """A healthy node serving ``model``: the least busy, ties taken in turn."""
        nodes = self.healthy(model, exclude)
        if not nodes:
            raise NoNodeAvailable(f"no healthy node serves model {model!r}")
        least = min(n.inflight for n in nodes)
        idle = [n for n in nodes if n.inflight == least]
        return idle[next(self._turn) % len(idle)]

    def placement(self, exclude: Collection[str] = ()) -> NodeRecord:
        """The healthy base node with the fewest users (ties by id): where a new adapter goes."""
        nodes = self.healthy(BASE_MODEL, exclude)
        if not nodes:
            raise NoNodeAvailable("no healthy base node to hold the adapter")
        load = self.registry.user_counts_by_node()
        return min(nodes, key=lambda n: (load.get(n.node_id, 0), n.node_id))

    async def place(self, user: UserRecord, exclude: Collection[str] = ()) -> NodeRecord:
        """Install ``user``'s adapter on the best healthy base node (trying others if one fails)."""
        excluded = set(exclude)
        while True:
            node = self.placement(excluded)
            try:
                await self.install(node, user)
            except NodeUnavailable:
                self.mark_down(node.node_id)
                excluded.add(node.node_id)
                continue
            self.registry.assign_user(user.user_id, node.node_id)
            return node

    async def route_user(self, user: UserRecord | None, *, use_base: bool = False,
                         exclude: Collection[str] = ()) -> Route:
        """The route of a request by ``user`` (None: no user): own adapter's node, else the base."""
        if user is None or use_base or not user.has_adapter:
            return Route(self.any_node(BASE_MODEL, exclude))
        current = self.registry.get_node(user.node_id) if user.node_id else None
        if current is not None and current.healthy and current.node_id not in exclude:
            return Route(current, user.user_id)
        node = await self.place(user, exclude)
        return Route(node, user.user_id, failed_over=user.node_id is not None)

    def route_model(self, model: str, node_id: str = "", exclude: Collection[str] = ()) -> NodeRecord:
        """The node for a mixture component: the pinned one if given (must be healthy), else any."""
        if node_id:
            node = self.registry.get_node(node_id)
            if node is None:
                raise KeyError(node_id)
            if not node.healthy or node_id in exclude:
                raise NoNodeAvailable(f"node {node_id!r} is not healthy")
            return node
        return self.any_node(model, exclude)
