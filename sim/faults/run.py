"""The fault run: :class:`FaultRun` injects the scenario's faults into a live federation, chooses
their victims and judges the recovery; :func:`run_faults` is the entry point (see `sim.faults`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import time

import grpc

from node.fetch import FetchPolicy
from proto import federation_pb2 as pb
from proto.bundle import read_manifest

from ..federation import LocalFederation
from ..healing import strength
from ..scenario import Scenario
from ..sections import LivePart, Section, add_section, json_markdown
from .heal import heal_cases
from .links import FaultyLink, LinkFaults
from .settings import Answer, FaultError, FaultSettings, Probe, answer_diff, until
from .traffic import UserTraffic, summarise_requests

MIN_CHUNK = 4096


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
        def text(name):
            return suite.text(name, "eval")[-n:]  # a slice the workload did not use first
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
        registry = self.fed.coordinator.registry
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
        registry = self.fed.coordinator.registry
        nodes = sorted(n for i in victims for n in self.fed.actor_nodes[i])
        moved = sorted(u.user_id for u in registry.users() if u.node_id in nodes)
        await traffic.answered_since(self.now(), 1, s.wait_s)

        async def victim_busy() -> bool:  # strike while a request of a user on a victim is in flight
            return any(traffic.inflight[(u, "generate")] or traffic.inflight[(u, "score")] for u in moved)
        busy = await until(victim_busy, 10.0, interval=0.005)
        traffic.phase = "kill"
        t_kill = self.now()
        for i in victims:
            self.killed_nodes |= set(self.fed.kill_actor(i))
        for i in victims:
            self.injected.append({"fault": "kill_actor", "actor": i, "nodes": self.fed.actor_nodes[i], "at_s": t_kill})
        settled = await traffic.answered_since(t_kill, s.requests_after_fault, s.wait_s)

        async def all_down() -> bool:
            return all(registry.existing_node(n).state == pb.NODE_STATE_DOWN for n in nodes)
        down = await until(all_down, s.wait_s)
        t_down = self.now()
        whole = None
        if self.fed.healer is not None:  # killed for good: replacements take their places
            async def full() -> bool:
                return strength(self.fed)["full"]
            if await until(full, s.wait_s + self.fed.scn.heal.replace_after_s):
                whole = round(self.now() - t_kill, 3)
        recovery = {}
        for u in moved:
            after = [r for r in traffic.records if r["user"] == u and r["ok"] and r["t0"] >= t_kill]
            recovery[u] = round(min(r["t1"] for r in after) - t_kill, 3) if after else None
        new_home = {u: registry.existing_user(u).node_id for u in moved}
        return {
            "actors_killed": len(victims), "nodes_killed": nodes, "note": note,
            "killed_with_their_users_requests_in_flight": busy,
            "users_on_killed_nodes": moved, "users_now_on": new_home,
            "users_moved_to_survivors": sum(new_home[u] not in self.killed_nodes and bool(new_home[u]) for u in moved),
            "marked_down_after_s": round(t_down - t_kill, 3) if down else None,
            "full_strength_after_s": whole,  # replacements healthy (self-healing on), else None
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
        port = fed.coordinator.port
        traffic.phase = "restart"
        t_stop = self.now()
        await fed.restart_coordinator()
        t_up, up_ms = self.now(), int(time.time() * 1000)
        self.injected.append({"fault": "restart_coordinator", "at_s": t_stop, "port": port})
        alive = [nid for nid in before["nodes"] if nid not in self.killed_nodes]
        registry = fed.coordinator.registry

        def is_beating(node_id: str) -> bool:
            node = registry.get_node(node_id)
            return node is not None and node.last_heartbeat_ms >= up_ms and node.healthy

        async def all_beating() -> bool:
            return all(is_beating(n) for n in alive)
        beating = await until(all_beating, s.wait_s)
        t_beat = self.now()
        settled = await traffic.answered_since(t_up, s.requests_after_fault, s.wait_s)
        after = await self.snapshot()
        users_ok = {r["user"] for r in traffic.records if r["phase"] == "restart" and r["ok"] and r["t0"] >= t_up}
        same = {k: before[k] == after[k] for k in ("users", "nodes", "bundles")}
        return {
            "port": port, "downtime_s": round(t_up - t_stop, 3),
            "nodes_heartbeating_again_after_s": round(t_beat - t_up, 3) if beating else None,
            "nodes_alive": len(alive),
            "registry_survived": all(same.values()), "same": same,
            "users": len(after["users"]), "nodes": len(after["nodes"]), "bundles": len(after["bundles"]),
            "bytes_total_before": before["bytes_total"], "bytes_total_after": after["bytes_total"],
            "tokens_still_valid": sorted(users_ok) == sorted({p.user for p in traffic.probes}),
            "every_probe_answered_after_restart": settled,
        }

    # ---- adapters -----------------------------------------------------------------------------
    async def check_adapters(self, shas: dict[str, str]) -> dict:
        """After the faults: every known user's adapter is in the store unchanged, held by a live
        node, and applied to their answers (the last one matches the pre-fault answer)."""
        registry = self.fed.coordinator.registry
        interval = self.fed.coordinator.core.config.heartbeat_interval_ms / 1000
        final = {(r["user"], r["kind"]): r for r in await self.traffic.one_round()}

        async def held() -> bool:
            for u in self.fed.suite.known_users:
                node = registry.get_node(registry.existing_user(u).node_id or "")
                if node is None or u not in node.held_users:
                    return False
            return True
        all_held = await until(held, 3 * interval + 5)
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
        chunk = min(max(MIN_CHUNK, b.size // s.chunks_per_bundle), fed.coordinator.core.config.chunk_size)
        m = read_manifest(data)
        tensors = sorted((m.payload_start + e.offset, e.length, e.name) for e in m.entries if e.length >= 2)
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
        return links, b.spec(), chunk

    async def score_on(self, node_id: str, text: str) -> Answer:
        """Score ``text`` on one pinned node through the coordinator (a one-component mixture)."""
        spec = pb.MixtureSpec(components=[pb.MixtureComponent(node_id=node_id)])
        r = await self.admin("Score", pb.ScoreRequest(text=text, mixture=spec, omit_token_strings=True))
        return Answer(r.components[0].node_id, "base", tuple(r.token_ids), tuple(r.logprobs))

    async def streams(self) -> dict:
        """New nodes join through faulty links: a cut stream resumes, corrupt chunks are refetched."""
        s, fed = self.settings, self.fed
        links, spec, chunk = self.link_plans()
        proxy = FaultyLink(fed.coordinator.address, links)
        await proxy.start()
        policy = FetchPolicy(chunk_size=chunk, backoff_s=0.02, max_refetch=max(s.max_refetch, len(
            links.get("fault-corrupt", LinkFaults()).corrupt)))
        self.max_refetch = policy.max_refetch
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
            async with fed.extra_nodes(specs, via=proxy.address, fetch_policy=policy, timeout=s.wait_s) as results:
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
            for nid in links:
                with contextlib.suppress(grpc.aio.AioRpcError):  # a node that never registered
                    await self.admin("SetNodeState", pb.SetNodeStateRequest(node_id=nid, state=pb.NODE_STATE_DOWN))
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
        node = self.fed.coordinator.registry.get_node(nid)
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
            if f.kill9:
                out["heal"] = await heal_cases(self, f.kill9)
            if f.kill_nodes:
                out["kill"] = await self.kill(f.kill_nodes)
            if f.restart_coordinator:
                out["restart"] = await self.restart()
            if not f.kill_nodes and not f.restart_coordinator and not f.kill9:
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
        if "heal" in out:
            cases = out["heal"]["cases"]
            checks["healed_to_full_strength"] = all(c["full_strength"] for c in cases)
            checks["no_adapter_lost_to_kill9"] = all(c.get("adapters_lost", 1) == 0 for c in cases)
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


async def run_faults(fed: LocalFederation, report: dict, settings: FaultSettings | None = None) -> dict:
    """Inject the scenario's faults into the running federation; adds and returns ``report["faults"]``."""
    run = FaultRun(fed, settings or FaultSettings())
    try:
        section = await run.run()
    finally:
        await run.traffic.close()
    add_section(report, Section("faults", section, json_markdown("Faults")))
    return section


def wanted(scn: Scenario) -> bool:
    """Whether the scenario's ``[faults]`` asks for any fault."""
    f = scn.faults
    return bool(f.kill_nodes or f.cut_stream_at or f.corrupt_chunks or f.restart_coordinator or f.kill9)


LIVE_PART = LivePart("faults", wanted, run_faults)
