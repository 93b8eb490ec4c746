"""Node life cycle, and many virtual nodes per process: ``NodeHost`` and the Ray actor ``NodeActor``.

A node's life: start its own grpc.aio ``Node`` server on a loopback port (port 0), register with
the coordinator (``NodeControl.Register``, node token as ``authorization: Bearer``, announcing its
address), fetch and install its bundles, load its users' adapters, then heartbeat (and report its
routing counts) until stopped. A heartbeat reply may name new bundles (installed in the
background) or say the coordinator no longer knows the node (it restarted from an empty
registry): the node registers again, announcing what it holds.

``NodeHost`` runs any number of such virtual nodes in one process (issue 8). What they share is
what is frozen: decoded bundle weights (one copy per bundle sha256, ``node.assembly.WeightStore``)
and one channel to the coordinator. What each keeps for itself: its gRPC server and port, its
adapters, its expert mask, its routing counts and its byte counters (counted per node on the
shared channel by ``node.counting.CountingChannel``), so per-node figures stay exact.

``NodeActor = ray.remote(NodeHost)``: the methods are coroutines, so Ray runs them on the actor's
event loop, where the grpc.aio servers live. sim.run calls, through Ray::

    actor = NodeActor.remote()                                   # or .options(num_cpus=...)
    infos = ray.get(actor.start.remote(coordinator_address, specs, node_token, tls_root_cert))
    ray.get(actor.status.remote()); ray.get(actor.stop.remote())
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import ray
import torch

from model.codecs import CODECS
from proto import federation_pb2 as pb
from proto.auth_metadata import bearer_metadata
from proto.bundle_chunks import node_control_stub
from proto.ids import is_valid_id
from proto.message_limits import message_size_options

from .assembly import WeightStore
from .counting import ByteCounter, CountingChannel
from .errors import NodeError
from .fetch import FetchPolicy
from .local_store import LocalBundles
from .memory import rss_bytes
from .partial import PartialExperts, PrefetchSettings, whole_bundles
from .runtime import ControlLink, NodeLimits, VirtualNode
from .server import NodeServer, start_node_server

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
DEFAULT_HEARTBEAT_MS = 2000
MAX_CONCURRENT_INSTALLS = 8  # per process (NodeHost): see its docstring
REGISTER_ATTEMPTS = 4
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.DEADLINE_EXCEEDED}
CHANNEL_OPTIONS = message_size_options()


class SpecError(ValueError):
    """A node spec handed to ``NodeHost.start`` is malformed."""


@dataclass(frozen=True, kw_only=True)
class NodeSpec:
    """One virtual node to start: its id, model, bundles, users and link profile.

    ``bundles`` entries are names, or dicts with ``name`` and optionally ``size``, ``sha256``
    (hex string or 32 bytes), ``model``, ``codec``. The node installs these plus whatever the
    coordinator's Register reply lists; likewise for ``users``. ``link`` is the network model's
    profile name, kept and echoed back (virtual time is sim's business, not the node's).
    """

    node_id: str
    bundles: tuple[pb.BundleRef, ...] = ()
    users: tuple[str, ...] = ()
    model: str = "base"
    codec: str = ""
    link: str = ""
    prefetch: PrefetchSettings | None = None  # a partial node: expert budget and miss policy (node.partial)

    @staticmethod
    def from_dict(d: dict) -> NodeSpec:
        """Validate a spec dict; SpecError names the key at fault."""
        if not isinstance(d, dict):
            raise SpecError(f"a node spec must be a dict, got {type(d).__name__}")
        known = {"node_id", "bundles", "users", "model", "codec", "link", "prefetch"}
        extra = sorted(set(d) - known)
        if extra:
            raise SpecError(f"node spec: unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")
        node_id = d.get("node_id")
        if not is_valid_id(node_id):
            raise SpecError(f"node spec: node_id {node_id!r} is not a valid id")
        users = d.get("users", [])
        if not isinstance(users, (list, tuple)) or not all(is_valid_id(u) for u in users):
            raise SpecError(f"node spec {node_id}: users must be a list of valid ids")
        for key in ("model", "codec", "link"):
            if not isinstance(d.get(key, ""), str):
                raise SpecError(f"node spec {node_id}: {key} must be a string")
        bundles = d.get("bundles", [])
        if not isinstance(bundles, (list, tuple)):
            raise SpecError(f"node spec {node_id}: bundles must be a list")
        try:
            prefetch = None if d.get("prefetch") is None else PrefetchSettings.from_dict(d["prefetch"])
        except (TypeError, ValueError) as exc:
            raise SpecError(f"node spec {node_id}: {exc}") from None
        return NodeSpec(node_id=node_id, bundles=tuple(_bundle_ref(node_id, b) for b in bundles),
                        users=tuple(users), model=d.get("model", "base") or "base", codec=d.get("codec", ""),
                        link=d.get("link", ""), prefetch=prefetch)


def _bundle_ref(node_id: str, b: Any) -> pb.BundleRef:
    if isinstance(b, str):
        return pb.BundleRef(name=b)
    if isinstance(b, pb.BundleRef):
        return b
    if not isinstance(b, dict) or not isinstance(b.get("name"), str):
        raise SpecError(f"node spec {node_id}: a bundle must be a name or a dict with a name, got {b!r:.80}")
    sha = b.get("sha256", b"")
    if isinstance(sha, str):
        try:
            sha = bytes.fromhex(sha)
        except ValueError:
            raise SpecError(f"node spec {node_id}: bundle {b['name']!r} sha256 is not hex") from None
    if sha and len(sha) != 32:
        raise SpecError(f"node spec {node_id}: bundle {b['name']!r} sha256 must be 32 bytes")
    return pb.BundleRef(name=b["name"], size=int(b.get("size", 0)), sha256=sha,
                        model=str(b.get("model", "")), codec=str(b.get("codec", "")))


@dataclass
class HostedNode:
    """A virtual node with its server and background task."""

    spec: NodeSpec
    node: VirtualNode
    link: ControlLink  # the node's link to the coordinator (node.control, typed as always present)
    server: NodeServer | None = None
    heartbeat_ms: int = DEFAULT_HEARTBEAT_MS
    task: asyncio.Task | None = None  # heartbeats
    provisioning: asyncio.Task | None = None  # installs asked for by heartbeat replies
    reported: int = -1  # predictions count at the last ReportRouting
    registered_shape: tuple[int, int] = (0, 0)  # (n_blocks, n_experts) the last Register announced
    errors: list[str] = field(default_factory=list)


class NodeHost:
    """Hosts many virtual nodes in one process, sharing frozen weights (see the module docstring).

    ``torch_threads`` (default 1) sets the process's torch intra-op threads: node processes share
    the machine's cores with each other, and with more threads than free cores OpenMP's
    spin-waiting made a tiny forward pass 10-100x slower under load (measured on this machine).
    None leaves torch's default.

    ``max_concurrent_installs`` bounds the nodes of this process fetching at once: a fetch holds its
    bundle about twice (bytes received, verified records) until it is decoded or found shared, so
    256 nodes of a 30m federation (44 MB bundles) fetching together would hold ~22 GB. The nodes
    share one event loop, so fewer concurrent fetches cost no throughput; waiting nodes beat.

    ``bundle_dir``: keep every verified bundle on disk there (``node.local_store``), so that a node
    started again with the same id (a process Ray restarted, ``python -m node`` run again) installs
    its bundles from disk, verified again, instead of fetching them.
    """

    def __init__(self, *, bind_host: str = "127.0.0.1", limits: NodeLimits | None = None,
                 fetch_policy: FetchPolicy | None = None, torch_threads: int | None = 1,
                 heartbeats: bool = True, max_concurrent_installs: int = MAX_CONCURRENT_INSTALLS,
                 server_tls: tuple[bytes, bytes] | None = None, bundle_dir: str | os.PathLike | None = None) -> None:
        if max_concurrent_installs < 1:
            raise SpecError(f"max_concurrent_installs must be >= 1, got {max_concurrent_installs}")
        self._install_slots = asyncio.Semaphore(max_concurrent_installs)
        self.bind_host = bind_host
        self.server_tls = server_tls  # (key PEM, certificate PEM): the nodes' own servers speak TLS only
        self.limits = limits or NodeLimits()
        self.fetch_policy = fetch_policy or FetchPolicy(allowed_codecs=CODECS)
        self.heartbeats = heartbeats
        # verified bundles kept on disk, one folder per node id, so a node restarted with its id reads them back
        self.local = LocalBundles(bundle_dir) if bundle_dir else None
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.store = WeightStore()
        self.nodes: dict[str, HostedNode] = {}
        self._channel: grpc.aio.Channel | None = None
        self._coordinator = ""
        self._token = ""

    # ----------------------------------------------------------------------------- public API

    async def start(self, coordinator_address: str, node_specs: list[dict], node_token: str,
                    tls_root_cert: bytes | None = None, tls_server_name: str | None = None) -> list[dict]:
        """Start, register and provision the virtual nodes of ``node_specs``; one result dict each.

        Every node is started concurrently. A node that fails (registration refused, a bundle
        that does not verify) is reported with ``ok: False`` and its ``error``, and stopped; the
        others carry on. ``ready`` says whether a node has a model to serve (one offered no bundle
        yet stays up and installs what later heartbeats offer). Raises SpecError before starting
        anything if a spec is malformed or a node id is already hosted here. Calling it again
        adds nodes (same coordinator).
        """
        specs = [NodeSpec.from_dict(d) for d in node_specs]
        ids = [s.node_id for s in specs]
        dup = sorted({i for i in ids if ids.count(i) > 1 or i in self.nodes})
        if dup:
            raise SpecError(f"node id {dup[0]!r} appears twice or is already hosted here")
        if not node_token:
            raise SpecError("a node token is needed to register")
        if self._channel is None:
            self._coordinator, self._token = coordinator_address, node_token
            if tls_root_cert:
                opts = CHANNEL_OPTIONS + ([("grpc.ssl_target_name_override", tls_server_name)]
                                          if tls_server_name else [])
                creds = grpc.ssl_channel_credentials(root_certificates=tls_root_cert)
                self._channel = grpc.aio.secure_channel(coordinator_address, creds, options=opts)
            else:
                self._channel = grpc.aio.insecure_channel(coordinator_address, options=CHANNEL_OPTIONS)
        elif coordinator_address != self._coordinator:
            raise SpecError(f"this host already talks to {self._coordinator}, not {coordinator_address}")
        return list(await asyncio.gather(*(self._start_one(s) for s in specs)))

    async def status(self) -> dict:
        """Process memory, what is shared, and every node's summary (bytes by kind included)."""
        return {
            "pid": os.getpid(),
            "rss_bytes": rss_bytes(),
            "store": self.store.stats(),
            "nodes": [h.node.summary() | {"address": h.server.address if h.server else "",
                                          "link": h.spec.link, "errors": list(h.errors)}
                      for h in self.nodes.values()],
        }

    async def heartbeat_now(self, node_id: str) -> dict:
        """One heartbeat of ``node_id`` now (routing report, plan applied), as a driver that paces a
        partial node's requests between plans calls it; returns the node's summary."""
        h = self.nodes[node_id]
        node = h.node
        if node.predictions != h.reported and node.routing is not None:  # the planner sees this request first
            await h.link.stub.ReportRouting(pb.RoutingReport(node_id=node_id, histogram=node.histogram()),
                                            metadata=h.link.metadata, timeout=h.link.timeout_s)
            h.reported = node.predictions
        await self._heartbeat_once(h)
        return h.node.summary() | {"errors": list(h.errors)}

    async def stop(self) -> None:
        """Stop every node: heartbeats, servers, shared weights, the coordinator channel."""
        for h in list(self.nodes.values()):
            await self._stop_one(h)
        self.nodes.clear()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def stop_node(self, node_id: str) -> bool:
        """Stop one virtual node (a fault without killing the whole actor); True when it was hosted."""
        h = self.nodes.pop(node_id, None)
        if h is None:
            return False
        await self._stop_one(h)
        return True

    # ----------------------------------------------------------------------------- one node

    def _control(self, counter: ByteCounter) -> ControlLink:
        stub = node_control_stub(CountingChannel(self._channel, counter))  # FetchBundle's chunks as views
        return ControlLink(stub=stub, metadata=bearer_metadata(self._token), policy=self.fetch_policy,
                           local=self.local)

    async def _start_one(self, spec: NodeSpec) -> dict:
        t0 = time.perf_counter()
        counter = ByteCounter()
        link = self._control(counter)
        node = VirtualNode(spec.node_id, store=self.store, model_name=spec.model, limits=self.limits,
                           control=link, counter=counter)
        if spec.prefetch is not None:
            node.partial = PartialExperts(node, spec.prefetch)
        h = self.nodes[spec.node_id] = HostedNode(spec=spec, node=node, link=link)
        result: dict[str, Any] = {"node_id": spec.node_id, "address": "", "ok": False, "ready": False,
                                  "error": None, "model": spec.model, "link": spec.link}
        try:
            h.server = await start_node_server(node, self._token, host=self.bind_host, tls=self.server_tls)
            result["address"] = h.server.address
            reply = await self._register(h)
            t_reg = time.perf_counter()
            if self.heartbeats:  # beating from now on: a long install must not look like a dead node
                h.task = asyncio.create_task(self._heartbeat_loop(h), name=f"heartbeat-{spec.node_id}")
            refs = whole_bundles(node, _merge_refs(spec.bundles, reply.bundles))
            if reply.chunk_size and not self.fetch_policy.chunk_size:
                h.link.policy = dataclasses.replace(self.fetch_policy, chunk_size=reply.chunk_size)
            install = await self._install(node, refs) if refs else None
            if node.served is not None and h.registered_shape != node.shape():
                try:  # announce the model's shape and bundles, unknown at first; best effort
                    await self._register(h)
                except grpc.aio.AioRpcError as exc:
                    h.errors.append(f"announcing the model shape: {_describe(exc)}")
            t_inst = time.perf_counter()
            users, failed = await self._load_users(h, list(dict.fromkeys([*spec.users, *reply.user_ids])))
            await self._heartbeat_once(h)  # HEALTHY at once, not one interval later
            result.update(ok=True, ready=node.served is not None, users=users, users_failed=failed,
                          install=None if install is None else {
                              "installed": install.installed, "fetched": install.fetched,
                              "from_local": install.from_local,
                              "bytes_fetched": install.bytes_fetched, "resumes": install.resumes,
                              "refetches": install.refetches, "seconds": round(install.seconds, 4)},
                          seconds={"register": round(t_reg - t0, 4), "install": round(t_inst - t_reg, 4),
                                   "total": round(time.perf_counter() - t0, 4)})
        except (NodeError, grpc.aio.AioRpcError, OSError) as exc:
            msg = _describe(exc)
            log.warning("node %s failed to start: %s", spec.node_id, msg)
            result["error"] = msg
            self.nodes.pop(spec.node_id, None)
            await self._stop_one(h)
        result["bytes"] = counter.as_dict()
        return result

    async def _register(self, h: HostedNode) -> pb.RegisterReply:
        node = h.node
        assert h.server is not None  # a node registers once its server listens (_start_one)
        L, E = node.shape()
        installed = [pb.BundleRef(name=b.name, size=b.size, sha256=b.sha256, model=b.model, codec=b.codec)
                     for b in node.held_bundles()]
        request = pb.RegisterRequest(node_id=node.node_id, address=h.server.address, model=node.model_name,
                                     codec=h.spec.codec, installed=installed, user_ids=node.adapters.user_ids(),
                                     n_blocks=L, n_experts=E, protocol_version=PROTOCOL_VERSION)
        for attempt in range(REGISTER_ATTEMPTS):
            try:
                reply = await h.link.stub.Register(request, metadata=h.link.metadata, timeout=h.link.timeout_s)
                break
            except grpc.aio.AioRpcError as exc:
                # A busy coordinator sheds or cancels calls under load (seen with 1,024 nodes): retry.
                if exc.code() not in _TRANSIENT or attempt == REGISTER_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.2 * 2 ** attempt)
        h.heartbeat_ms = reply.heartbeat_interval_ms or DEFAULT_HEARTBEAT_MS
        h.registered_shape = (L, E)
        return reply

    async def _load_users(self, h: HostedNode, user_ids: list[str]) -> tuple[list[str], dict[str, str]]:
        failed: dict[str, str] = {}
        for uid in user_ids:
            if h.node.adapters.get(uid) is not None:
                continue  # the coordinator's LoadUser got there first
            try:
                await h.node.fetch_user(uid)
            except NodeError as exc:
                failed[uid] = f"{exc.code.name}: {exc}"
        return h.node.adapters.user_ids(), failed

    async def _heartbeat_once(self, h: HostedNode) -> None:
        node = h.node
        try:
            reply = await h.link.stub.Heartbeat(node.heartbeat(), metadata=h.link.metadata, timeout=h.link.timeout_s)
            if not reply.known:
                again = await self._register(h)
                self._provision(h, list(again.bundles), list(again.user_ids))
            elif whole_bundles(node, reply.bundles):
                self._provision(h, whole_bundles(node, reply.bundles), [])
            if reply.known and node.partial is not None:
                await node.partial.on_heartbeat(reply)
            if node.predictions != h.reported and node.routing is not None:
                await h.link.stub.ReportRouting(
                    pb.RoutingReport(node_id=node.node_id, histogram=node.histogram()),
                    metadata=h.link.metadata, timeout=h.link.timeout_s)
                h.reported = node.predictions
        except (grpc.aio.AioRpcError, NodeError) as exc:
            # The coordinator may be restarting: keep serving and try again next beat.
            h.errors = (h.errors + [_describe(exc)])[-5:]
        except Exception as exc:  # a heartbeat must never kill the node
            log.exception("node %s: heartbeat failed", node.node_id)
            h.errors = (h.errors + [f"{type(exc).__name__}: {exc}"])[-5:]

    async def _install(self, node: VirtualNode, refs: list[pb.BundleRef]):
        async with self._install_slots:
            return await node.install(refs)

    def _provision(self, h: HostedNode, refs: list[pb.BundleRef], users: list[str]) -> None:
        """Install bundles and load users in the background, so that heartbeats keep flowing."""
        if h.provisioning is not None and not h.provisioning.done():
            return  # the next heartbeat offers whatever is still missing
        if not refs and all(h.node.adapters.get(u) is not None for u in users):
            return

        async def run() -> None:
            try:
                if refs:
                    await self._install(h.node, refs)
                _, failed = await self._load_users(h, users)
                h.errors = (h.errors + [f"user {u}: {e}" for u, e in failed.items()])[-5:]
            except NodeError as exc:
                h.errors = (h.errors + [_describe(exc)])[-5:]

        h.provisioning = asyncio.create_task(run(), name=f"provision-{h.node.node_id}")

    async def _heartbeat_loop(self, h: HostedNode) -> None:
        while True:
            await asyncio.sleep(h.heartbeat_ms / 1000)
            await self._heartbeat_once(h)

    async def _stop_one(self, h: HostedNode) -> None:
        for task in (h.task, h.provisioning):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if h.server is not None:
            await h.server.stop(0.2)
        h.node.close()


def _describe(exc: BaseException) -> str:
    """One line naming the status code (gRPC errors and NodeErrors) and what went wrong."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, NodeError):
        return f"{exc.code.name}: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _merge_refs(spec_refs, reply_refs) -> list[pb.BundleRef]:
    """The spec's bundles and the coordinator's, one per name (the coordinator's ref wins: it has the sha256)."""
    out: dict[str, pb.BundleRef] = {r.name: r for r in spec_refs}
    for r in reply_refs:
        out[r.name] = r
    return list(out.values())


NodeActor = ray.remote(NodeHost)
