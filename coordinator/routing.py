"""Which node serves a request: a :class:`Decision`, never a call.

- A user with an adapter goes to the node holding it (Bet 61: the own adapter wins by 5-29%).
- A user without one, or a request for the base model, goes to the base model on any healthy
  base node (Bet 55: an ensemble of other users' adapters does worse than the base), the least
  busy first, ties taken in turn.
- When the user's node is down (or fails during the request), the adapter moves to the healthy
  base node with the fewest users: the fallback order of a user's decision is that placement order.
- A mixture component names a model ("base" or a specialist); any healthy node serving it will do,
  unless it is pinned to one node, which must then serve that model.

Routing only decides. :class:`coordinator.dispatch.Dispatcher` acts on a decision: it ships the
adapter where the decision moves it, calls the node, and fails over down the fallback order.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from dataclasses import dataclass

from proto import federation_pb2 as pb
from proto.model_labels import BASE_MODEL

from .registry import NodeRecord, Registry, UserRecord


class NoNodeAvailable(Exception):
    """No healthy node can serve the request."""


class NodeUnavailable(Exception):
    """A node did not answer (raised by the injected installer; routing then tries another node)."""

    def __init__(self, node_id: str, message: str) -> None:
        super().__init__(f"node {node_id}: {message}")
        self.node_id = node_id


class UnknownNode(KeyError):
    """A request pinned a node the registry does not know."""

    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.node_id = node_id


class WrongModel(Exception):
    """A request pinned a node that serves another model than the one it asked for."""

    def __init__(self, node_id: str, served: str, asked: str) -> None:
        super().__init__(f"node {node_id!r} serves model {served!r}, not {asked!r} as the component asks")


@dataclass(frozen=True)
class Decision:
    """Where a request may go and why: ``nodes`` in fallback order (the first is tried first).

    ``adapter`` is the user whose adapter applies (None: the bare model). With ``moves_adapter`` the
    adapter is the user's own: it sits on ``home`` (None: nowhere usable), and before any other
    node is called the adapter is installed there and the user reassigned to it. ``failed_over``:
    the decision already leaves the user's own node (it is down).
    """

    nodes: tuple[NodeRecord, ...]
    reason: str
    adapter: UserRecord | None = None
    moves_adapter: bool = False
    home: str | None = None
    failed_over: bool = False

    @property
    def node(self) -> NodeRecord:
        """The node tried first."""
        return self.nodes[0]

    @property
    def adapter_user_id(self) -> str:
        """The user whose adapter applies, "" for none."""
        return self.adapter.user_id if self.adapter is not None else ""


@dataclass(frozen=True)
class Route:
    """Where one call went: the node, the adapter applied (its record as it stands after any move),
    and whether the request failed over to get there."""

    node: NodeRecord
    adapter: UserRecord | None = None
    failed_over: bool = False

    @property
    def adapter_user_id(self) -> str:
        """The user whose adapter applies, "" for none."""
        return self.adapter.user_id if self.adapter is not None else ""


class Router:
    """Routing decisions over the registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._turn = itertools.count()

    def healthy(self, model: str = BASE_MODEL, exclude: Collection[str] = ()) -> list[NodeRecord]:
        """Healthy nodes serving ``model``, by id, minus ``exclude``."""
        return [n for n in self.registry.nodes(pb.NODE_STATE_HEALTHY) if n.model == model and n.node_id not in exclude]

    def mark_down(self, node_id: str) -> None:
        """Take a node out of routing until its next healthy heartbeat."""
        self.registry.set_node_state(node_id, pb.NODE_STATE_DOWN)

    def by_load(self, model: str = BASE_MODEL, exclude: Collection[str] = ()) -> tuple[NodeRecord, ...]:
        """Healthy nodes serving ``model``, least busy first; the least busy ones taken in turn."""
        nodes = sorted(self.healthy(model, exclude), key=lambda n: n.inflight)
        if not nodes:
            raise NoNodeAvailable(f"no healthy node serves model {model!r}")
        idle = sum(1 for n in nodes if n.inflight == nodes[0].inflight)
        turn = next(self._turn) % idle
        return (*nodes[turn:idle], *nodes[:turn], *nodes[idle:])

    def placement(self, exclude: Collection[str] = ()) -> tuple[NodeRecord, ...]:
        """Healthy base nodes by fewest users (ties by id): where a moving adapter goes, in order."""
        nodes = self.healthy(BASE_MODEL, exclude)
        load = self.registry.user_counts_by_node()
        return tuple(sorted(nodes, key=lambda n: (load.get(n.node_id, 0), n.node_id)))

    def for_user(self, user: UserRecord | None, *, use_base: bool = False,
                 exclude: Collection[str] = ()) -> Decision:
        """A request by ``user`` (None: no user): own adapter's node, then placement; else the base."""
        if user is None or use_base or not user.has_adapter:
            reason = "no user" if user is None else "use_base" if use_base else "no adapter"
            return Decision(self.by_load(BASE_MODEL, exclude), f"base model ({reason})")
        current = self.registry.get_node(user.node_id) if user.node_id else None
        if current is not None and current.healthy and current.node_id not in exclude:
            return Decision((current, *self.placement({*exclude, current.node_id})), "own adapter", user,
                            moves_adapter=True, home=current.node_id)
        nodes = self.placement(exclude)
        if not nodes:
            raise NoNodeAvailable("no healthy base node to hold the adapter")
        reason = "own node down: the adapter moves" if user.node_id else "adapter placed"
        return Decision(nodes, reason, user, moves_adapter=True, failed_over=user.node_id is not None)

    def for_model(self, model: str, node_id: str = "", exclude: Collection[str] = (),
                  adapter: UserRecord | None = None) -> Decision:
        """A mixture component: the pinned node if given (must be healthy), else any node of ``model``."""
        if not node_id:
            return Decision(self.by_load(model, exclude), f"any node of {model!r}", adapter)
        node = self.registry.get_node(node_id)
        if node is None:
            raise UnknownNode(node_id)
        if node.model != model:
            # served by that node, the reply would carry another model's figures under this name
            raise WrongModel(node_id, node.model, model)
        if not node.healthy or node_id in exclude:
            raise NoNodeAvailable(f"node {node_id!r} is not healthy")
        return Decision((node,), "pinned", adapter)

    def for_component(self, model: str, node_id: str, adapter: UserRecord | None,
                      exclude: Collection[str] = ()) -> Decision:
        """A mixture component with an optional adapter: a base-model adapter, unpinned, is served
        where it sits (moved there if it has no usable node), like its user's own requests."""
        if adapter is not None and not node_id and model == BASE_MODEL:
            return self.for_user(adapter, exclude=exclude)
        return self.for_model(model, node_id, exclude, adapter)
