"""The wire rules node and coordinator must agree on, defined once in proto/ and called by both sides.

Each rule is checked on its own, then through the real validation paths of the node and the
coordinator, so a side that grew its own copy again fails here.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

import coordinator.limits
import coordinator.scoring
import node.actor
import node.adapters
import node.runtime
from coordinator.auth import bearer_token
from coordinator.config import CoordinatorConfig
from coordinator.limits import RequestError, check_bundle_name, check_id
from node.adapters import AdapterError, decode_adapter
from node.assembly import WeightStore
from node.counting import ByteCounter
from node.errors import InvalidRequest
from node.runtime import VirtualNode
from node.server import token_matches
from node.soup import SoupInstance
from proto import federation_pb2 as pb
from proto.auth_metadata import BearerError, auth_entries, bearer_metadata, parse_bearer
from proto.byte_counting import kind_name, kind_of_method, payload_bytes
from proto.ids import is_valid_bundle_name, is_valid_id
from proto.message_limits import MAX_MESSAGE_BYTES, message_size_options
from proto.model_labels import model_label, soup_label

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("coordinator", "node", "sim", "model")

GOOD_IDS = ["alice", "a", "node-0004", "u_1.x", "A" * 64]
BAD_IDS = ["", "alice\n", "\nalice", "al ice", "-alice", ".alice", "../etc", "a/b", "A" * 65, "alicé", "alice\x00"]


def _sources() -> list[tuple[str, str]]:
    return [(p.relative_to(ROOT).as_posix(), p.read_text())
            for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


# --- ids -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", GOOD_IDS)
def test_valid_ids_pass_on_both_sides(value):
    assert is_valid_id(value) and is_valid_bundle_name(value)
    assert check_id(value, "user_id") == value
    node.runtime.VirtualNode(value, store=WeightStore())  # the node's own id check
    assert node.actor.NodeSpec.from_dict({"node_id": value, "users": [value]}).node_id == value


@pytest.mark.parametrize("value", BAD_IDS)
def test_bad_ids_are_refused_by_both_sides(value):
    assert not is_valid_id(value)
    with pytest.raises(RequestError) as err:
        check_id(value, "user_id")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    n = VirtualNode("n1", store=WeightStore())
    with pytest.raises(InvalidRequest):
        n.unload_user(value)
    with pytest.raises(AdapterError):
        decode_adapter(value, b"x", {})
    with pytest.raises(ValueError):
        VirtualNode(value, store=WeightStore())


def test_trailing_newline_is_refused_by_the_node():
    """The node's copy once used ``^...$`` with ``re.match``, which accepts "alice\\n"."""
    n = VirtualNode("n1", store=WeightStore())
    with pytest.raises(InvalidRequest):
        n.unload_user("alice\n")
    with pytest.raises(InvalidRequest):
        n._adapter("alice\n")
    with pytest.raises(node.actor.SpecError):
        node.actor.NodeSpec.from_dict({"node_id": "n1\n"})


def test_bundle_names():
    assert is_valid_bundle_name("b" * 128) and not is_valid_bundle_name("b" * 129)
    assert not is_valid_bundle_name("base.bundle\n") and not is_valid_bundle_name(None)
    with pytest.raises(RequestError):
        check_bundle_name("base\n")


def test_both_sides_call_the_one_id_rule():
    for module in (coordinator.limits, node.runtime, node.adapters, node.actor):
        assert module.is_valid_id is is_valid_id, module.__name__
    for module in (coordinator.limits, node.runtime):
        assert module.is_valid_bundle_name is is_valid_bundle_name, module.__name__
    copies = [rel for rel, text in _sources() if "[A-Za-z0-9][A-Za-z0-9._-]{0," in text and "proto.ids" not in text]
    assert not copies, f"id patterns written outside proto/ids.py: {copies}"


# --- bearer tokens ---------------------------------------------------------------------------


def test_bearer_round_trip_on_both_sides():
    md = bearer_metadata("tok-123")
    assert md == (("authorization", "Bearer tok-123"),)
    assert parse_bearer(md) == bearer_token(md) == "tok-123"
    assert token_matches(md, "tok-123") and not token_matches(md, "tok-12")
    assert auth_entries((("x-other", "1"), *md)) == list(md)


@pytest.mark.parametrize("metadata", [(), (("authorization", "Basic abc"),), (("authorization", "Bearer "),),
                                      (("authorization", "Bearer a"), ("authorization", "Bearer b")),
                                      (("authorization", "Bearer " + "t" * 513),)])
def test_malformed_bearer_is_refused(metadata):
    with pytest.raises(BearerError):
        parse_bearer(metadata)
    with pytest.raises(RequestError):
        bearer_token(metadata)


def test_no_hand_written_bearer_metadata():
    copies = [rel for rel, text in _sources() if re.search(r"""["']authorization["']\s*,\s*f?["']Bearer""", text)]
    assert not copies, f"bearer metadata built outside proto/auth_metadata.py: {copies}"


# --- message sizes ---------------------------------------------------------------------------


def test_message_limits_are_one_number():
    assert message_size_options() == [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    assert message_size_options(5, send=False) == [("grpc.max_receive_message_length", 5)]
    assert {f.name: f.default for f in dataclasses.fields(CoordinatorConfig)}["max_message_bytes"] == MAX_MESSAGE_BYTES
    assert message_size_options() == node.actor.CHANNEL_OPTIONS
    copies = [rel for rel, text in _sources()
              if re.search(r"max_(receive|send)_message_length|\b(8|16) \* 1024 \* 1024|\b16 << 20", text)]
    assert not copies, f"message size limits written outside proto/message_limits.py: {copies}"


# --- byte counting ---------------------------------------------------------------------------


def test_byte_counting_rule():
    assert payload_bytes(pb.BundleChunk(data=b"abc")) == 3
    assert payload_bytes(pb.Adapter(data=b"abcd")) == 4
    assert payload_bytes(pb.LoadUserRequest(adapter=pb.Adapter(data=b"ab"))) == 2
    assert payload_bytes(pb.ScoreTokensRequest(token_ids=[1, 2])) == 0
    assert kind_of_method("/fractal.federation.v1.NodeControl/FetchBundle") == pb.BYTE_KIND_BUNDLE
    assert kind_of_method("/fractal.federation.v1.Node/InstantiateSoup") == pb.BYTE_KIND_CONTROL
    assert kind_name(pb.BYTE_KIND_MIXTURE) == "MIXTURE" and kind_name(999) == "999"
    c = ByteCounter()
    c.add(pb.BYTE_KIND_BUNDLE, received=10, payload=7)
    assert c.as_dict()["by_kind"] == {"bundle": {"sent": 0, "received": 10, "messages": 1, "payload": 7}}


# --- model labels ----------------------------------------------------------------------------


@pytest.mark.parametrize("model,user,h,label", [
    ("base", "", None, "base"), ("", "", None, "base"), ("base", "alice", None, "adapter:alice"),
    ("novelist", "", None, "specialist:novelist"), ("novelist", "bob", None, "specialist:novelist+adapter:bob"),
    ("soup", "", [0.7, 0.0, 0.3], "soup:h=0.700,0.000,0.300"),
    ("soup", "bob", [0.5, 0.5], "soup:h=0.500,0.500+adapter:bob"),
])
def test_model_label_is_the_same_on_node_and_coordinator(model, user, h, label):
    assert model_label(model, user, soup_h=h) == label
    n = VirtualNode("n1", store=WeightStore(), model_name=model)
    if h is not None:
        n.soup = SoupInstance(bank="bank", domains=tuple("abc"[:len(h)]), domain_weights=h, alpha=[],
                              label=soup_label(h))
    assert n.label(user) == label
    saved = pb.InstantiateSoupRequest(domain_weights=h).SerializeToString() if h is not None else None
    core = SimpleNamespace(registry=SimpleNamespace(get_soup=lambda node_id: saved))
    route = SimpleNamespace(node=SimpleNamespace(node_id="n1", model=model or "base"), adapter_user_id=user)
    assert coordinator.scoring.node_label(core, route) == label


def test_codec_names_compose_with_plus_and_are_never_paths() -> None:
    from proto.ids import is_valid_codec

    assert all(is_valid_codec(c) for c in ("int8", "prune50+ternary-ec", "prune50+int8", "fp16"))
    assert not any(is_valid_codec(c) for c in ("", "+int8", "../int8", "a/b", "int8\n", "x" * 65, None))
