"""Faults injected into a live federation, and what its users saw: :func:`run_faults`.

`sim.run` calls ``run_faults(fed, report)`` after the workload when a scenario's ``[faults]``
asks for any (see `sim.extras`). On the running federation, while the users keep sending
their requests (each one over and over, in its own loop):

- ``kill_nodes = k``: k Ray actors hosting nodes that hold users are killed (``ray.kill``).
  The coordinator fails their users over: each adapter is reinstalled from the coordinator's
  store on a surviving node.
- ``restart_coordinator``: the coordinator is stopped and served again on the same database,
  bundle store and port; the nodes' channels reconnect and their heartbeats resume.
- ``cut_stream_at = f``, ``corrupt_chunks = c``: new nodes join through a faulty link (a loopback
  gRPC proxy in front of NodeControl, :class:`FaultyLink`). One link cuts the bundle stream after
  a fraction f of the bundle; one flips a byte in c tensors, one per stream; a third flips the
  same byte on every stream (that node must refuse the bundle and install nothing).

Every answer is compared with the same request made before any fault: the per-token log-probs
within a tolerance (1e-4), the same token ids, the same model label (the user's own adapter
stays the user's own adapter). A failed request is retried with backoff, as a user's client
would. ``report["faults"]`` has what was ``injected``, ``requests_failed`` (requests that saw at
least one error), ``requests_retried`` (extra attempts), ``requests_unanswered`` (no answer after
every attempt), wrong answers, ``adapters_lost``, and per-fault details and wall timings. A
request that failed counts under the fault that was the latest when it first failed.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import ray

from coordinator.server import serve
from node.actor import NodeActor
from node.fetch import FetchPolicy
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.bundle import read_manifest

from .federation import CHANNEL_OPTIONS, LocalFederation

NODE_CONTROL = pb.DESCRIPTOR.services_by_name["NodeControl"]
# A client that outlives a coordinator restart must find it again within a second, not after
# gRPC's default reconnect backoff (which grows to two minutes).
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]
# What a user's client retries: a node or the coordinator going away, or load shedding.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN}
MIN_CHUNK = 4096


class FaultError(RuntimeError):
    """Fault injection could not run as asked (bad settings, or a federation it cannot work on)."""


@dataclass(frozen=True, kw_only=True)
class FaultSettings:
    """How faults are driven and checked (the scenario's ``[faults]`` says which faults)."""

    tolerance: float = 1e-4  # largest per-token log-prob difference from the pre-fault answer
    attempts: int = 8  # per request, the first one included
    backoff_s: float = 0.2  # pause after the first failure, doubled after each
    max_backoff_s: float = 2.0
    request_timeout_s: float = 30.0  # per attempt; propagated to the coordinator, which bounds its node calls by it
    requests_after_fault: int = 2  # requests of every probe started after a fault, and answered, before the next
    generate_tokens: int = 8
    score_chars: int = 600
    chunks_per_bundle: int = 32  # the faulty links ask for chunks this fine, to cut mid-bundle
    max_refetch: int = 3  # corruptions a node tolerates per bundle (the FetchPolicy's)
    wait_s: float = 120.0  # bound on every wait for the federation to settle

    def __post_init__(self) -> None:
        checks = [(self.tolerance > 0, "tolerance must be > 0"), (self.attempts >= 1, "attempts must be >= 1"),
                  (self.backoff_s >= 0 and self.max_backoff_s >= self.backoff_s, "backoffs must be 0 <= first <= max"),
                  (self.request_timeout_s > 0, "request_timeout_s must be > 0"),
                  (self.requests_after_fault >= 1, "requests_after_fault must be >= 1"),
                  (1 <= self.generate_tokens <= 64, "generate_tokens must be 1..64"),
                  (self.score_chars >= 50, "score_chars must be >= 50"),
                  (self.chunks_per_bundle >= 2, "chunks_per_bundle must be >= 2"),
                  (self.max_refetch >= 0, "max_refetch must be >= 0"), (self.wait_s > 0, "wait_s must be > 0")]
        for ok, message in checks:
            if not ok:
                raise FaultError(f"fault settings: {message}")


async def _until(predicate: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    t0 = time.monotonic()
    while True:
        if await predicate():
            return True
        if time.monotonic() - t0 > timeout:
            return False
        await asyncio.sleep(interval)


# ---------------------------------------------------------------------------------------------
# The users' requests during faults
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One request a user keeps making: scoring a fixed text, or greedy generation from a prompt."""

    kind: str  # "score" or "generate"
    user: str  # "" for the admin scoring on the base model
    text: str


@dataclass(frozen=True)
class Answer:
    """What came back: the serving node, the model label, the token ids and their log-probs."""

    node: str
    model: str
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    failed_over: bool = False


def answer_diff(got: Answer, want: Answer) -> float:
    """Largest per-token log-prob difference; infinite when the tokens or the model label differ."""
    if got.tokens != want.tokens or got.model != want.model or len(got.logprobs) != len(want.logprobs):
        return math.inf
    return max((abs(a - b) for a, b in zip(got.logprobs, want.logprobs)), default=0.0)


def summarise_requests(records: list[dict]) -> dict:
    """Counts over request records (one per logical request, retries inside it)."""
    codes = collections.Counter(c for r in records for c in r["codes"])
    diffs = [r["diff"] for r in records if r["ok"] and math.isfinite(r["diff"])]
    return {
        "requests": len(records),
        "requests_failed": sum(bool(r["codes"]) for r in records),  # saw at least one error
        "requests_retried": sum(r["attempts"] - 1 for r in records),  # extra attempts made
        "requests_unanswered": sum(not r["ok"] for r in records),  # no answer after every attempt
        "wrong_answers": sum(r["ok"] and r["wrong"] for r in records),
        "failed_over_replies": sum(r.get("failed_over", False) for r in records),
        "max_abs_logprob_diff": max(diffs, default=0.0),
        "max_request_s": round(max((r["t1"] - r["t0"] for r in records), default=0.0), 3),
        "error_codes": dict(sorted(codes.items())),
        "errors": [e for r in records for e in r.get("errors", [])][:5],  # the first few, as the client saw them
    }


class UserTraffic:
    """The users' requests, sent over and over while faults happen, retried, and checked against a baseline.

    It dials the coordinator on its own channel (with a short reconnect backoff), so it outlives
    a coordinator restart on the same port.
    """

    def __init__(self, fed: LocalFederation, probes: list[Probe], settings: FaultSettings, *,
                 concurrency: int, clock: Callable[[], float]) -> None:
        self.fed = fed
        self.probes = probes
        self.settings = settings
        self.clock = clock
        self.sem = asyncio.Semaphore(concurrency)
        self.channel = grpc.aio.insecure_channel(fed.handle.address, options=CHANNEL_OPTIONS + RECONNECT_OPTIONS)
        self.stub = rpc.FederationStub(self.channel)
        self.baseline: dict[Probe, Answer] = {}
        self.records: list[dict] = []
        self.inflight: collections.Counter[tuple[str, str]] = collections.Counter()  # (user, kind) -> requests
        self.phase = "baseline"

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    def _metadata(self, user: str) -> tuple[tuple[str, str]]:
        return self.fed.token(user)

    async def ask(self, probe: Probe) -> Answer:
        """One attempt at ``probe`` (raises grpc.aio.AioRpcError on failure)."""
        timeout = self.settings.request_timeout_s
        if probe.kind == "score":
            r = await self.stub.Score(pb.ScoreRequest(user_id=probe.user, text=probe.text, omit_token_strings=True),
                                      metadata=self._metadata(probe.user), timeout=timeout)
            return Answer(r.node_id, r.model, tuple(r.token_ids), tuple(r.logprobs), r.failed_over)
        request = pb.GenerateRequest(user_id=probe.user, prompt=probe.text, temperature=0.0,
                                     max_new_tokens=self.settings.generate_tokens)
        chunks = [c async for c in self.stub.Generate(request, metadata=self._metadata(probe.user), timeout=timeout)]
        node = chunks[0].node_id if chunks else ""
        return Answer(node, "greedy", tuple(c.token_id for c in chunks), tuple(c.logprob for c in chunks))

    async def take_baseline(self) -> None:
        """Every probe once, before any fault; FaultError if one fails (nothing to compare with)."""
        for probe in self.probes:
            try:
                self.baseline[probe] = await self.ask(probe)
            except grpc.aio.AioRpcError as exc:
                raise FaultError(f"the pre-fault {probe.kind} request of {probe.user or 'admin'!r} failed: "
                                 f"{exc.code().name}: {exc.details()}") from None

    async def request(self, probe: Probe) -> dict:
        """``probe`` with retries; the record says how it went and how its answer compares."""
        rec = {"phase": self.phase, "kind": probe.kind, "user": probe.user, "t0": self.clock(), "attempts": 0,
               "codes": [], "ok": False, "wrong": False, "diff": math.inf}
        async with self.sem:
            self.inflight[(probe.user, probe.kind)] += 1
            try:
                await self._attempts(probe, rec)
            finally:
                self.inflight[(probe.user, probe.kind)] -= 1
        rec["t1"] = self.clock()
        self.records.append(rec)
        return rec

    async def _attempts(self, probe: Probe, rec: dict) -> None:
        s = self.settings
        for attempt in range(s.attempts):
            rec["attempts"] += 1
            try:
                got = await self.ask(probe)
            except grpc.aio.AioRpcError as exc:
                if not rec["codes"]:
                    rec["phase"] = self.phase  # a failed request counts under the fault it failed in
                rec["codes"].append(exc.code().name)
                rec.setdefault("errors", []).append(f"{probe.kind} {probe.user or 'admin'}: {exc.code().name}: "
                                                    f"{exc.details()}"[:200])
                if exc.code() not in RETRYABLE or attempt + 1 == s.attempts:
                    return
                await asyncio.sleep(min(s.max_backoff_s, s.backoff_s * 2 ** attempt))
                continue
            diff = answer_diff(got, self.baseline[probe])
            rec.update(ok=True, node=got.node, failed_over=got.failed_over, diff=diff, wrong=diff > s.tolerance)
            return

    async def one_round(self) -> list[dict]:
        """Every probe once, concurrently (bounded)."""
        return list(await asyncio.gather(*(self.request(p) for p in self.probes)))

    async def run(self, stop: asyncio.Event) -> None:
        """Every probe over and over, each in its own loop (a slow request holds up only its own
        probe), until ``stop`` is set; requests in progress are finished."""
        async def loop(probe: Probe) -> None:
            while not stop.is_set():
                await self.request(probe)
        await asyncio.gather(*(loop(p) for p in self.probes))

    async def answered_since(self, t: float, n: int, timeout: float) -> bool:
        """Wait until every probe has ``n`` requests started at or after ``t`` finished (False on timeout)."""
        async def enough() -> bool:
            done = collections.Counter((r["user"], r["kind"]) for r in self.records if r["t0"] >= t)
            return all(done[(p.user, p.kind)] >= n for p in self.probes)
        return await _until(enough, timeout)


# ---------------------------------------------------------------------------------------------
# A faulty link: a NodeControl proxy that cuts and corrupts bundle streams
# ---------------------------------------------------------------------------------------------


@dataclass
class LinkFaults:
    """What a faulty link does to one node's FetchBundle streams.

    ``cut_at``: the first stream is cut (UNAVAILABLE) before the first chunk that would cross
    this byte. ``corrupt``: stream i flips the byte at ``corrupt[i]`` (one corruption per stream,
    so each is seen by the node however many chunks are in flight when it gives up a stream).
    ``corrupt_always``: this byte is flipped on every stream.
    """

    cut_at: int | None = None
    corrupt: list[int] = field(default_factory=list)
    corrupt_always: int | None = None
    streams: list[dict] = field(default_factory=list)  # per stream: offset asked for, bytes passed, what was done


def _flip(chunk: pb.BundleChunk, offset: int) -> bool:
    """Flip the byte at absolute ``offset`` if ``chunk`` carries it."""
    i = offset - chunk.offset
    if not 0 <= i < len(chunk.data):
        return False
    data = bytearray(chunk.data)
    data[i] ^= 0xFF
    chunk.data = bytes(data)
    return True


class FaultyLink:
    """A loopback gRPC proxy in front of the coordinator's NodeControl service.

    Every NodeControl call is forwarded as raw bytes with its authorization metadata; FetchBundle
    streams of the nodes named in ``faults`` are cut or corrupted as their :class:`LinkFaults`
    says. Nodes dial the proxy's address as if it were the coordinator.
    """

    def __init__(self, upstream: str, faults: dict[str, LinkFaults]) -> None:
        self.upstream = upstream
        self.faults = faults
        self.channel: grpc.aio.Channel | None = None
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> str:
        """Listen on a free loopback port; returns host:port."""
        self.channel = grpc.aio.insecure_channel(self.upstream, options=CHANNEL_OPTIONS)
        self.server = grpc.aio.server(options=CHANNEL_OPTIONS + [("grpc.max_send_message_length", 16 << 20)])
        handlers = {}
        for m in NODE_CONTROL.methods:
            if m.server_streaming:
                handlers[m.name] = grpc.unary_stream_rpc_method_handler(
                    self._fetch, request_deserializer=pb.FetchBundleRequest.FromString,
                    response_serializer=pb.BundleChunk.SerializeToString)
            else:
                path = f"/{NODE_CONTROL.full_name}/{m.name}"
                handlers[m.name] = grpc.unary_unary_rpc_method_handler(self._forwarder(path))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(NODE_CONTROL.full_name, handlers),))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        """Stop the proxy."""
        if self.server is not None:
            await self.server.stop(None)
        if self.channel is not None:
            await self.channel.close()

    @staticmethod
    def _auth(context) -> list[tuple[str, str]]:
        return [(k, v) for k, v in context.invocation_metadata() if k == "authorization"]

    def _forwarder(self, path: str):
        call = self.channel.unary_unary(path)  # no (de)serializers: bytes pass through untouched

        async def forward(request: bytes, context) -> bytes:
            try:
                return await call(request, metadata=self._auth(context), timeout=context.time_remaining())
            except grpc.aio.AioRpcError as err:
                await context.abort(err.code(), err.details() or "")
        return forward

    async def _fetch(self, request: pb.FetchBundleRequest, context):
        plan = self.faults.get(request.node_id)
        stream = {"offset": request.offset, "bytes": 0, "cut_at": None, "corrupted": []}
        index = len(plan.streams) if plan else 0
        if plan is not None:
            plan.streams.append(stream)
        stub = rpc.NodeControlStub(self.channel)
        call = stub.FetchBundle(request, metadata=self._auth(context), timeout=context.time_remaining())
        try:
            async for chunk in call:
                if plan is not None:
                    end = chunk.offset + len(chunk.data)
                    if plan.cut_at is not None and index == 0 and end > plan.cut_at:
                        stream["cut_at"] = chunk.offset
                        await context.abort(grpc.StatusCode.UNAVAILABLE, "link cut (fault injection)")
                    targets = ([plan.corrupt[index]] if index < len(plan.corrupt) else []) + (
                        [plan.corrupt_always] if plan.corrupt_always is not None else [])
                    stream["corrupted"] += [o for o in targets if _flip(chunk, o)]
                    stream["bytes"] += len(chunk.data)
                yield chunk
        except grpc.aio.AioRpcError as err:
            await context.abort(err.code(), err.details() or "")
        finally:
            call.cancel()


# ---------------------------------------------------------------------------------------------
# The faults
# ---------------------------------------------------------------------------------------------


class FaultRun:
    """One fault-injection run on a live federation (see the module docstring)."""

    def __init__(self, fed: LocalFederation, settings: FaultSettings) -> None:
        if fed.handle is None:
            raise FaultError("the federation is not running")
        self.fed = fed
        self.settings = settings
        self.faults = fed.scn.faults
        self.rng = random.Random(fed.scn.federation.seed)
        self.t0 = time.monotonic()
        self.injected: list[dict] = []
        self.killed_nodes: set[str] = set()
        self.traffic = UserTraffic(fed, self.probes(), settings, concurrency=fed.scn.workload.concurrency,
                                   clock=self.now)

    def now(self) -> float:
        """Wall seconds since the fault run began."""
        return round(time.monotonic() - self.t0, 4)

    def probes(self) -> list[Probe]:
        """Known users score and generate on their own adapter; unknown users and the admin score on the base."""
        suite, n = self.fed.suite, self.settings.score_chars
        text = lambda name: suite.text(name, "eval")[-n:]  # noqa: E731 - a slice the workload did not use first
        out = [Probe("score", "", text(suite.held_out))]
        for u in suite.known_users:
            out += [Probe("score", u, text(u)), Probe("generate", u, text(u)[:80])]
        out += [Probe("score", u, text(u)) for u in suite.unknown_users if u in self.fed.user_tokens]
        return out

    async def admin(self, method: str, request):
        """An admin RPC on the coordinator as it is now (its address survives restarts)."""
        return await getattr(self.traffic.stub, method)(request, metadata=self.fed.admin, timeout=30)

    async def snapshot(self) -> dict:
        """The registry as the public API shows it: users, nodes, bundles, and the byte total."""
        users = await self.admin("ListUsers", pb.ListUsersRequest())
        nodes = await self.admin("ListNodes", pb.ListNodesRequest())
        bundles = await self.admin("ListBundles", pb.ListBundlesRequest())
        stats = await self.admin("GetStats", pb.GetStatsRequest())
        return {
            "users": {u.user_id: (u.persona, u.node_id, u.has_adapter, u.adapter_sha256.hex()) for u in users.users},
            "nodes": {n.node_id: (n.address, n.model, tuple(n.bundles)) for n in nodes.nodes},
            "node_states": {n.node_id: pb.NodeState.Name(n.state) for n in nodes.nodes},
            "bundles": {b.name: (b.size, b.sha256.hex()) for b in bundles.bundles},
            "bytes_total": stats.bytes_total,
            "requests_failed_over": stats.requests_failed_over,
        }

    # ---- kill ---------------------------------------------------------------------------------
    def choose_victims(self, k: int) -> tuple[list[int], str]:
        """k actors hosting nodes that hold users, leaving a base node alive; and a note if fewer."""
        registry = self.fed.handle.registry
        holders = {u.node_id for u in registry.users() if u.node_id}
        base = {p.node_id for p in self.fed.plans if p.model == "base"}
        candidates = [i for i, ids in enumerate(self.fed.actor_nodes) if holders & set(ids)]
        base_actors = [i for i, ids in enumerate(self.fed.actor_nodes) if base & set(ids)]
        room = len(base_actors) - 1  # failover needs one base node to survive
        n = min(k, len(candidates), room)
        note = "" if n == k else (f"asked to kill {k} actors; {n} killed: {len(candidates)} host users and "
                                  f"{len(base_actors)} host base nodes, one of which must survive")
        return sorted(self.rng.sample(candidates, n)), note

    async def kill(self, k: int) -> dict:
        """Kill k node actors while the users' requests flow; check their users fail over."""
        s, traffic = self.settings, self.traffic
        victims, note = self.choose_victims(k)
        registry = self.fed.handle.registry
        nodes = sorted(n for i in victims for n in self.fed.actor_nodes[i])
        moved = sorted(u.user_id for u in registry.users() if u.node_id in nodes)
        await traffic.answered_since(self.now(), 1, s.wait_s)

        async def victim_busy() -> bool:  # strike while a request of a user on a victim is in flight
            return any(traffic.inflight[(u, "generate")] or traffic.inflight[(u, "score")] for u in moved)
        busy = await _until(victim_busy, 10.0, interval=0.005)
        traffic.phase = "kill"
        t_kill = self.now()
        for i in victims:
            ray.kill(self.fed.actors[i], no_restart=True)
        self.killed_nodes |= set(nodes)
        for i in victims:
            self.injected.append({"fault": "kill_actor", "actor": i, "nodes": self.fed.actor_nodes[i], "at_s": t_kill})
        settled = await traffic.answered_since(t_kill, s.requests_after_fault, s.wait_s)

        async def all_down() -> bool:
            return all(registry.get_node(n).state == pb.NODE_STATE_DOWN for n in nodes)
        down = await _until(all_down, s.wait_s)
        t_down = self.now()
        recovery = {}
        for u in moved:
            after = [r for r in traffic.records if r["user"] == u and r["ok"] and r["t0"] >= t_kill]
            recovery[u] = round(min(r["t1"] for r in after) - t_kill, 3) if after else None
        new_home = {u: registry.get_user(u).node_id for u in moved}
        return {
            "actors_killed": len(victims), "nodes_killed": nodes, "note": note,
            "killed_with_their_users_requests_in_flight": busy,
            "users_on_killed_nodes": moved, "users_now_on": new_home,
            "users_moved_to_survivors": sum(new_home[u] not in self.killed_nodes and bool(new_home[u]) for u in moved),
            "marked_down_after_s": round(t_down - t_kill, 3) if down else None,
            "recovery_s": recovery,
            "max_recovery_s": max((v for v in recovery.values() if v is not None), default=None),
            "every_probe_answered_after_kill": settled,
        }

    # ---- restart ------------------------------------------------------------------------------
    async def restart(self) -> dict:
        """Stop the coordinator and serve it again on the same database, store and port."""
        s, traffic, fed = self.settings, self.traffic, self.fed
        await traffic.answered_since(self.now(), 1, s.wait_s)
        before = await self.snapshot()
        config = dataclasses.replace(fed.handle.core.config, port=fed.handle.port)
        traffic.phase = "restart"
        t_stop = self.now()
        if fed.channel is not None:
            await fed.channel.close()
        await fed.handle.stop()
        fed.handle = await self._serve_again(config)
        t_up, up_ms = self.now(), int(time.time() * 1000)
        fed.channel = grpc.aio.insecure_channel(fed.handle.address, options=CHANNEL_OPTIONS)
        fed.stub = rpc.FederationStub(fed.channel)
        self.injected.append({"fault": "restart_coordinator", "at_s": t_stop, "port": config.port})
        alive = [nid for nid in before["nodes"] if nid not in self.killed_nodes]
        registry = fed.handle.registry

        async def all_beating() -> bool:
            return all((registry.get_node(n) is not None and registry.get_node(n).last_heartbeat_ms >= up_ms
                        and registry.get_node(n).healthy) for n in alive)
        beating = await _until(all_beating, s.wait_s)
        t_beat = self.now()
        settled = await traffic.answered_since(t_up, s.requests_after_fault, s.wait_s)
        after = await self.snapshot()
        users_ok = {r["user"] for r in traffic.records if r["phase"] == "restart" and r["ok"] and r["t0"] >= t_up}
        same = {k: before[k] == after[k] for k in ("users", "nodes", "bundles")}
        return {
            "port": config.port, "downtime_s": round(t_up - t_stop, 3),
            "nodes_heartbeating_again_after_s": round(t_beat - t_up, 3) if beating else None,
            "nodes_alive": len(alive),
            "registry_survived": all(same.values()), "same": same,
            "users": len(after["users"]), "nodes": len(after["nodes"]), "bundles": len(after["bundles"]),
            "bytes_total_before": before["bytes_total"], "bytes_total_after": after["bytes_total"],
            "tokens_still_valid": sorted(users_ok) == sorted({p.user for p in traffic.probes}),
            "every_probe_answered_after_restart": settled,
        }

    @staticmethod
    async def _serve_again(config):
        """Serve ``config`` (its port) again; a port still closing is retried for a few seconds."""
        for attempt in range(50):
            try:
                return await serve(config)
            except RuntimeError:  # gRPC could not bind the port yet
                if attempt == 49:
                    raise
                await asyncio.sleep(0.2)

    # ---- adapters -----------------------------------------------------------------------------
    async def check_adapters(self, shas: dict[str, str]) -> dict:
        """After the faults: every known user's adapter is in the store unchanged, held by a live
        node, and applied to their answers (the last one matches the pre-fault answer)."""
        registry = self.fed.handle.registry
        interval = self.fed.handle.core.config.heartbeat_interval_ms / 1000
        final = {(r["user"], r["kind"]): r for r in await self.traffic.one_round()}

        async def held() -> bool:
            for u in self.fed.suite.known_users:
                node = registry.get_node(registry.get_user(u).node_id or "")
                if node is None or u not in node.held_users:
                    return False
            return True
        all_held = await _until(held, 3 * interval + 5)
        lost = []
        for u in self.fed.suite.known_users:
            rec = registry.get_user(u)
            node = registry.get_node(rec.node_id or "") if rec else None
            ok = (rec is not None and rec.has_adapter and (rec.adapter_sha256 or b"").hex() == shas.get(u)
                  and node is not None and node.healthy and node.node_id not in self.killed_nodes
                  and u in node.held_users and all(final[(u, k)]["ok"] and not final[(u, k)]["wrong"]
                                                   for k in ("score", "generate")))
            if not ok:
                lost.append(u)
        return {"adapters_checked": len(self.fed.suite.known_users), "adapters_lost": len(lost), "lost": lost,
                "held_by_live_nodes": all_held}

    # ---- bundle streams -----------------------------------------------------------------------
    def link_plans(self) -> tuple[dict[str, LinkFaults], dict, int]:
        """The faulty links' plans (by node id), the bundle spec the new nodes install, the chunk size."""
        fed, s = self.fed, self.settings
        plan = next(p for p in fed.plans if p.model == "base")
        b = fed.bundles[plan.bundle]
        data = b.path.read_bytes()
        chunk = min(max(MIN_CHUNK, b.size // s.chunks_per_bundle), fed.handle.core.config.chunk_size)
        m = read_manifest(data)
        tensors = sorted(((m.payload_start + e.offset, e.length, e.name) for e in m.entries if e.length >= 2))
        links: dict[str, LinkFaults] = {}
        self.expected: dict[str, list] = {}
        if self.faults.cut_stream_at > 0:
            links["fault-cut"] = LinkFaults(cut_at=int(self.faults.cut_stream_at * b.size))
        c = self.faults.corrupt_chunks
        if c:
            if len(tensors) < c:
                raise FaultError(f"faults.corrupt_chunks: {c} corruptions need {c} tensors; "
                                 f"the bundle has {len(tensors)}")
            picks = [tensors[(i + 1) * len(tensors) // (c + 1)] for i in range(c)]
            links["fault-corrupt"] = LinkFaults(corrupt=[start + length // 2 for start, length, _ in picks])
            self.expected["fault-corrupt"] = picks
            start, length, name = tensors[len(tensors) // 2]
            links["fault-persist"] = LinkFaults(corrupt_always=start + length // 2)
            self.expected["fault-persist"] = [(start, length, name)]
        spec = {"name": b.name, "size": b.size, "sha256": b.sha256, "model": b.model, "codec": b.codec}
        return links, spec, chunk

    async def score_on(self, node_id: str, text: str) -> Answer:
        """Score ``text`` on one pinned node through the coordinator (a one-component mixture)."""
        spec = pb.MixtureSpec(components=[pb.MixtureComponent(node_id=node_id)])
        r = await self.admin("Score", pb.ScoreRequest(text=text, mixture=spec, omit_token_strings=True))
        return Answer(r.components[0].node_id, "base", tuple(r.token_ids), tuple(r.logprobs))

    async def streams(self) -> dict:
        """New nodes join through faulty links: a cut stream resumes, corrupt chunks are refetched."""
        s, fed = self.settings, self.fed
        links, spec, chunk = self.link_plans()
        proxy = FaultyLink(fed.handle.address, links)
        await proxy.start()
        policy = FetchPolicy(chunk_size=chunk, backoff_s=0.02, max_refetch=max(s.max_refetch, len(
            links.get("fault-corrupt", LinkFaults()).corrupt)))
        self.max_refetch = policy.max_refetch
        actor = NodeActor.options(num_cpus=0, max_concurrency=1000).remote(torch_threads=1, fetch_policy=policy)
        specs = [{"node_id": nid, "model": "base", "codec": spec["codec"], "link": "faulty", "bundles": [spec]}
                 for nid in links]
        t_start = self.now()
        for nid, lf in links.items():
            if lf.cut_at is not None:
                self.injected.append({"fault": "cut_stream", "node": nid, "at_byte": lf.cut_at, "at_s": t_start})
            for off in lf.corrupt:
                self.injected.append({"fault": "corrupt_chunk", "node": nid, "byte": off, "at_s": t_start})
            if lf.corrupt_always is not None:
                self.injected.append({"fault": "corrupt_chunk_every_stream", "node": nid,
                                      "byte": lf.corrupt_always, "at_s": t_start})
        try:
            results = await asyncio.wait_for(asyncio.wrap_future(
                actor.start.remote(proxy.address, specs, fed.node_token).future()), s.wait_s)
            results = {r["node_id"]: r for r in results}
            base = self.traffic.baseline[self.traffic.probes[0]]
            out = {"bundle": spec["name"], "bundle_bytes": spec["size"], "chunk_size": chunk,
                   "max_refetch": policy.max_refetch}
            for nid, lf in links.items():
                r = results[nid]
                install = r.get("install") or {}
                entry = {"ok": r["ok"], "ready": r.get("ready", False), "error": r.get("error"),
                         "streams": [{"offset": st["offset"], "bytes": st["bytes"], "cut_at": st["cut_at"],
                                      "corrupted": st["corrupted"]} for st in lf.streams],
                         "resumes": install.get("resumes"), "refetches": install.get("refetches"),
                         "bytes_fetched": install.get("bytes_fetched"), "install_s": install.get("seconds")}
                if r["ok"] and r.get("ready"):
                    diff = answer_diff(await self.score_on(nid, self.traffic.probes[0].text), base)
                    entry["score_diff_vs_base"] = diff if math.isfinite(diff) else None  # None: tokens differ
                out[nid] = entry | self._judge(nid, lf, entry, spec["size"])
            return out
        finally:
            await _stop_actor(actor)
            for nid in links:
                try:
                    await self.admin("SetNodeState", pb.SetNodeStateRequest(node_id=nid, state=pb.NODE_STATE_DOWN))
                except grpc.aio.AioRpcError:
                    pass  # a node that never registered
            await proxy.stop()

    def _judge(self, nid: str, lf: LinkFaults, entry: dict, size: int) -> dict:
        """Whether a faulty link's node did what it must (resumed, refetched, or refused)."""
        tol = self.settings.tolerance
        offsets = [st["offset"] for st in lf.streams]
        if nid == "fault-cut":
            cut = lf.streams[0]["cut_at"] if lf.streams else None
            ok = (entry["ok"] and entry["ready"] and entry["resumes"] == 1 and offsets == [0, cut]
                  and entry["bytes_fetched"] == size and _within(entry.get("score_diff_vs_base"), tol))
            return {"cut_at_byte": cut, "resumed_from": offsets[1:], "passed": ok}
        if nid == "fault-corrupt":
            starts = [start for start, _, _ in self.expected[nid]]
            ok = (entry["ok"] and entry["ready"] and entry["refetches"] == len(starts) and offsets == [0, *starts]
                  and _within(entry.get("score_diff_vs_base"), tol))
            return {"corrupted_tensors": [name for _, _, name in self.expected[nid]], "refetched_from": offsets[1:],
                    "expected_refetch_from": starts, "bytes_refetched": (entry["bytes_fetched"] or 0) - size,
                    "passed": ok}
        # corrupt on every stream: the node must give up with DATA_LOSS and install nothing
        node = self.fed.handle.registry.get_node(nid)
        ok = (not entry["ok"] and "DATA_LOSS" in (entry["error"] or "") and len(offsets) == self.max_refetch + 1
              and (node is None or not node.bundles))
        return {"streams_tried": len(offsets), "installed": list(node.bundles) if node else [], "passed": ok}

    # ---- everything ---------------------------------------------------------------------------
    async def run(self) -> dict:
        """Baseline, then each fault the scenario asks for, then the checks; the report section."""
        f, s, traffic = self.faults, self.settings, self.traffic
        out: dict = {"settings": dataclasses.asdict(s)}
        await traffic.take_baseline()
        start = await self.snapshot()
        shas = {u: v[3] for u, v in start["users"].items()}
        stop = asyncio.Event()
        traffic.phase = "before"
        load = asyncio.create_task(traffic.run(stop))
        try:
            if f.kill_nodes:
                out["kill"] = await self.kill(f.kill_nodes)
            if f.restart_coordinator:
                out["restart"] = await self.restart()
            if not f.kill_nodes and not f.restart_coordinator:
                await traffic.answered_since(self.now(), 1, s.wait_s)
        finally:
            stop.set()
            await load
        traffic.phase = "after"
        out["adapters"] = await self.check_adapters(shas)
        if f.cut_stream_at or f.corrupt_chunks:
            out["streams"] = await self.streams()
        end = await self.snapshot()
        totals = summarise_requests(traffic.records)
        for phase in ("kill", "restart"):
            if phase in out:  # every request started while that fault was the latest one
                out[phase]["requests"] = summarise_requests([r for r in traffic.records if r["phase"] == phase])
        checks = {
            "all_answered": totals["requests_unanswered"] == 0,
            "no_wrong_answer": totals["wrong_answers"] == 0,
            "no_adapter_lost": out["adapters"]["adapters_lost"] == 0,
        }
        if "kill" in out:
            kill = out["kill"]
            checks["users_failed_over"] = kill["users_moved_to_survivors"] == len(kill["users_on_killed_nodes"])
        if "restart" in out:
            checks["registry_survived_restart"] = out["restart"]["registry_survived"]
        for nid, what in (("fault-cut", "cut_stream_resumed_from_offset"),
                          ("fault-corrupt", "corrupt_chunks_refetched"),
                          ("fault-persist", "persistent_corruption_never_installed")):
            if nid in out.get("streams", {}):
                checks[what] = out["streams"][nid]["passed"]
        return {
            "injected": self.injected,
            **{k: totals[k] for k in ("requests_failed", "requests_retried", "requests_unanswered")},
            "adapters_lost": out["adapters"]["adapters_lost"],
            "requests": totals,
            "requests_by_phase": {phase: summarise_requests([r for r in traffic.records if r["phase"] == phase])
                                  for phase in dict.fromkeys(r["phase"] for r in traffic.records)},
            "coordinator_failovers": end["requests_failed_over"] - start["requests_failed_over"],
            "slowest_requests": [{k: r.get(k) for k in ("phase", "kind", "user", "t0", "t1", "attempts", "codes",
                                                        "node")}
                                 for r in sorted(traffic.records, key=lambda r: r["t0"] - r["t1"])[:3]],
            "checks": checks,
            "passed": all(checks.values()),
            **out,
            "wall_s": self.now(),
        }


def _within(diff: float | None, tol: float) -> bool:
    """A measured difference (None: not measured, or tokens differed) at most ``tol``."""
    return diff is not None and diff <= tol


async def _stop_actor(actor) -> None:
    try:
        await asyncio.wait_for(asyncio.wrap_future(actor.stop.remote().future()), 30)
    except Exception:  # noqa: BLE001 - already gone is fine
        pass
    ray.kill(actor)


async def run_faults(fed: LocalFederation, report: dict, settings: FaultSettings | None = None) -> dict:
    """Inject the scenario's faults into the running federation; adds and returns ``report["faults"]``."""
    run = FaultRun(fed, settings or FaultSettings())
    try:
        section = await run.run()
    finally:
        await run.traffic.close()
    report["faults"] = section
    return section
