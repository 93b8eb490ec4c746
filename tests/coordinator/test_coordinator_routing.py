"""Routing policy over a real registry, with an installer that records instead of calling nodes."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.registry import Registry
from coordinator.routing import NoNodeAvailable, NodeUnavailable, Router
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


def test_own_node_wins_and_users_without_adapters_get_the_base(registry):
    registry.put_user("alice", adapter=b"a")
    registry.assign_user("alice", "b2")
    registry.put_user("newbie")
    rec = Recorder()
    router = Router(registry, rec)
    route = asyncio.run(router.route_user(registry.get_user("alice")))
    assert (route.node.node_id, route.adapter_user_id, route.failed_over) == ("b2", "alice", False)
    route = asyncio.run(router.route_user(registry.get_user("newbie")))
    assert route.adapter_user_id == "" and route.node.model == "base"
    route = asyncio.run(router.route_user(registry.get_user("alice"), use_base=True))
    assert route.adapter_user_id == ""
    assert rec.installed == []


def test_base_requests_spread_over_idle_nodes(registry):
    router = Router(registry, Recorder())
    seen = {asyncio.run(router.route_user(None)).node.node_id for _ in range(6)}
    assert seen == {"b1", "b2", "b3"}  # never the specialist


def test_failover_reinstalls_on_least_loaded_and_skips_dead_nodes(registry):
    for user, node in (("u1", "b1"), ("u2", "b1"), ("u3", "b2")):
        registry.put_user(user, adapter=b"x")
        registry.assign_user(user, node)
    registry.set_node_state("b1", pb.NODE_STATE_DOWN)
    rec = Recorder(dead={"b3"})  # b3 has no users but does not answer
    router = Router(registry, rec)
    route = asyncio.run(router.route_user(registry.get_user("u1")))
    assert (route.node.node_id, route.failed_over) == ("b2", True)
    assert rec.installed == [("b2", "u1")]
    assert registry.get_user("u1").node_id == "b2"
    assert registry.get_node("b3").state == pb.NODE_STATE_DOWN


def test_no_healthy_base_node(registry):
    for n in ("b1", "b2", "b3"):
        registry.set_node_state(n, pb.NODE_STATE_DOWN)
    router = Router(registry, Recorder())
    with pytest.raises(NoNodeAvailable):
        asyncio.run(router.route_user(None))
    assert router.route_model("novelist").node_id == "s1"
    with pytest.raises(NoNodeAvailable):
        router.route_model("base", node_id="b1")
    with pytest.raises(KeyError):
        router.route_model("base", node_id="nope")
