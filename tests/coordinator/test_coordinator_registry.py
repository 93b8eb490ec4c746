"""The SQLite registry: everything written survives closing and reopening the database."""

from __future__ import annotations

import numpy as np

from coordinator.registry import Registry
from proto import federation_pb2 as pb


def test_nodes_users_routing_and_counters_survive_reopen(tmp_path):
    db = tmp_path / "reg.db"
    reg = Registry(db)
    reg.upsert_node(node_id="n1", address="127.0.0.1:1", model="base", codec="int8", state=pb.NODE_STATE_HEALTHY,
                    bundles=["b2", "b1"], held_users=["u1"], n_blocks=2, n_experts=16, at_ms=1000)
    reg.heartbeat(node_id="n1", state=pb.NODE_STATE_HEALTHY, bundles=["b1"], held_users=["u1"],
                  expert_mask=b"\x0f\xff", inflight=3, at_ms=2000)
    reg.put_user("u1", persona="novelist", adapter=b"blob", adapter_sha256=b"s" * 32, token_hash=b"h" * 32)
    reg.assign_user("u1", "n1")
    counts = np.arange(32, dtype=np.uint64).reshape(2, 16)
    reg.set_routing("n1", counts, tokens=99)
    reg.save_traffic([("n1", pb.BYTE_KIND_SCORE, "u1", 10, 20, 2, 0)])
    reg.save_counters({"ok.Federation": 7})
    reg.close()

    reg = Registry(db)
    node = reg.get_node("n1")
    assert (node.address, node.model, node.codec, node.state) == ("127.0.0.1:1", "base", "int8", pb.NODE_STATE_HEALTHY)
    assert (node.bundles, node.expert_mask, node.inflight, node.last_heartbeat_ms) == (("b1",), b"\x0f\xff", 3, 2000)
    user = reg.get_user("u1")
    assert (user.persona, user.node_id, user.adapter, user.adapter_sha256) == ("novelist", "n1", b"blob", b"s" * 32)
    assert reg.user_for_token_hash(b"h" * 32) == "u1"
    assert reg.user_for_token_hash(b"x" * 32) is None
    [routing] = reg.routing()
    np.testing.assert_array_equal(routing.counts, counts)
    assert routing.tokens == 99
    assert reg.load_traffic() == [("n1", pb.BYTE_KIND_SCORE, "u1", 10, 20, 2, 0)]
    assert reg.load_counters() == {"ok.Federation": 7}
    reg.close()


def test_put_user_updates_only_given_fields(tmp_path):
    reg = Registry(tmp_path / "r.db")
    reg.put_user("u", persona="p", adapter=b"a", adapter_sha256=b"1" * 32, token_hash=b"t" * 32)
    reg.put_user("u", persona=None)
    user = reg.get_user("u")
    assert (user.persona, user.adapter, user.token_hash) == ("p", b"a", b"t" * 32)
    reg.put_user("u", token_hash=b"n" * 32)
    assert reg.user_for_token_hash(b"t" * 32) is None and reg.user_for_token_hash(b"n" * 32) == "u"
    assert reg.delete_user("u") and not reg.delete_user("u")
    assert reg.get_user("u") is None
    reg.close()


def test_re_registering_keeps_users_and_silent_nodes_go_down(tmp_path):
    reg = Registry(tmp_path / "r.db")
    for i, hb in ((1, 1_000), (2, 9_000)):
        reg.upsert_node(node_id=f"n{i}", address=f"h:{i}", model="base", codec="", state=pb.NODE_STATE_HEALTHY,
                        at_ms=hb)
    reg.put_user("u")
    reg.assign_user("u", "n1")
    reg.upsert_node(node_id="n1", address="h:99", model="base", codec="", state=pb.NODE_STATE_REGISTERED, at_ms=1_000)
    assert reg.get_node("n1").address == "h:99"
    assert reg.users_on_node("n1") == ["u"]
    assert reg.user_counts_by_node() == {"n1": 1}
    assert reg.mark_silent_nodes_down(older_than_ms=5_000) == ["n1"]
    assert reg.get_node("n1").state == pb.NODE_STATE_DOWN
    assert reg.get_node("n2").state == pb.NODE_STATE_HEALTHY
    assert [n.node_id for n in reg.nodes(pb.NODE_STATE_HEALTHY)] == ["n2"]
    assert not reg.heartbeat(node_id="ghost", state=1, bundles=(), held_users=(), expert_mask=b"", inflight=0)
    reg.close()
