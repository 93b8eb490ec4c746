"""What the coordinator's services share: state, and the helpers every RPC uses.

:class:`Core` holds the registry, bundle store, byte counters, node clients, router,
authenticator and tokenizer, and knows how to call a node with failover and a deadline, install an
adapter, and turn exceptions into status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Collection, Coroutine
from typing import Any, TypeVar

import grpc

from model.fractal_moe import is_norm_param
from proto import federation_pb2 as pb
from proto.model_labels import BASE_MODEL

from .auth import Authenticator
from .config import CoordinatorConfig
from .dispatch import Dispatcher, node_down, node_error
from .limits import GuardInterceptor, RequestError
from .nodes import NodeClients
from .registry import NodeRecord, Registry, UserRecord
from .routing import NodeUnavailable, NoNodeAvailable, Router, UnknownNode, WrongModel
from .store import BundleIntegrityError, BundleNameError, BundleNotFound, BundleRangeError, BundleStore, StoreError
from .tokens import Tokenizer
from .traffic import Traffic

log = logging.getLogger(__name__)

T = TypeVar("T")

def _translate(err: Exception) -> RequestError | None:
    """The status a known exception maps to, or None for an unexpected one."""
    if isinstance(err, RequestError):
        return err
    if isinstance(err, NoNodeAvailable):
        return RequestError(grpc.StatusCode.UNAVAILABLE, str(err))
    if isinstance(err, NodeUnavailable):
        return RequestError(grpc.StatusCode.UNAVAILABLE, str(err))
    if isinstance(err, WrongModel):
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(err))
    if isinstance(err, UnknownNode):
        return RequestError(grpc.StatusCode.NOT_FOUND, f"unknown node {err.node_id!r}")
    if isinstance(err, BundleNotFound):
        return RequestError(grpc.StatusCode.NOT_FOUND, str(err))
    if isinstance(err, BundleNameError):
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(err))
    if isinstance(err, BundleRangeError):
        return RequestError(grpc.StatusCode.OUT_OF_RANGE, str(err))
    if isinstance(err, (BundleIntegrityError, StoreError)):
        return RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(err))
    return None


def not_found(message: str) -> RequestError:
    """A NOT_FOUND error."""
    return RequestError(grpc.StatusCode.NOT_FOUND, message)


def precondition(message: str) -> RequestError:
    """A FAILED_PRECONDITION error."""
    return RequestError(grpc.StatusCode.FAILED_PRECONDITION, message)


def handles_errors(fn):
    """Decorate a unary servicer method: known exceptions become their status code."""
    @functools.wraps(fn)
    async def wrapper(self, request, context):
        try:
            return await fn(self, request, context)
        except Exception as err:  # translated or re-raised below
            mapped = _translate(err)
            if mapped is None:
                raise
            await context.abort(mapped.code, mapped.message)
    return wrapper


def handles_stream_errors(fn):
    """Decorate a server-streaming servicer method (an async generator) like :func:`handles_errors`."""
    @functools.wraps(fn)
    async def wrapper(self, request, context):
        try:
            async for item in fn(self, request, context):
                yield item
        except Exception as err:
            mapped = _translate(err)
            if mapped is None:
                raise
            await context.abort(mapped.code, mapped.message)
    return wrapper


async def first_error(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coros`` concurrently; on the first failure cancel the rest and raise that failure."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coros]
    except BaseExceptionGroup as eg:
        raise eg.exceptions[0] from None
    return [t.result() for t in tasks]


class Core:
    """The coordinator's shared state and helpers."""

    def __init__(self, config: CoordinatorConfig, *, registry: Registry, store: BundleStore, traffic: Traffic,
                 tokenizer: Tokenizer | None, guard: GuardInterceptor) -> None:
        self.config = config
        self.registry = registry
        self.store = store
        self.traffic = traffic
        self.tokenizer = tokenizer
        self.guard = guard
        self.auth = Authenticator(config.admin_token, config.node_token, registry.user_for_token_hash)
        guard.identify = self.auth.user_of
        self.clients = NodeClients(traffic, config.node_token, max_message_bytes=config.max_message_bytes,
                                   root_certificates=config.node_tls_ca.read_bytes() if config.node_tls_ca else None)
        self.router = Router(registry)
        self.dispatch = Dispatcher(self.router, self.install, self.clients.forget, max_failover=config.max_failover)
        self.bos_id = self._special(config.bos_token)
        # Prefetch planning hook: given a node (after its heartbeat is recorded), the byte ranges it
        # should fetch next; sent in HeartbeatReply.prefetch. None ships no prefetch plan.
        self.prefetch_planner: Callable[[NodeRecord], list[pb.ByteRange]] | None = None
        # Where a partial node sends the hidden states of its remote misses (HeartbeatReply.expert_peer).
        self.expert_peer: Callable[[NodeRecord], str] | None = None
        # The expert usage a partial node biases its router toward (HeartbeatReply.router_prior); None: none.
        self.router_prior: Callable[[NodeRecord], pb.RouterPrior | None] | None = None
        # Nodes that registered with a Soup-of-Experts instantiation on record, not yet re-applied
        # (see resume_soup); and the tasks re-applying them, kept referenced until done.
        self.soup_pending: set[str] = set()
        self._soup_tasks: set[asyncio.Task] = set()

    def _special(self, token: str | None) -> int | None:
        if token is None or self.tokenizer is None:
            return None
        token_id = self.tokenizer.token_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no token {token!r}")
        return token_id

    def require_tokenizer(self) -> Tokenizer:
        """The tokenizer, or FAILED_PRECONDITION when the coordinator was started without one."""
        if self.tokenizer is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, "the coordinator has no tokenizer")
        return self.tokenizer

    def timeout(self, context) -> float:
        """Seconds a node call may take: the node timeout, or less if the client's deadline is sooner."""
        remaining = context.time_remaining()
        if remaining is None:
            return self.config.node_timeout_s
        if remaining <= 0:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return min(self.config.node_timeout_s, remaining)

    def user(self, user_id: str, *, with_adapter: bool = True) -> UserRecord:
        """The user (``with_adapter=False``: without reading the adapter blob), or NOT_FOUND."""
        user = self.registry.get_user(user_id, with_adapter=with_adapter)
        if user is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"unknown user {user_id!r}")
        return user

    async def install(self, node: NodeRecord, user: UserRecord) -> None:
        """Ship ``user``'s adapter to ``node`` (Node.LoadUser); NodeUnavailable when the node is gone.

        The blob is read here when ``user`` was read without it: only a request that moves or
        reinstalls an adapter reads it."""
        data = user.adapter if user.adapter is not None else self.registry.adapter(user.user_id)
        if data is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"user {user.user_id!r} has no adapter")
        request = pb.LoadUserRequest(adapter=pb.Adapter(
            user_id=user.user_id, format=user.adapter_format, data=data, sha256=user.adapter_sha256 or b""))
        try:
            await self.clients.load_user(node, request, timeout=self.config.node_timeout_s)
        except grpc.aio.AioRpcError as err:
            if node_down(err) or err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise NodeUnavailable(node.node_id, err.code().name) from None
            raise node_error(node, err) from None

    async def uninstall(self, node_id: str | None, user_id: str) -> None:
        """Best effort: drop ``user_id``'s adapter from ``node_id`` (a down node forgets it anyway)."""
        node = self.registry.get_node(node_id) if node_id else None
        if node is None or not node.healthy:
            return
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.clients.unload_user(node, pb.UnloadUserRequest(user_id=user_id),
                                           timeout=self.config.node_timeout_s)

    def adapter_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """The base model's norm parameters ({name: shape}) from the base bundles in the store: what
        an uploaded adapter must fit; None while the store holds no base bundle."""
        shapes: dict[str, tuple[int, ...]] = {}
        for bundle in self.store.list():
            if bundle.model == BASE_MODEL:
                shapes.update({k: v for k, v in self.store.shapes(bundle.name).items() if is_norm_param(k)})
        return shapes or None

    def note_registered(self, node_id: str) -> None:
        """A node (re)registered: if it accepted an InstantiateSoup before, re-apply it once it is healthy."""
        if self.registry.get_soup(node_id) is not None:
            self.soup_pending.add(node_id)

    def resume_soup(self, node: NodeRecord) -> None:
        """Called on a healthy heartbeat: send a restarted soup node the h it served before (in the
        background; a node that does not hold its bank yet is tried again on its next heartbeat)."""
        if node.node_id not in self.soup_pending:
            return
        self.soup_pending.discard(node.node_id)
        task = asyncio.create_task(self._reapply_soup(node), name=f"resume-soup-{node.node_id}")
        self._soup_tasks.add(task)
        task.add_done_callback(self._soup_tasks.discard)

    async def _reapply_soup(self, node: NodeRecord) -> None:
        saved = self.registry.get_soup(node.node_id)
        if saved is None:
            return
        try:
            await self.clients.instantiate_soup(node, pb.InstantiateSoupRequest.FromString(saved),
                                                timeout=self.config.node_timeout_s)
        except grpc.aio.AioRpcError as err:
            log.warning("node %s: re-applying its soup instantiation failed (%s); retrying on its next "
                        "heartbeat", node.node_id, err.code().name)
            self.soup_pending.add(node.node_id)

    def note_failover(self, failed_over: bool, user_id: str) -> None:
        """Count a request that failed over (it is answered, from another node)."""
        if failed_over:
            self.traffic.failed_over(user_id)

    def stats(self, user_id: str | None) -> pb.Stats:
        """Byte and request counters: the whole federation's (None), or one user's (the Federation
        RPCs made with that user's token or, by the admin, for that user)."""
        stats = self.traffic.stats(user_id)
        c = self.guard.counters
        if user_id is None:
            stats.requests_ok = c.ok.get("Federation", 0)
            stats.requests_failed = c.failed.get("Federation", 0)
            stats.requests_shed = c.shed.get("Federation", 0)
            stats.requests_failed_over = self.traffic.requests_failed_over
        else:
            stats.requests_ok = c.user_ok.get(user_id, 0)
            stats.requests_failed = c.user_failed.get(user_id, 0)
            stats.requests_shed = c.user_shed.get(user_id, 0)
            stats.requests_failed_over = self.traffic.requests_failed_over_by_user.get(user_id, 0)
        return stats

    def request_counters(self) -> dict[str, int]:
        """The guard's outcome counters, flattened for persistence ("ok.Federation", "user_ok.alice")."""
        out = {f"{name}.{key}": value for name, table in self.guard.counters.tables().items()
               for key, value in table.items()}
        out["failed_over"] = self.traffic.requests_failed_over
        return out

    def restore_counters(self, values: dict[str, int]) -> None:
        """Reload counters saved by :meth:`request_counters`."""
        tables = self.guard.counters.tables()
        for key, value in values.items():
            name, _, service = key.partition(".")
            if name in tables and service:
                tables[name][service] = tables[name].get(service, 0) + value
            elif key == "failed_over":
                self.traffic.requests_failed_over += value

    def node_info(self, node: NodeRecord, visible_user: str | None = None) -> pb.NodeInfo:
        """A node as ``NodeInfo``; with ``visible_user`` only that user is listed among its users."""
        users = self.registry.users_on_node(node.node_id)
        if visible_user is not None:
            users = [u for u in users if u == visible_user]
        return pb.NodeInfo(node_id=node.node_id, address=node.address, state=node.state,
                           last_heartbeat_ms=node.last_heartbeat_ms, model=node.model, bundles=node.bundles,
                           user_ids=users, expert_mask=node.expert_mask, n_blocks=node.n_blocks,
                           n_experts=node.n_experts, inflight=node.inflight)

    def user_info(self, user: UserRecord) -> pb.UserInfo:
        """A user as ``UserInfo`` (never the token)."""
        node = self.registry.get_node(user.node_id) if user.node_id else None
        return pb.UserInfo(user_id=user.user_id, persona=user.persona, node_id=user.node_id or "",
                           has_adapter=user.has_adapter, adapter_bytes=user.adapter_bytes,
                           adapter_sha256=user.adapter_sha256 or b"",
                           node_state=node.state if node else pb.NODE_STATE_UNSPECIFIED)

    def bundles_for(self, model: str, codec: str, installed: Collection[str]) -> list[pb.BundleRef]:
        """Bundles of ``model`` (and ``codec`` when given) that a node has not installed."""
        have = set(installed)
        return [pb.BundleRef(name=b.name, size=b.size, sha256=b.sha256, model=b.model, codec=b.codec)
                for b in self.store.list()
                if b.model == model and (not codec or b.codec == codec) and b.name not in have]
