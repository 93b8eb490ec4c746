"""A running federation on this machine: bundles, the gRPC coordinator, Ray node actors, users.

`LocalFederation` is what `sim.run` (and the tests and benchmarks) start and stop. Everything
between the coordinator and the nodes is real gRPC on loopback sockets; nodes are Ray actors
(on a local Ray, or on an existing cluster given its address).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import ray
from tqdm.auto import tqdm

from coordinator.auth import new_token
from coordinator.config import CoordinatorConfig
from coordinator.server import CoordinatorHandle, serve
from model.codecs import bundle_meta, encode_state_dict
from model.pipeline import Suite
from node.actor import NodeActor
from node.adapters import encode_adapter
from node.fetch import FetchPolicy
from node.supervised import SupervisedNodeActor
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.auth_metadata import bearer_metadata
from proto.bundle import write_bundle
from proto.message_limits import MAX_MESSAGE_BYTES, message_size_options

from . import soup
from .actors import actor_groups, init_ray, packing, process_memory, stop_actor
from .healing import Healer
from .scenario import Scenario

log = logging.getLogger(__name__)

# sim's own channels, proxies and benches accept twice the federation's cap, so that they are
# never the limit a run measures.
SIM_MAX_MESSAGE_BYTES = 2 * MAX_MESSAGE_BYTES
CHANNEL_OPTIONS = message_size_options(SIM_MAX_MESSAGE_BYTES, send=False)


def bundle_name(model: str, codec: str) -> str:
    """The store's name of ``model``'s bundle in ``codec``: a valid bundle name ([A-Za-z0-9._-]), so a
    composed codec's '+' becomes '_' (``programmer-prune50_ternary-ec``)."""
    return f"{model}-{codec.replace('+', '_')}"


class FederationError(RuntimeError):
    """The federation could not be started as the scenario asks."""


@dataclass
class BundleInfo:
    """A bundle written for shipping: which model, which codec, how big."""

    name: str
    path: Path
    model: str  # "base" or a specialist persona
    codec: str
    size: int
    sha256: str
    tensors: int

    def spec(self) -> dict:
        """The bundle as a node spec names it (``node.actor``: name, size, sha256 hex, model, codec)."""
        return {"name": self.name, "size": self.size, "sha256": self.sha256, "model": self.model, "codec": self.codec}


@dataclass
class NodePlan:
    """What one node of the federation is to hold."""

    node_id: str
    index: int
    model: str  # "base", a specialist persona, or "soup" (a Soup-of-Experts bank)
    bundle: str
    users: list[str] = field(default_factory=list)  # whose adapters it holds
    link: str = ""
    target: str = ""  # soup nodes: the persona (or "a+b" pair) whose users it specialises for
    group: list[str] = field(default_factory=list)  # soup nodes: those users (their adapters live elsewhere)


def plan_nodes(scn: Scenario, suite: Suite, links: list[str]) -> list[NodePlan]:
    """Which node holds what: one node per specialist first, then the soup nodes, then base nodes
    holding the users.

    Users are dealt round-robin over the base nodes (each user's adapter lives on exactly one node);
    each soup node specialises for a group of known users (``sim.soup.targets``).
    """
    n = scn.federation.nodes
    specialists = list(scn.specialists())
    n_soup = scn.soup_nodes()
    if len(specialists) + n_soup >= n:
        raise FederationError(f"{len(specialists)} specialist and {n_soup} soup nodes leave no base node "
                              f"among federation.nodes = {n}")
    codec = scn.model.expert_codec
    groups = soup.targets(suite, n_soup)
    plans = []
    for i in range(n):
        k = i - len(specialists)
        model = specialists[i] if k < 0 else soup.SOUP_MODEL if k < n_soup else "base"
        target, group = groups[k] if model == soup.SOUP_MODEL else ("", [])
        plans.append(NodePlan(node_id=f"node-{i:04d}", index=i, model=model, bundle=bundle_name(model, codec),
                              link=links[i], target=target, group=list(group)))
    base_nodes = [p for p in plans if p.model == "base"]
    for k, user in enumerate(suite.known_users):
        base_nodes[k % len(base_nodes)].users.append(user)
    return plans


async def serve_again(config: CoordinatorConfig) -> CoordinatorHandle:
    """Serve ``config`` (its port) again; a port still closing is retried for a few seconds."""
    for _ in range(49):
        try:
            return await serve(config)
        except RuntimeError:  # gRPC could not bind the port yet
            await asyncio.sleep(0.2)
    return await serve(config)  # the 50th try lets its error through


class LocalFederation:
    """Start and stop a whole federation for a scenario. Use ``async with`` or start()/stop()."""

    def __init__(self, scn: Scenario, suite: Suite, workdir: Path, *, link_names: list[str],
                 progress: bool = True, host: str = "127.0.0.1", port: int = 0,
                 bundle_cache: dict[tuple, BundleInfo] | None = None) -> None:
        self.scn = scn
        # bundles already written from this suite's models (by model, codecs, soup settings), reused as they are:
        # each coordinator copies them into its own store (sim.sweep shares one between its points)
        self.bundle_cache = bundle_cache
        self.listen = (host, port)  # where the coordinator listens (port 0: any free port)
        self.suite = suite
        self.workdir = Path(workdir)
        self.progress = progress
        self.admin_token = new_token()  # pasted into client commands: never starts with "-"
        self.node_token = new_token()
        self.user_tokens: dict[str, str] = {}
        self.bundles: dict[str, BundleInfo] = {}
        self.plans = plan_nodes(scn, suite, link_names)
        self.soup_instances: dict[str, dict] = {}  # soup node -> what it instantiated
        self.handle: CoordinatorHandle | None = None
        self.channel: grpc.aio.Channel | None = None
        self._stub: rpc.FederationStub | None = None
        self.actors: list = []
        self.actor_nodes: list[list[str]] = []
        self.node_results: dict[str, dict] = {}
        self.phases: dict[str, float] = {}  # wall seconds per start-up phase
        self.nodes_per_actor = scn.federation.nodes_per_actor  # as packed by start_nodes (see packing)
        self.actor_startup: list[dict] = []  # per actor, as its nodes finished starting (see start_nodes)
        self.extra_actors: list = []  # actors of nodes outside the plan (see extra_nodes)
        self._ray_started_here = False
        self.node_store = self.workdir / "node-store"  # each node's own disk: verified bundles, by node id
        self.healer: Healer | None = None  # while the federation heals itself (see start)

    @property
    def stub(self) -> rpc.FederationStub:
        """The federation's client stub on its coordinator channel; an error before the coordinator started."""
        if self._stub is None:
            raise RuntimeError("the federation has no coordinator channel yet: start it first")
        return self._stub

    @property
    def coordinator(self) -> CoordinatorHandle:
        """The running coordinator; an error before start() and after stop()."""
        if self.handle is None:
            raise RuntimeError("the federation's coordinator is not running")
        return self.handle

    # ---- start-up ---------------------------------------------------------------------------
    async def __aenter__(self) -> LocalFederation:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def model_state(self, model: str):
        """Weights of ``model`` ("base" or a specialist persona)."""
        return self.suite.base_state() if model == "base" else self.suite.specialist_state(model)

    def write_bundles(self) -> None:
        """Encode each model the nodes need with the scenario's codecs and write it as a bundle."""
        out = self.workdir / "bundles"
        out.mkdir(parents=True, exist_ok=True)
        codec, other = self.scn.model.expert_codec, self.scn.model.other_codec
        for model in dict.fromkeys(p.model for p in self.plans):
            name = bundle_name(model, codec)
            path = out / f"{name}.ffb"
            key = (model, codec, other, repr(self.scn.soup) if model == soup.SOUP_MODEL else "")
            if self.bundle_cache is not None and key in self.bundle_cache:
                self.bundles[name] = self.bundle_cache[key]
                continue
            if model == soup.SOUP_MODEL:
                entries, meta = soup.bank_records(self.scn, self.suite)
            else:
                entries = encode_state_dict(self.model_state(model), expert_codec=codec, other_codec=other)
                meta = bundle_meta(self.suite.preset.model, model=model, expert_codec=codec, other_codec=other,
                                   preset=self.suite.preset.name, seed=self.suite.seed)
            size = write_bundle(path, entries, meta)
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            self.bundles[name] = BundleInfo(name=name, path=path, model=model, codec=codec, size=size,
                                            sha256=sha, tensors=len(entries))
            if self.bundle_cache is not None:
                self.bundle_cache[key] = self.bundles[name]

    def clear_coordinator_state(self) -> None:
        """Remove a previous run's registry and store from the work folder.

        The coordinator's SQLite registry keeps its byte counters and nodes across restarts (as a
        real coordinator must); a run that reused them would report the last run's traffic too.
        """
        for suffix in ("", "-wal", "-shm", "-journal"):
            (self.workdir / f"coordinator.db{suffix}").unlink(missing_ok=True)
        shutil.rmtree(self.workdir / "store", ignore_errors=True)
        # the nodes' own disks too: a node of this run fetches its bundles (and its bytes are counted)
        shutil.rmtree(self.node_store, ignore_errors=True)

    async def start_coordinator(self) -> None:
        """Serve the coordinator in this process (its own gRPC server on a loopback port), from a
        registry and a store of this run's own."""
        self.clear_coordinator_state()
        cfg = CoordinatorConfig(
            host=self.listen[0], port=self.listen[1],
            db_path=self.workdir / "coordinator.db", bundle_dir=self.workdir / "store",
            admin_token=self.admin_token, node_token=self.node_token,
            tokenizer_path=self.suite.tokenizer_path,
            # heartbeats of many nodes share 2 cores with the model: give them slack
            heartbeat_interval_ms=max(2000, 100 * self.scn.federation.nodes),
            max_concurrent_rpcs=max(64, 4 * self.scn.workload.concurrency),
            # every node registers, fetches and beats at once at start-up: shedding them would fail nodes
            max_concurrent_node_rpcs=max(256, 2 * self.scn.federation.nodes),
            node_timeout_s=120.0,
        )
        self.handle = await serve(cfg)
        for b in self.bundles.values():
            self.handle.store.put_file(b.name, b.path, model=b.model, codec=b.codec)
        self._open_channel()

    def _open_channel(self) -> None:
        """The federation's own client channel to the coordinator as it is now."""
        self.channel = grpc.aio.insecure_channel(self.coordinator.address, options=CHANNEL_OPTIONS)
        self._stub = rpc.FederationStub(self.channel)

    async def _close_channel(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    async def put_users(self) -> None:
        """Register every user with the coordinator: known users with their adapters, unknown without."""
        personas = {name: src.persona for name, src in self.suite.sources.items()}
        for user in self.suite.known_users:
            blob = encode_adapter(self.suite.adapter_state(user))
            adapter = pb.Adapter(user_id=user, format="safetensors", data=blob, sha256=hashlib.sha256(blob).digest())
            request = pb.PutUserRequest(user_id=user, persona=personas[user], adapter=adapter, rotate_token=True)
            reply = await self.stub.PutUser(request, metadata=bearer_metadata(self.admin_token))
            self.user_tokens[user] = reply.token
        for user in self.suite.unknown_users:
            reply = await self.stub.PutUser(pb.PutUserRequest(user_id=user, persona=personas[user], rotate_token=True),
                                            metadata=bearer_metadata(self.admin_token))
            self.user_tokens[user] = reply.token

    def start_ray(self) -> None:
        """Connect to the scenario's Ray cluster, or start a local one."""
        self._ray_started_here = init_ray(self.scn.federation.address) or self._ray_started_here

    async def start_nodes(self) -> None:
        """Start the node actors, have every node register, fetch and install its bundle."""
        assert self.handle is not None
        requested = self.scn.federation.nodes_per_actor
        self.nodes_per_actor = packing(len(self.plans), requested, int(ray.cluster_resources().get("CPU", 1)))
        if requested == 1 and self.nodes_per_actor != requested:
            log.warning("%d nodes, one actor each, would not fit: packing %d nodes per actor",
                        len(self.plans), self.nodes_per_actor)
        groups = actor_groups(self.plans, self.nodes_per_actor)
        self.actors = [self.node_actor([self.node_spec(p) for p in g]) for g in groups]
        self.actor_nodes = [[p.node_id for p in g] for g in groups]
        refs = [actor.start_planned.remote() for actor in self.actors]
        bar = tqdm(total=len(self.plans), desc="ship bundles", unit="node", disable=not self.progress,
                   dynamic_ncols=True)
        t0 = time.perf_counter()
        pending = {asyncio.ensure_future(asyncio.wrap_future(r.future())) for r in refs}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                results = fut.result()
                # where start-up time goes: the actor's own process start vs its nodes' start inside it
                slowest = max((r.get("seconds", {}).get("total", 0.0) for r in results), default=0.0)
                self.actor_startup.append({"done_s": time.perf_counter() - t0, "slowest_node_s": slowest,
                                           "nodes": len(results)})
                for res in results:
                    self.node_results[res["node_id"]] = res
                    bar.update(1)
        bar.close()
        failed = [nid for nid, r in self.node_results.items() if not r.get("ok", False)]
        if failed:
            raise FederationError(f"{len(failed)} node(s) failed to start, first {failed[0]}: "
                                  f"{self.node_results[failed[0]].get('error')}")
        await self.wait_healthy(len(self.plans))

    def node_spec(self, plan: NodePlan, node_id: str = "") -> dict:
        """The spec a node actor starts ``plan``'s node from (``node_id``: another id, for a replacement)."""
        b = self.bundles[plan.bundle]
        return {"node_id": node_id or plan.node_id, "model": plan.model, "codec": b.codec, "link": plan.link,
                "bundles": [b.spec()]}

    def node_actor(self, specs: list[dict]) -> Any:
        """A node actor for ``specs`` under Ray's supervision: Ray restarts its process up to
        ``heal.restarts`` times, and the restarted process brings the same nodes back by itself
        (``node.supervised``), their bundles read from their own disk (``node_store``)."""
        # num_cpus=0: node actors mostly wait on sockets; Ray must not cap them at one per core
        return SupervisedNodeActor.options(num_cpus=0, max_concurrency=1000,
                                           max_restarts=self.scn.heal.restarts).remote(
            coordinator=self.coordinator.address, specs=specs, node_token=self.node_token, torch_threads=1,
            bundle_dir=str(self.node_store))

    async def wait_healthy(self, n: int, timeout: float = 120.0) -> None:
        """Wait until the coordinator sees ``n`` healthy nodes."""
        t0 = time.monotonic()
        while True:
            reply = await self.stub.ListNodes(pb.ListNodesRequest(state=pb.NODE_STATE_HEALTHY),
                                              metadata=bearer_metadata(self.admin_token))
            if len(reply.nodes) >= n:
                return
            if time.monotonic() - t0 > timeout:
                raise FederationError(f"only {len(reply.nodes)} of {n} nodes healthy after {timeout:.0f} s")
            await asyncio.sleep(0.2)

    async def assign_users(self) -> None:
        """Place each known user's adapter on the node the plan gives it (the coordinator ships it)."""
        sem = asyncio.Semaphore(16)

        async def one(user: str, node_id: str) -> None:
            async with sem:
                await self.stub.AssignUser(pb.AssignUserRequest(user_id=user, node_id=node_id),
                                           metadata=bearer_metadata(self.admin_token))
        await asyncio.gather(*(one(u, p.node_id) for p in self.plans for u in p.users))

    async def specialise_soup_nodes(self) -> None:
        """Each soup node estimates its users' domain weights from a sample of their own text and
        instantiates their specialist from the bank (Federation.InstantiateSoup, as an admin would)."""
        for p in (p for p in self.plans if p.model == soup.SOUP_MODEL):
            req = pb.SoupRequest(node_id=p.node_id,
                                 sample_text=soup.sample_text(self.suite, p.group, self.scn.soup.sample_chars))
            reply = await self.stub.InstantiateSoup(req, metadata=self.admin, timeout=300)
            self.soup_instances[p.node_id] = soup.instance_record(reply, req.ByteSize())

    async def start(self) -> None:
        """Bring the whole federation up, timing each phase (wall seconds)."""
        t = time.perf_counter()
        self.write_bundles()
        self.phases["write_bundles"] = time.perf_counter() - t
        t = time.perf_counter()
        await self.start_coordinator()
        await self.put_users()
        self.phases["coordinator"] = time.perf_counter() - t
        t = time.perf_counter()
        self.start_ray()
        self.phases["ray_init"] = time.perf_counter() - t
        t = time.perf_counter()
        await self.start_nodes()
        self.phases["nodes_up_and_loaded"] = time.perf_counter() - t
        t = time.perf_counter()
        await self.assign_users()
        self.phases["assign_users"] = time.perf_counter() - t
        if any(p.model == soup.SOUP_MODEL for p in self.plans):
            t = time.perf_counter()
            await self.specialise_soup_nodes()
            self.phases["soup_instantiate"] = time.perf_counter() - t
        if self.scn.heal.replace_after_s:
            self.healer = Healer(self, replace_after_s=self.scn.heal.replace_after_s)
            self.healer.start()

    async def stop(self) -> None:
        """Stop nodes, the coordinator, and Ray if this federation started it."""
        if self.healer is not None:
            await self.healer.stop()  # stops the replacements it started too
            self.healer = None
        for actor in self.actors + self.extra_actors:
            await stop_actor(actor)
        self.actors, self.extra_actors = [], []
        await self._close_channel()
        if self.handle is not None:
            await self.handle.stop()
            self.handle = None
        if self._ray_started_here:
            ray.shutdown()
            self._ray_started_here = False

    # ---- faults: what a crash, a restart or another link does to the running federation ------
    async def restart_coordinator(self) -> None:
        """Stop the coordinator and serve it again on the same registry, bundle store and port, as
        a coordinator that crashed and came back; the federation's own channel is reopened.

        Nodes and clients are not told: their channels reconnect to the same port on their own.
        """
        handle = self.coordinator
        config = dataclasses.replace(handle.core.config, port=handle.port)
        await self._close_channel()
        await handle.stop()
        self.handle = await serve_again(config)
        self._open_channel()

    def kill_actor(self, index: int) -> list[str]:
        """Kill node actor ``index`` outright (``ray.kill``, no restart), as a machine that crashed;
        returns the ids of the nodes it hosted. The coordinator is not told: it finds out."""
        ray.kill(self.actors[index], no_restart=True)
        return list(self.actor_nodes[index])

    @contextlib.asynccontextmanager
    async def extra_nodes(self, specs: list[dict], *, via: str = "", fetch_policy: FetchPolicy | None = None,
                          timeout: float = 120.0):
        """Start nodes outside the plan on an actor of their own, reaching the coordinator over a
        link of their own: ``via``, an address standing in for the coordinator's (a proxy), or the
        coordinator itself (""). Yields the nodes' start results (``NodeHost.start``, by node id);
        the actor is stopped on exit. Specs as ``node.actor`` reads them (see :meth:`BundleInfo.spec`).
        """
        own = self.coordinator.address  # checked first: extra nodes need a running coordinator, proxied or not
        address = via or own
        # Any: Ray's stubs type an actor's methods as plain methods, without their .remote()
        actor: Any = NodeActor.options(num_cpus=0, max_concurrency=1000).remote(torch_threads=1,
                                                                                fetch_policy=fetch_policy)
        self.extra_actors.append(actor)
        try:
            ref = actor.start.remote(address, specs, self.node_token)
            results = await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)
            yield {r["node_id"]: r for r in results}
        finally:
            self.extra_actors.remove(actor)
            await stop_actor(actor)

    # ---- helpers for the workload -----------------------------------------------------------
    def token(self, user: str) -> tuple[tuple[str, str], ...]:
        """Metadata for ``user``'s own bearer token (the admin's for "")."""
        return bearer_metadata(self.user_tokens[user] if user else self.admin_token)

    @property
    def admin(self) -> tuple[tuple[str, str], ...]:
        """Metadata carrying the admin token."""
        return bearer_metadata(self.admin_token)

    def actor_count(self) -> int:
        """Ray actors hosting the nodes."""
        return len(self.actors)

    async def memory(self) -> dict:
        """Memory of every live node actor (RSS, PSS, what its nodes share) and the totals over them."""
        statuses = await asyncio.gather(*(asyncio.wrap_future(a.status.remote().future()) for a in self.actors),
                                        return_exceptions=True)
        actors = []
        for st, ids in zip(statuses, self.actor_nodes):
            if isinstance(st, BaseException):  # an actor killed by a fault holds no memory any more
                continue
            mem = process_memory(st["pid"])
            actors.append(mem | {"nodes": len(ids), "store": st["store"]})
        return {"actors": actors, "rss_bytes": sum(a["rss_bytes"] for a in actors),
                "pss_bytes": sum(a["pss_bytes"] for a in actors), "nodes": len(self.plans)}

    def actors_needed(self) -> int:
        """Actors the scenario's packing asks for."""
        return math.ceil(len(self.plans) / self.nodes_per_actor)
