"""Acting on a routing decision: the one place that calls a node for a request and fails over.

:class:`coordinator.routing.Router` decides (a :class:`~coordinator.routing.Decision`: nodes in
fallback order, and why); :meth:`Dispatcher.call` walks that order. It ships the user's adapter to
a node the decision moves it to, calls the node, and on a node that is down (UNAVAILABLE, or hung
past the node timeout while the client still has time) takes the node out and tries the next one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Collection
from typing import TypeVar

import grpc

from .limits import RequestError
from .registry import NodeRecord, UserRecord
from .routing import Decision, NodeUnavailable, NoNodeAvailable, Route, Router

T = TypeVar("T")

Call = Callable[[Route], Awaitable[T]]
# Ships a user's adapter to a node (Node.LoadUser); raises NodeUnavailable when the node is gone.
Installer = Callable[[NodeRecord, UserRecord], Awaitable[None]]

# Node failures after which the request is tried on another node.
_NODE_DOWN = {grpc.StatusCode.UNAVAILABLE}
# A node call that ran out its node timeout while the client still has this long left means a hung
# node: fail over, as for a dead one. Less than this left, the client's own deadline is what ran out.
_FAILOVER_MIN_LEFT_S = 1.0


def node_error(node: NodeRecord, err: grpc.aio.AioRpcError) -> RequestError:
    """The status to return when ``node`` failed a call with ``err`` (and no failover applies)."""
    code = err.code()
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return RequestError(code, f"node {node.node_id}: {code.name.lower()}")
    return RequestError(grpc.StatusCode.INTERNAL, f"node {node.node_id} failed: {code.name}: {err.details()}")


def node_down(err: grpc.aio.AioRpcError) -> bool:
    """True when a node call failed because the node is gone (not because of the request)."""
    return err.code() in _NODE_DOWN


def _hung(err: grpc.aio.AioRpcError, time_left: Callable[[], float | None] | None) -> bool:
    """True when a node call timed out on the node timeout rather than on the client's deadline."""
    if time_left is None or err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
        return False
    left = time_left()
    return left is None or left > _FAILOVER_MIN_LEFT_S


class Dispatcher:
    """Calls nodes as routing decided, moving adapters and failing over."""

    def __init__(self, router: Router, install: Installer, forget: Callable[[str], Awaitable[None]], *,
                 max_failover: int) -> None:
        self.router = router
        self.install = install
        self._forget = forget
        self.max_failover = max_failover

    async def take_out(self, node: NodeRecord) -> None:
        """Take a node that failed a call out of routing (until its next healthy heartbeat)."""
        self.router.mark_down(node.node_id)
        await self._forget(node.address)

    async def place(self, user: UserRecord, exclude: Collection[str] = ()) -> NodeRecord:
        """Move ``user``'s adapter to the first placement node that takes it (AssignUser with no node)."""
        for node in self.router.placement(exclude):
            if await self._move(user, node):
                return node
        raise NoNodeAvailable("no healthy base node to hold the adapter")

    async def _move(self, user: UserRecord, node: NodeRecord) -> bool:
        """Install ``user``'s adapter on ``node`` and reassign the user; False (node taken out) when the
        node does not answer. Such a node does not count against ``max_failover``: no call was made."""
        try:
            await self.install(node, user)
        except NodeUnavailable:
            await self.take_out(node)
            return False
        self.router.registry.assign_user(user.user_id, node.node_id)
        return True

    async def call(self, decision: Decision, call: Call[T], *,
                   time_left: Callable[[], float | None] | None = None) -> tuple[T, Route]:
        """Call ``decision``'s nodes in order until one answers; the result and the route it took.

        A node that is down (UNAVAILABLE, or given ``time_left``, the client's remaining seconds,
        None for no deadline: DEADLINE_EXCEEDED while the client still has time) is taken out and
        the next one tried, up to ``max_failover`` of them. A node that answers NOT_FOUND for the
        adapter it should hold (it restarted) gets the adapter reinstalled once.
        """
        adapter, home = decision.adapter, decision.home
        failed_over = decision.failed_over
        down: list[str] = []
        reinstalled = False
        nodes = iter(decision.nodes)
        node = next(nodes, None)
        while node is not None:
            if decision.moves_adapter and node.node_id != home:
                assert adapter is not None  # a decision that moves an adapter carries it (Router.for_user)
                if not await self._move(adapter, node):
                    node = next(nodes, None)
                    continue
                adapter, home = dataclasses.replace(adapter, node_id=node.node_id), node.node_id
            route = Route(node, adapter, failed_over)
            try:
                return await call(route), route
            except grpc.aio.AioRpcError as err:
                if node_down(err) or _hung(err, time_left):
                    await self.take_out(node)
                    down.append(node.node_id)
                    failed_over = True
                    if len(down) > self.max_failover:
                        break
                    node = next(nodes, None)
                    continue
                if err.code() == grpc.StatusCode.NOT_FOUND and adapter is not None and not reinstalled:
                    await self.install(node, adapter)
                    reinstalled = True
                    continue
                raise node_error(node, err) from None
        raise RequestError(grpc.StatusCode.UNAVAILABLE,
                           f"no node could serve the request (tried {', '.join(sorted(down)) or 'none'})")
