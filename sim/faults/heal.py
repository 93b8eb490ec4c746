"""kill -9 of node processes on a live federation, and how long it takes to heal: :func:`heal_cases`.

Each case of the scenario's ``faults.kill9`` runs while the users keep sending their requests
(:class:`sim.faults.traffic.UserTraffic`), one case after the other:

- ``one``: the process of one node (a base node holding users, when there is one);
- ``half``: processes until at least half of the planned nodes are gone;
- ``model`` / ``model:NAME``: the processes of every node of the base model (or of NAME);
- ``lost-<case>``: the same processes, killed so that Ray does not restart them (``ray.kill``
  without restart: a machine that is gone); the federation must start replacements.

With several nodes packed per process (``federation.nodes_per_actor``) a process takes all its
nodes with it, and all come back together; the case reports every node it took down. A case
measures, from the kill: **seconds to full strength** (:func:`sim.healing.strength`: every planned
place filled by a healthy node registered after the kill or a replacement, every model served,
every known user's adapter held by such a node), **requests failed** while recovering (requests
started during the case that saw at least one error, and those never answered after every retry),
and **adapters lost** (a known user whose adapter is not, at the end, in the coordinator's store
with its first sha256 and held by a healthy node: goal 0).
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
from typing import Any

import ray

from proto import federation_pb2 as pb

from ..healing import now_ms, strength
from .settings import until
from .traffic import summarise_requests


def bundle_payload(fed: Any, prefixes: list[str]) -> int:
    """Bundle payload bytes the coordinator has sent to nodes whose id starts with one of ``prefixes``
    (a node and its replacements, ``<id>-r<k>``)."""
    stats = fed.coordinator.traffic.stats(None)
    return sum(k.payload for n in stats.by_node if any(n.node_id.startswith(p) for p in prefixes)
               for k in n.by_kind if k.kind == pb.BYTE_KIND_BUNDLE)


async def actor_pid(actor) -> int | None:
    """The process id of a live node actor; None when it does not answer within 10 s."""
    try:
        status = await asyncio.wait_for(asyncio.wrap_future(actor.status.remote().future()), 10)
    except Exception:  # noqa: BLE001 - a dead or restarting actor
        return None
    return int(status["pid"])


class HealCases:
    """The kill -9 cases of one fault run (see the module docstring). ``run`` is the
    ``sim.faults.run.FaultRun`` (typed Any: that module imports this one)."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.fed = run.fed
        self.gone: set[int] = set()  # actors killed for good (lost- cases): never chosen again

    def victims(self, case: str) -> list[int]:
        """The actors (indices into the federation's actors) that ``case`` kills."""
        fed, rng = self.fed, self.run.rng
        what = case.removeprefix("lost-")
        live = [i for i in range(len(fed.actors)) if i not in self.gone]
        model_of = {p.node_id: p.model for p in fed.plans}
        if what.startswith("model"):
            model = what.partition(":")[2] or "base"
            return [i for i in live if any(model_of[n] == model for n in fed.actor_nodes[i])]
        if what == "one":
            holders = {u.node_id for u in fed.coordinator.registry.users() if u.node_id}
            pick = [i for i in live if holders & set(fed.actor_nodes[i])] or live
            return [rng.choice(pick)]
        order = rng.sample(live, len(live))  # half
        chosen: list[int] = []
        while sum(len(fed.actor_nodes[i]) for i in chosen) < math.ceil(len(fed.plans) / 2) and len(chosen) < len(order):
            chosen.append(order[len(chosen)])
        return sorted(chosen)

    async def one(self, case: str) -> dict:
        """Kill the processes of ``case`` and measure the way back to full strength."""
        run, fed, s, traffic = self.run, self.fed, self.run.settings, self.run.traffic
        await traffic.answered_since(run.now(), 1, s.wait_s)
        victims = self.victims(case)
        if not victims:
            return {"case": case, "error": "no live process hosts such a node", "full_strength": False}
        nodes = sorted(n for i in victims for n in fed.actor_nodes[i])
        lost = case.startswith("lost-")
        pids = await asyncio.gather(*(actor_pid(fed.actors[i]) for i in victims))
        shipped = bundle_payload(fed, nodes)
        phase = traffic.phase = f"kill9 {case}"
        t_kill, since_ms = run.now(), now_ms()
        for i, pid in zip(victims, pids):
            if lost:
                ray.kill(fed.actors[i], no_restart=True)
                self.gone.add(i)
            elif pid is not None:
                os.kill(pid, signal.SIGKILL)
        run.injected.append({"fault": "kill9" if not lost else "kill9_no_restart", "case": case, "nodes": nodes,
                             "pids": pids, "at_s": t_kill})

        async def whole() -> bool:
            return strength(fed, since_ms, set(nodes))["full"]
        full = await until(whole, s.wait_s + (fed.scn.heal.replace_after_s if lost else 0), interval=0.1)
        t_full = run.now()
        settled = await traffic.answered_since(t_full, s.requests_after_fault, s.wait_s)
        registry = fed.coordinator.registry
        current = fed.healer.current if fed.healer is not None else {n: n for n in nodes}
        came_back, registered_after = {}, {}
        for n in nodes:
            rec = registry.get_node(current[n])
            how = "replaced" if current[n] != n else "restarted"
            back = rec is not None and rec.healthy and rec.registered_ms >= since_ms
            came_back[n] = how if back else "not yet"
            if back:  # when its process (restarted or new) had it registered again
                registered_after[n] = round((rec.registered_ms - since_ms) / 1000, 3)
        requests = summarise_requests([r for r in traffic.records if r["phase"] == phase])
        end = strength(fed, since_ms, set(nodes))
        return {
            "case": case, "nodes_killed": nodes, "processes_killed": len(victims), "restartable": not lost,
            "seconds_to_full_strength": round(t_full - t_kill, 3) if full else None,
            "full_strength": full, "came_back": came_back, "registered_again_after_s": registered_after,
            "requests": requests["requests"],
            "requests_failed": requests["requests_failed"],
            "requests_unanswered": requests["requests_unanswered"],
            "wrong_answers": requests["wrong_answers"],
            "error_codes": requests["error_codes"],
            "adapters_lost": end["adapters"] - end["adapters_held"],
            # 0 when every node came back with its bundles from its own disk; a replacement fetches its own
            "bundle_bytes_fetched_again": bundle_payload(fed, nodes) - shipped,
            "every_probe_answered_after": settled,
        }


async def heal_cases(run: Any, cases: list[str]) -> dict:
    """Every kill -9 case in turn; the section's ``heal`` part, with a one-row-per-case summary."""
    heal = HealCases(run)
    results = [await heal.one(case) for case in cases]
    healer = run.fed.healer
    return {
        "cases": results,
        "summary": [{k: r.get(k) for k in ("case", "nodes_killed", "seconds_to_full_strength", "requests",
                                           "requests_failed", "requests_unanswered", "adapters_lost",
                                           "bundle_bytes_fetched_again")}
                    for r in results],
        "replacements": list(healer.replacements) if healer is not None else [],
        "restarts_allowed": run.fed.scn.heal.restarts,
        "replace_after_s": run.fed.scn.heal.replace_after_s,
    }
