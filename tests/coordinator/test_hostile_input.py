"""Hostile and malformed gRPC requests against a real coordinator: the exact status code of each,
and the server keeps serving after every one (a health check and a valid request succeed).

Expected codes come from the documented table in docs/api.md ("Status codes"), not from the code.
"""

from __future__ import annotations

import hashlib
import math
import os

import grpc
import pytest
from live_coordinator import TEXT, LiveCoordinator, status_of

from proto import federation_pb2 as pb

C = grpc.StatusCode
FED = "/fractal.federation.v1.Federation/"
CTRL = "/fractal.federation.v1.NodeControl/"
MAX_TEXT = 200
BUNDLE = os.urandom(20_000)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    live = LiveCoordinator(tmp_path_factory.mktemp("hostile"), max_text_chars=MAX_TEXT)
    live.add_node("n1", seed=1)
    live.add_user("alice", boost=2, node_id="n1")
    live.add_user("bob", boost=3)
    live.add_user("carol")  # no adapter
    live.add_user("dave", boost=4)  # its token is rotated by a case
    live.add_user("erin", boost=5)  # deleted by a case
    sha = hashlib.sha256(BUNDLE).digest()
    live.stub.PutBundle(iter([pb.BundleChunk(name="base.fp32", offset=0, data=BUNDLE, total_size=len(BUNDLE),
                                             sha256=sha, model="base", codec="fp32")]), metadata=live.meta("admin"))
    yield live
    live.close()


def raw(L, method: str, data: bytes, who: str = "admin", stream: bool = False):
    """Send ``data`` as the request bytes of ``method`` (a path), as whoever ``who`` is."""
    make = L.channel.unary_stream if stream else L.channel.unary_unary
    return make(method)(data, metadata=L.meta(who), timeout=10)


def score(L, who: str = "admin", **fields):
    return L.stub.Score(pb.ScoreRequest(**({"text": TEXT} | fields)), metadata=L.meta(who), timeout=10)


def score_md(L, metadata, **fields):
    return L.stub.Score(pb.ScoreRequest(**({"text": TEXT} | fields)), metadata=metadata, timeout=10)


def generate(L, who: str = "admin", **fields):
    return L.stub.Generate(pb.GenerateRequest(**({"prompt": "the cat", "max_new_tokens": 2} | fields)),
                           metadata=L.meta(who), timeout=10)


def mixture(L, components, **spec):
    return score(L, mixture=pb.MixtureSpec(components=components, **spec))


def fetch(L, **fields):
    return L.control.FetchBundle(pb.FetchBundleRequest(**({"node_id": "n1"} | fields)), metadata=L.meta("node"),
                                 timeout=10)


def register(L, who: str = "node", **fields):
    request = pb.RegisterRequest(**({"node_id": "rogue", "address": "127.0.0.1:9", "model": "base"} | fields))
    return L.control.Register(request, metadata=L.meta(who), timeout=10)


def rotated_token_replayed(L):
    old = L.tokens["dave"]
    L.tokens["dave"] = L.stub.PutUser(pb.PutUserRequest(user_id="dave", rotate_token=True),
                                      metadata=L.meta("admin")).token
    assert score(L, "dave", user_id="dave").logprobs  # the new token works
    return score_md(L, (("authorization", f"Bearer {old}"),), user_id="dave")


def deleted_users_token_replayed(L):
    L.stub.DeleteUser(pb.DeleteUserRequest(user_id="erin"), metadata=L.meta("admin"))
    return score(L, "erin", user_id="erin")


def put_bundle(L, *chunks):
    return L.stub.PutBundle(iter(chunks), metadata=L.meta("admin"), timeout=10)


comp = pb.MixtureComponent
SHA = hashlib.sha256(b"abc").digest()

# (case id, call, expected code). Each call takes the LiveCoordinator and returns the call's result
# (a reply or a stream to drain).
CASES = [
    # --- raw bytes on the wire: garbage, truncation, wrong wire types, bad UTF-8 ---
    ("garbage-bytes-score", lambda L: raw(L, FED + "Score", b"\xff\xff\xff\xff\x0f"), C.INVALID_ARGUMENT),
    ("garbage-bytes-generate-stream", lambda L: raw(L, FED + "Generate", b"\xff" * 32, stream=True),
     C.INVALID_ARGUMENT),
    ("garbage-bytes-heartbeat", lambda L: raw(L, CTRL + "Heartbeat", b"\x0a\xff\x01", who="node"), C.INVALID_ARGUMENT),
    ("garbage-bytes-putbundle-client-stream",
     lambda L: L.channel.stream_unary(FED + "PutBundle")(iter([b"\x0a\x05ab"]), metadata=L.meta("admin"), timeout=10),
     C.INVALID_ARGUMENT),
    ("truncated-length-prefix", lambda L: raw(L, FED + "Score", b"\x12\x10abc"), C.INVALID_ARGUMENT),
    ("invalid-utf8-in-text", lambda L: raw(L, FED + "Score", b"\x12\x03\xff\xfe\xfd"), C.INVALID_ARGUMENT),
    ("garbage-inside-mixture-submessage", lambda L: raw(L, FED + "Score", b"\x12\x03cat\x1a\x02\xff\xff"),
     C.INVALID_ARGUMENT),
    # a field sent with the wrong wire type is an unknown field to protobuf: text as a varint is no text
    ("text-as-varint-wrong-type", lambda L: raw(L, FED + "Score", b"\x10\x05"), C.INVALID_ARGUMENT),
    # ... and a user_id sent as fixed64 is no user_id: the request is served on the base model
    ("user-id-as-fixed64-wrong-type",
     lambda L: raw(L, FED + "Score", b"\x09" + bytes(8) + b"\x12" + bytes([len(TEXT)]) + TEXT.encode()), C.OK),
    ("empty-body", lambda L: raw(L, FED + "Score", b""), C.INVALID_ARGUMENT),
    ("unknown-method", lambda L: raw(L, FED + "DropTables", b""), C.UNIMPLEMENTED),
    ("unknown-service", lambda L: raw(L, "/fractal.federation.v1.Shell/Exec", b""), C.UNIMPLEMENTED),
    # --- huge fields ---
    ("text-over-limit", lambda L: score(L, text="cat " * (MAX_TEXT // 4 + 1)), C.INVALID_ARGUMENT),
    ("message-over-size-limit",
     lambda L: L.stub.PutUser(pb.PutUserRequest(user_id="big", adapter=pb.Adapter(data=b"x" * 200_000)),
                              metadata=L.meta("admin"), timeout=10), C.RESOURCE_EXHAUSTED),
    ("user-id-10k-chars", lambda L: score(L, user_id="a" * 10_000), C.INVALID_ARGUMENT),
    ("token-600-chars", lambda L: score_md(L, (("authorization", "Bearer " + "t" * 600),)), C.UNAUTHENTICATED),
    ("mixture-17-components", lambda L: mixture(L, [comp()] * 17), C.INVALID_ARGUMENT),
    ("max-new-tokens-1e6", lambda L: generate(L, max_new_tokens=10**6), C.INVALID_ARGUMENT),
    ("top-k-2e32-minus-1", lambda L: generate(L, top_k=2**32 - 1), C.INVALID_ARGUMENT),
    ("register-n-blocks-2000", lambda L: register(L, n_blocks=2000), C.INVALID_ARGUMENT),
    # --- invalid ids and names that look like paths ---
    ("user-id-path-traversal", lambda L: score(L, user_id="../../etc/passwd"), C.INVALID_ARGUMENT),
    ("user-id-with-nul", lambda L: score(L, user_id="alice\x00root"), C.INVALID_ARGUMENT),
    ("user-id-non-ascii", lambda L: score(L, user_id="\u00e5lice"), C.INVALID_ARGUMENT),
    ("user-id-leading-dash", lambda L: score(L, user_id="-rf"), C.INVALID_ARGUMENT),
    ("node-id-path-traversal", lambda L: register(L, node_id="../n1"), C.INVALID_ARGUMENT),
    ("fetch-bundle-dotdot", lambda L: fetch(L, name="../registry.db"), C.INVALID_ARGUMENT),
    ("fetch-bundle-absolute-path", lambda L: fetch(L, name="/etc/passwd"), C.INVALID_ARGUMENT),
    ("fetch-bundle-nested-dotdot", lambda L: fetch(L, name="bundles/../../registry.db"), C.INVALID_ARGUMENT),
    ("put-bundle-backslash-traversal",
     lambda L: put_bundle(L, pb.BundleChunk(name="..\\..\\evil", data=b"abc", total_size=3, sha256=SHA)),
     C.INVALID_ARGUMENT),
    ("fetch-unknown-bundle", lambda L: fetch(L, name="nope"), C.NOT_FOUND),
    ("fetch-offset-past-end", lambda L: fetch(L, name="base.fp32", offset=len(BUNDLE) + 1), C.OUT_OF_RANGE),
    ("get-adapter-unknown-user", lambda L: L.stub.GetAdapter(pb.GetAdapterRequest(user_id="ghost"),
                                                             metadata=L.meta("admin")), C.NOT_FOUND),
    ("assign-to-unknown-node", lambda L: L.stub.AssignUser(pb.AssignUserRequest(user_id="alice", node_id="ghost"),
                                                           metadata=L.meta("admin")), C.NOT_FOUND),
    ("set-state-unknown-node", lambda L: L.stub.SetNodeState(pb.SetNodeStateRequest(
        node_id="ghost", state=pb.NODE_STATE_DOWN), metadata=L.meta("admin")), C.NOT_FOUND),
    ("mixture-pinned-to-unknown-node", lambda L: mixture(L, [comp(node_id="ghost")]), C.NOT_FOUND),
    # --- NaN, infinities, out-of-range numbers and enums ---
    ("temperature-nan", lambda L: generate(L, temperature=math.nan), C.INVALID_ARGUMENT),
    ("temperature-inf", lambda L: generate(L, temperature=math.inf), C.INVALID_ARGUMENT),
    ("temperature-negative", lambda L: generate(L, temperature=-1.0), C.INVALID_ARGUMENT),
    ("prior-nan", lambda L: mixture(L, [comp(), comp()], prior=[1.0, math.nan]), C.INVALID_ARGUMENT),
    ("prior-inf", lambda L: mixture(L, [comp(), comp()], prior=[math.inf, 1.0]), C.INVALID_ARGUMENT),
    ("prior-negative", lambda L: mixture(L, [comp(), comp()], prior=[-1.0, 1.0]), C.INVALID_ARGUMENT),
    ("prior-length-mismatch", lambda L: mixture(L, [comp(), comp()], prior=[1.0]), C.INVALID_ARGUMENT),
    ("mixture-mode-out-of-enum", lambda L: mixture(L, [comp()], mode=9), C.INVALID_ARGUMENT),
    ("list-nodes-state-out-of-enum", lambda L: L.stub.ListNodes(pb.ListNodesRequest(state=42),
                                                                metadata=L.meta("admin")), C.INVALID_ARGUMENT),
    ("routing-histogram-wrong-shape", lambda L: L.control.ReportRouting(pb.RoutingReport(
        node_id="n1", histogram=pb.RoutingHistogram(n_blocks=2, n_experts=16, counts=[1, 2, 3])),
        metadata=L.meta("node")), C.INVALID_ARGUMENT),
    # --- forged, malformed, replayed and misused tokens ---
    ("no-authorization", lambda L: score_md(L, ()), C.UNAUTHENTICATED),
    ("forged-token", lambda L: score_md(L, (("authorization", "Bearer forged-0123456789abcdef"),)), C.UNAUTHENTICATED),
    ("basic-scheme", lambda L: score_md(L, (("authorization", f"Basic {L.tokens['admin']}"),)), C.UNAUTHENTICATED),
    ("token-without-scheme", lambda L: score_md(L, (("authorization", L.tokens["admin"]),)), C.UNAUTHENTICATED),
    ("two-authorization-headers",
     lambda L: score_md(L, (("authorization", f"Bearer {L.tokens['admin']}"), ("authorization", "Bearer x"))),
     C.UNAUTHENTICATED),
    ("admin-token-with-one-char-changed",
     lambda L: score_md(L, (("authorization", "Bearer " + L.tokens["admin"][:-1] + "!"),)), C.UNAUTHENTICATED),
    ("rotated-token-replayed", rotated_token_replayed, C.UNAUTHENTICATED),
    ("deleted-users-token-replayed", deleted_users_token_replayed, C.UNAUTHENTICATED),
    ("other-users-token", lambda L: score(L, "bob", user_id="alice"), C.PERMISSION_DENIED),
    ("node-token-on-federation", lambda L: score(L, "node"), C.PERMISSION_DENIED),
    ("user-token-registers-a-node", lambda L: register(L, "alice"), C.PERMISSION_DENIED),
    ("user-token-on-admin-rpc", lambda L: L.stub.PutUser(pb.PutUserRequest(user_id="mallory"),
                                                         metadata=L.meta("alice")), C.PERMISSION_DENIED),
    ("user-borrows-anothers-adapter-in-mixture",
     lambda L: score(L, "alice", user_id="alice", mixture=pb.MixtureSpec(components=[comp(adapter_user_id="bob")])),
     C.PERMISSION_DENIED),
    # --- inconsistent or impossible requests ---
    ("text-of-one-token", lambda L: score(L, text="cat"), C.INVALID_ARGUMENT),
    ("get-adapter-of-user-without-one", lambda L: L.stub.GetAdapter(pb.GetAdapterRequest(user_id="carol"),
                                                                    metadata=L.meta("admin")), C.NOT_FOUND),
    ("mixture-with-missing-adapter", lambda L: mixture(L, [comp(adapter_user_id="carol")]), C.FAILED_PRECONDITION),
    ("put-user-adapter-sha-mismatch", lambda L: L.stub.PutUser(pb.PutUserRequest(
        user_id="zed", adapter=pb.Adapter(data=b"abc", sha256=b"\x00" * 32)), metadata=L.meta("admin")),
     C.INVALID_ARGUMENT),
    ("put-bundle-bytes-not-matching-sha",
     lambda L: put_bundle(L, pb.BundleChunk(name="liar", data=b"abc", total_size=3, sha256=b"\x01" * 32)),
     C.FAILED_PRECONDITION),
    ("put-bundle-first-chunk-without-sha",
     lambda L: put_bundle(L, pb.BundleChunk(name="nosha", data=b"abc", total_size=3)), C.INVALID_ARGUMENT),
    ("register-unsupported-protocol", lambda L: register(L, protocol_version=99), C.FAILED_PRECONDITION),
    ("register-address-not-host-port", lambda L: register(L, address="file:///etc/passwd"), C.INVALID_ARGUMENT),
    ("report-routing-unregistered-node", lambda L: L.control.ReportRouting(pb.RoutingReport(
        node_id="stranger", histogram=pb.RoutingHistogram(n_blocks=1, n_experts=1, counts=[1])),
        metadata=L.meta("node")), C.NOT_FOUND),
    ("fetch-bundle-replaced-sha", lambda L: fetch(L, name="base.fp32", expected_sha256=b"\x02" * 32),
     C.FAILED_PRECONDITION),
]


def test_the_table_is_large_and_ids_are_unique():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("call, code", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_request_gets_its_exact_code_and_the_server_keeps_serving(live, call, code):
    assert status_of(lambda: call(live)) == code
    assert live.alive()


def test_nothing_was_lost_or_leaked_after_the_whole_table(live):
    users = {u.user_id for u in live.stub.ListUsers(pb.ListUsersRequest(), metadata=live.meta("admin")).users}
    # the fixture's users (erin unless a case deleted her); nothing that a refused PutUser named
    assert {"alice", "bob", "carol", "dave"} <= users <= {"alice", "bob", "carol", "dave", "erin"}
    bundles = live.stub.ListBundles(pb.ListBundlesRequest(), metadata=live.meta("admin")).bundles
    assert [b.name for b in bundles] == ["base.fp32"]
    nodes = live.stub.ListNodes(pb.ListNodesRequest(), metadata=live.meta("admin")).nodes
    assert sorted(n.node_id for n in nodes) == ["n1"]  # no refused registration slipped in
    reply = live.stub.Score(pb.ScoreRequest(user_id="alice", text=TEXT), metadata=live.meta("alice"))
    assert reply.model == "adapter:alice"
