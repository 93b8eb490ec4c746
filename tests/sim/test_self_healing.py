"""Self-healing (issue 15, item 3): kill -9 of a real node actor process, and a process lost for good.

A live federation of three nodes packed two and one per Ray actor process, its users scoring and
generating all the while: kill -9 of the process hosting a node that holds users (Ray restarts it;
every node it hosted comes back under its own id, bundles from its own disk, adapters back), then
the loss of a process Ray may not restart (the federation starts a replacement). Each case must end
at full strength with no adapter lost and every request answered (with retries).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from sim.faults import FaultSettings, run_faults
from sim.faults.heal import HealCases
from sim.healing import strength
from sim.run import run_federation
from sim.scenario import Scenario, ScenarioError, load, override

pytestmark = pytest.mark.slow


def scenario() -> Scenario:
    scn = load("scenarios/self_healing.toml")
    scn = override(scn, "model", specialists=[])
    scn = override(scn, "federation", nodes=3, nodes_per_actor=2)
    scn = override(scn, "workload", score_requests_per_user=1, generate_requests_per_user=0, mixture_requests=0,
                   score_chars=300, concurrency=4)
    return override(scn, "faults", kill9=["one", "lost-one"])


def test_kill9_of_a_node_process_heals_to_full_strength(tiny_suite, tmp_path):
    seen: dict = {}

    async def faults(fed, report):
        seen["actor_nodes"] = [list(ids) for ids in fed.actor_nodes]
        seen["pids_before"] = [(await a.status.remote())["pid"] for a in fed.actors]
        section = await run_faults(fed, report, FaultSettings(requests_after_fault=1, generate_tokens=4,
                                                              score_chars=200))
        seen["status"] = [await a.status.remote() for a in fed.actors if a is not None and _alive(a)]
        seen["strength"] = strength(fed)
        return section

    report = asyncio.run(run_federation(scenario(), tmp_path, suite=tiny_suite, progress=False, extra=faults))
    heal = report["faults"]["heal"]
    one, lost = heal["cases"]
    assert [len(ids) for ids in seen["actor_nodes"]] == [2, 1]  # packed: one process hosts two nodes

    # kill -9: Ray restarted the process; every node it hosted is back under its own id
    assert one["full_strength"] and one["seconds_to_full_strength"] > 0
    assert set(one["came_back"].values()) == {"restarted"}
    assert sorted(one["nodes_killed"]) in [sorted(ids) for ids in seen["actor_nodes"]]
    assert one["bundle_bytes_fetched_again"] == 0  # the bundles came from the nodes' own disk
    assert (one["adapters_lost"], one["requests_unanswered"], one["wrong_answers"]) == (0, 0, 0)
    restarted = [s for s in seen["status"] if s["restarted"]]
    assert restarted and sorted(n["node_id"] for n in restarted[0]["nodes"]) == sorted(one["nodes_killed"])
    assert restarted[0]["pid"] not in seen["pids_before"]  # a new process
    assert all(n["state"] == "NODE_STATE_HEALTHY" and n["bundles"] for s in restarted for n in s["nodes"])

    # lost for good: replacements with new ids take the places, fetching their bundles over the wire
    assert lost["full_strength"] and set(lost["came_back"].values()) == {"replaced"}
    assert lost["bundle_bytes_fetched_again"] > 0
    assert (lost["adapters_lost"], lost["requests_unanswered"]) == (0, 0)
    assert {r["replaced"] for r in heal["replacements"]} == set(lost["nodes_killed"])
    assert all(r["node_id"].startswith(r["planned"] + "-r") and r["error"] is None for r in heal["replacements"])
    assert seen["strength"]["full"]

    f = json.loads((tmp_path / "report.json").read_text())["faults"]
    assert f["checks"]["healed_to_full_strength"] and f["checks"]["no_adapter_lost_to_kill9"]
    assert [row["case"] for row in f["heal"]["summary"]] == ["one", "lost-one"]
    assert "seconds_to_full_strength" in (tmp_path / "report.md").read_text()


def _alive(actor) -> bool:
    import ray

    try:
        ray.get(actor.status.remote(), timeout=10)
        return True
    except Exception:  # noqa: BLE001 - killed for good by the lost case
        return False


def test_kill9_cases_and_heal_settings_are_validated():
    with pytest.raises(ScenarioError, match=r"faults.kill9\[0\]"):
        override(Scenario(), "faults", kill9=["two"])
    with pytest.raises(ScenarioError, match="heal.replace_after_s"):
        override(Scenario(), "heal", replace_after_s=0.5)
    with pytest.raises(ScenarioError, match="heal.restarts"):
        override(Scenario(), "heal", restarts=-2)
    scn = override(Scenario(), "faults", kill9=["lost-model:novelist", "half"])
    assert scn.faults.kill9 == ["lost-model:novelist", "half"]


class _Fed:
    """Just what victim choice reads: plans, actors and their nodes, and who holds users."""

    def __init__(self, actor_nodes, models, holders):
        from types import SimpleNamespace as NS

        self.actor_nodes = actor_nodes
        self.actors = [object() for _ in actor_nodes]
        self.plans = [NS(node_id=n, model=models[n]) for ids in actor_nodes for n in ids]
        users = [NS(node_id=h) for h in holders]
        self.coordinator = NS(registry=NS(users=lambda: users))


def test_victims_of_each_case():
    import random
    from types import SimpleNamespace as NS

    models = {"a": "novelist", "b": "base", "c": "base", "d": "base", "e": "base"}
    fed = _Fed([["a", "b"], ["c"], ["d"], ["e"]], models, holders=["d"])
    cases = HealCases(NS(fed=fed, rng=random.Random(0)))
    assert cases.victims("one") == [2]  # the process of the node holding users
    assert cases.victims("model") == [0, 1, 2, 3]  # every process with a base node
    assert cases.victims("model:novelist") == [0]
    half = cases.victims("half")
    assert sum(len(fed.actor_nodes[i]) for i in half) >= 3 and len(set(half)) == len(half)
    cases.gone.add(2)  # lost for good: never chosen again
    assert 2 not in cases.victims("model") and cases.victims("one") != [2]
