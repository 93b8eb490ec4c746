"""The request path: a routing decision's fallback order as the dispatcher walks it, and what a Score
reads from the registry (the user once, the adapter blob only when it moves)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from coordinator_harness import federation, meta, run

from coordinator.dispatch import Dispatcher
from coordinator.limits import RequestError
from coordinator.registry import Registry
from coordinator.routing import Router
from proto import federation_pb2 as pb

TEXT = "the cat sat on the mat and then the dog ran to the park"


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="test")


@pytest.fixture
def registry(tmp_path):
    reg = Registry(tmp_path / "r.db")
    for node_id in ("b1", "b2", "b3"):
        reg.upsert_node(node_id=node_id, address=f"h:{node_id}", model="base", codec="", state=pb.NODE_STATE_HEALTHY)
    yield reg
    reg.close()


class Nodes:
    """A fake call: the nodes in ``failing`` answer with ``code``; installs are recorded."""

    def __init__(self, failing=(), code=grpc.StatusCode.UNAVAILABLE):
        self.failing, self.code = dict.fromkeys(failing, 1), code
        self.called, self.installed, self.forgotten = [], [], []

    async def call(self, route):
        self.called.append(route.node.node_id)
        if self.failing.get(route.node.node_id, 0) > 0:
            self.failing[route.node.node_id] -= 1
            raise _rpc_error(self.code)
        return route.node.node_id

    async def install(self, node, user):
        self.installed.append((node.node_id, user.user_id))

    async def forget(self, address):
        self.forgotten.append(address)


def _dispatcher(registry, nodes, max_failover=2):
    return Dispatcher(Router(registry), nodes.install, nodes.forget, max_failover=max_failover)


def test_the_dispatcher_walks_the_fallback_order_and_takes_out_down_nodes(registry):
    decision = Router(registry).for_user(None)
    order = [n.node_id for n in decision.nodes]
    nodes = Nodes(failing=order[:2])
    answer, route = asyncio.run(_dispatcher(registry, nodes).call(decision, nodes.call))
    assert nodes.called == order and answer == order[2] and route.failed_over
    assert [registry.get_node(n).state for n in order[:2]] == [pb.NODE_STATE_DOWN] * 2
    assert nodes.forgotten == [f"h:{n}" for n in order[:2]]


def test_the_dispatcher_stops_after_max_failover_down_nodes(registry):
    nodes = Nodes(failing=("b1", "b2", "b3"))
    with pytest.raises(RequestError) as err:
        asyncio.run(_dispatcher(registry, nodes, max_failover=1).call(Router(registry).for_user(None), nodes.call))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and len(nodes.called) == 2


def test_a_user_moves_to_the_next_placement_node_and_a_lost_adapter_is_reinstalled_once(registry):
    registry.put_user("alice", adapter=b"a")
    registry.assign_user("alice", "b1")
    alice = registry.get_user("alice", with_adapter=False)
    decision = Router(registry).for_user(alice)
    assert (decision.reason, decision.home, [n.node_id for n in decision.nodes]) == \
        ("own adapter", "b1", ["b1", "b2", "b3"])
    nodes = Nodes(failing=("b1",))
    _, route = asyncio.run(_dispatcher(registry, nodes).call(decision, nodes.call))
    assert (route.node.node_id, route.adapter.node_id, route.failed_over) == ("b2", "b2", True)
    assert nodes.installed == [("b2", "alice")] and registry.get_user("alice").node_id == "b2"
    # a node that lost the adapter answers NOT_FOUND: reinstalled once, then asked again
    nodes = Nodes(failing=("b2",), code=grpc.StatusCode.NOT_FOUND)
    decision = Router(registry).for_user(route.adapter)
    _, route = asyncio.run(_dispatcher(registry, nodes).call(decision, nodes.call))
    assert (nodes.called, nodes.installed, route.failed_over) == (["b2", "b2"], [("b2", "alice")], False)


def test_a_score_reads_its_user_once_and_the_adapter_blob_only_to_move_it(tmp_path, monkeypatch):
    async def go():
        fed = await federation(tmp_path)
        try:
            await fed.add_node("n1", seed=1)
            await fed.add_node("n2", seed=2)
            alice = await fed.add_user("alice", boost=5, node_id="n1")
            registry = fed.coordinator.registry
            reads = []
            get_user, adapter = registry.get_user, registry.adapter
            monkeypatch.setattr(registry, "get_user", lambda u, **kw: reads.append(("user", kw)) or get_user(u, **kw))
            monkeypatch.setattr(registry, "adapter", lambda u: reads.append(("adapter", u)) or adapter(u))
            await fed.stub.Score(pb.ScoreRequest(user_id="alice", text=TEXT), metadata=meta(alice))
            assert reads == [("user", {"with_adapter": False})]
            reads.clear()
            await fed.nodes["n1"].stop()
            reply = await fed.stub.Score(pb.ScoreRequest(user_id="alice", text=TEXT), metadata=meta(alice))
            assert (reply.node_id, reply.failed_over) == ("n2", True)
            assert reads == [("user", {"with_adapter": False}), ("adapter", "alice")]
        finally:
            await fed.close()
    run(go())
