"""Routing policy over a real registry: the router's decisions, and the dispatcher acting on them with
an installer that records instead of calling nodes."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.dispatch import Dispatcher
from coordinator.registry import Registry
from coordinator.routing import NodeUnavailable, NoNodeAvailable, Router, UnknownNode
from proto import federation_pb2 as pb


@pytest.fixture
def registry(tmp_path):
    reg = Registry(tmp_path / "r.db")
    for node_id, model in (("b1", "base"), ("b2", "base"), ("b3", "base"), ("s1", "novelist")):
        reg.upsert_node(node_id=node_id, address=f"h:{node_id}", model=model, codec="", state=pb.NODE_STATE_HEALTHY)
    yield reg
    reg.close()


class Recorder:
    def __init__(self, dead=()):
        self.installed, self.dead = [], set(dead)

    async def __call__(self, node, user):
        if node.node_id in self.dead:
            raise NodeUnavailable(node.node_id, "gone")
        self.installed.append((node.node_id, user.user_id))


async def _forget(address):
    pass


async def _answer(route):
    return route.node.node_id


def dispatcher(registry, rec, max_failover=2):
    """A dispatcher over ``registry`` whose installer is ``rec``."""
    return Dispatcher(Router(registry), rec, _forget, max_failover=max_failover)


def test_own_node_wins_and_users_without_adapters_get_the_base(registry):
    registry.put_user("alice", adapter=b"a")
    registry.assign_user("alice", "b2")
    registry.put_user("newbie")
    rec = Recorder()
    router = Router(registry)
    route = router.for_user(registry.get_user("alice"))
    assert (route.node.node_id, route.adapter_user_id, route.failed_over) == ("b2", "alice", False)
    route = router.for_user(registry.get_user("newbie"))
    assert route.adapter_user_id == "" and route.node.model == "base"
    route = router.for_user(registry.get_user("alice"), use_base=True)
    assert route.adapter_user_id == ""
    _, route = asyncio.run(dispatcher(registry, rec).call(router.for_user(registry.get_user("alice")), _answer))
    assert (route.node.node_id, route.adapter_user_id, route.failed_over) == ("b2", "alice", False)
    assert rec.installed == []


def test_base_requests_spread_over_idle_nodes(registry):
    router = Router(registry)
    seen = {router.for_user(None).node.node_id for _ in range(6)}
    assert seen == {"b1", "b2", "b3"}  # never the specialist


def test_failover_reinstalls_on_least_loaded_and_skips_dead_nodes(registry):
    for user, node in (("u1", "b1"), ("u2", "b1"), ("u3", "b2")):
        registry.put_user(user, adapter=b"x")
        registry.assign_user(user, node)
    registry.set_node_state("b1", pb.NODE_STATE_DOWN)
    rec = Recorder(dead={"b3"})  # b3 has no users but does not answer
    decision = Router(registry).for_user(registry.get_user("u1"))
    assert [n.node_id for n in decision.nodes] == ["b3", "b2"]  # placement: fewest users first
    _, route = asyncio.run(dispatcher(registry, rec).call(decision, _answer))
    assert (route.node.node_id, route.failed_over) == ("b2", True)
    assert rec.installed == [("b2", "u1")]
    assert registry.get_user("u1").node_id == "b2"
    assert registry.get_node("b3").state == pb.NODE_STATE_DOWN


def test_no_healthy_base_node(registry):
    for n in ("b1", "b2", "b3"):
        registry.set_node_state(n, pb.NODE_STATE_DOWN)
    router = Router(registry)
    with pytest.raises(NoNodeAvailable):
        router.for_user(None)
    assert router.for_model("novelist").node.node_id == "s1"
    with pytest.raises(NoNodeAvailable):
        router.for_model("base", node_id="b1")
    with pytest.raises(KeyError):
        router.for_model("base", node_id="nope")
    with pytest.raises(UnknownNode):
        router.for_model("base", node_id="nope")

