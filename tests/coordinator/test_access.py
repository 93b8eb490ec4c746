"""Access control: who reaches what, constant-time token comparison, and TLS end to end.

The access matrix is written from the rules in docs/api.md ("Tokens"): a user token reaches only
that user's adapter and statistics (and the base model), the node token only NodeControl, the
admin token every Federation RPC; a missing or unknown token is UNAUTHENTICATED, a valid token
that does not reach the resource PERMISSION_DENIED.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import shutil
import subprocess

import grpc
import pytest
import torch
from coordinator_harness import ADMIN, NODE, encode, federation, meta, start_coordinator
from live_coordinator import TEXT, LiveCoordinator, status_of

from model.codecs import encode_state_dict
from model.config import PRESETS
from model.fractal_moe import build_model, is_norm_param
from node.actor import NodeHost
from node.adapters import encode_adapter
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.bundle import write_bundle

C = grpc.StatusCode
OK, UA, PD = C.OK, C.UNAUTHENTICATED, C.PERMISSION_DENIED
ROLES = ("admin", "alice", "bob", "node", "forged", "none")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    live = LiveCoordinator(tmp_path_factory.mktemp("access"))
    live.add_node("n1", seed=1)
    live.add_user("alice", boost=2, node_id="n1")
    live.add_user("bob", boost=3, node_id="n1")
    live.tokens["forged"] = "forged-token-0123456789abcdef"
    yield live
    live.close()


def md(live, who):
    return () if who == "none" else live.meta(who)


def F(method, request):
    return lambda L, who: getattr(L.stub, method)(request, metadata=md(L, who), timeout=10)


def N(method, request):
    return lambda L, who: getattr(L.control, method)(request, metadata=md(L, who), timeout=10)


# RPC -> expected code per role, in ROLES order: admin, alice, bob, node, forged, none
MATRIX = {
    "score-alice": (F("Score", pb.ScoreRequest(user_id="alice", text=TEXT)), (OK, OK, PD, PD, UA, UA)),
    "score-base": (F("Score", pb.ScoreRequest(text=TEXT)), (OK, OK, OK, PD, UA, UA)),
    "generate-alice": (F("Generate", pb.GenerateRequest(user_id="alice", prompt="the cat", max_new_tokens=2)),
                       (OK, OK, PD, PD, UA, UA)),
    "mixture-with-bobs-adapter": (F("Score", pb.ScoreRequest(text=TEXT, mixture=pb.MixtureSpec(
        components=[pb.MixtureComponent(adapter_user_id="bob")]))), (OK, PD, OK, PD, UA, UA)),
    "get-adapter-alice": (F("GetAdapter", pb.GetAdapterRequest(user_id="alice")), (OK, OK, PD, PD, UA, UA)),
    "get-stats-alice": (F("GetStats", pb.GetStatsRequest(user_id="alice")), (OK, OK, PD, PD, UA, UA)),
    "get-stats-own": (F("GetStats", pb.GetStatsRequest()), (OK, OK, OK, PD, UA, UA)),
    "list-users": (F("ListUsers", pb.ListUsersRequest()), (OK, OK, OK, PD, UA, UA)),
    "list-nodes": (F("ListNodes", pb.ListNodesRequest()), (OK, OK, OK, PD, UA, UA)),
    # admin RPCs (requests an admin may send without changing the fixture)
    "delete-user-ghost": (F("DeleteUser", pb.DeleteUserRequest(user_id="ghost")), (C.NOT_FOUND, PD, PD, PD, UA, UA)),
    "assign-user-ghost": (F("AssignUser", pb.AssignUserRequest(user_id="ghost")), (C.NOT_FOUND, PD, PD, PD, UA, UA)),
    "set-node-state-ghost": (F("SetNodeState", pb.SetNodeStateRequest(node_id="ghost", state=pb.NODE_STATE_DOWN)),
                             (C.NOT_FOUND, PD, PD, PD, UA, UA)),
    "put-user-bad-id": (F("PutUser", pb.PutUserRequest(user_id="../x")), (C.INVALID_ARGUMENT, PD, PD, PD, UA, UA)),
    "put-bundle-empty": (lambda L, who: L.stub.PutBundle(iter([]), metadata=md(L, who), timeout=10),
                         (C.INVALID_ARGUMENT, PD, PD, PD, UA, UA)),
    "list-bundles": (F("ListBundles", pb.ListBundlesRequest()), (OK, PD, PD, PD, UA, UA)),
    "routing-stats": (F("GetRoutingStats", pb.GetRoutingStatsRequest()), (OK, PD, PD, PD, UA, UA)),
    "instantiate-soup-ghost": (F("InstantiateSoup", pb.SoupRequest(node_id="ghost", domain_weights=[1.0])),
                               (C.NOT_FOUND, PD, PD, PD, UA, UA)),
    # NodeControl: the node token only
    "register-node": (N("Register", pb.RegisterRequest(node_id="n9", address="127.0.0.1:9", model="base")),
                      (PD, PD, PD, OK, UA, UA)),
    "heartbeat": (N("Heartbeat", pb.HeartbeatRequest(node_id="n1", state=pb.NODE_STATE_HEALTHY)),
                  (PD, PD, PD, OK, UA, UA)),
    "fetch-adapter-alice": (N("FetchAdapter", pb.FetchAdapterRequest(user_id="alice")), (PD, PD, PD, OK, UA, UA)),
}


@pytest.mark.parametrize("rpc_name", sorted(MATRIX))
@pytest.mark.parametrize("who", ROLES)
def test_access_matrix(live, rpc_name, who):
    call, codes = MATRIX[rpc_name]
    assert status_of(lambda: call(live, who)) == codes[ROLES.index(who)]


def test_a_user_sees_only_their_own_adapter_users_and_statistics(live):
    s = live.stub
    s.Score(pb.ScoreRequest(user_id="alice", text=TEXT), metadata=live.meta("alice"))
    s.Score(pb.ScoreRequest(user_id="bob", text=TEXT), metadata=live.meta("bob"))
    mine = s.GetStats(pb.GetStatsRequest(), metadata=live.meta("alice"))
    assert mine.user_id == "alice"
    assert mine.bytes_total == s.GetStats(pb.GetStatsRequest(user_id="alice"), metadata=live.meta("admin")).bytes_total
    assert 0 < mine.bytes_total < s.GetStats(pb.GetStatsRequest(), metadata=live.meta("admin")).bytes_total
    s.Score(pb.ScoreRequest(user_id="bob", text=TEXT), metadata=live.meta("bob"))  # bob's traffic is not alice's
    assert s.GetStats(pb.GetStatsRequest(), metadata=live.meta("alice")).bytes_total == mine.bytes_total
    assert [u.user_id for u in s.ListUsers(pb.ListUsersRequest(), metadata=live.meta("alice")).users] == ["alice"]
    for n in s.ListNodes(pb.ListNodesRequest(), metadata=live.meta("alice")).nodes:
        assert set(n.user_ids) <= {"alice"}  # bob sits on n1 too, unseen
    adapter = s.GetAdapter(pb.GetAdapterRequest(user_id="alice"), metadata=live.meta("alice"))
    assert adapter.user_id == "alice" and hashlib.sha256(adapter.data).digest() == adapter.sha256
    admin_view = s.GetAdapter(pb.GetAdapterRequest(user_id="bob"), metadata=live.meta("admin"))
    assert admin_view.data != adapter.data


def test_tokens_are_compared_in_constant_time(tmp_path, monkeypatch):
    """Every authentication goes through hmac.compare_digest against both fixed tokens, whichever matches."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    def digest(token):
        return hashlib.sha256(token.encode()).digest()  # what the registry stores

    async def go():
        fed = await federation(tmp_path)
        try:
            alice = await fed.add_user("alice")
            seen = {}
            for name, token in (("admin", ADMIN), ("node", NODE), ("alice", alice), ("forged", ADMIN[:-1] + "x")):
                calls.clear()
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await fed.stub.ListUsers(pb.ListUsersRequest(), metadata=meta(token))
                seen[name] = list(calls)
            return alice, seen
        finally:
            await fed.close()

    alice, seen = asyncio.run(go())
    for name, token in (("admin", ADMIN), ("node", NODE), ("alice", alice), ("forged", ADMIN[:-1] + "x")):
        # both fixed tokens, in constant time, for every caller (no early exit on the first match)
        assert {(digest(token), digest(ADMIN)), (digest(token), digest(NODE))} <= set(seen[name]), name


# --------------------------------------------------------------------------------------------
# TLS end to end: a CA made for the test, the coordinator's certificate signed by it
# --------------------------------------------------------------------------------------------


def make_ca_and_server_cert(d) -> tuple[bytes, object, object]:
    """(CA certificate PEM, server cert path, server key path) for 127.0.0.1 and localhost."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    def run(*args):
        return subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=fractal-test-ca")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=coordinator")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "san.cnf")
    run("req", "-x509", *ec, "-keyout", "other.key", "-out", "other.pem", "-days", "1", "-subj", "/CN=not-our-ca")
    return (d / "ca.pem").read_bytes(), d / "server.pem", d / "server.key"


def tiny_model_and_adapter():
    model = build_model(PRESETS["tiny"].model, 3).eval()
    g = torch.Generator().manual_seed(4)
    adapter = {n: (p.detach() + 0.3 * torch.randn(p.shape, generator=g)).half().float()
               for n, p in model.named_parameters() if is_norm_param(n)}
    return model, adapter


def reference_logprobs(model, adapter, ids: list[int]) -> torch.Tensor:
    """log p(x_{i+1} | x_<=i) from the model with the adapter loaded, one forward pass."""
    m = build_model(model.cfg, 0)
    m.load_state_dict(model.state_dict())
    m.load_state_dict(adapter, strict=False)
    with torch.no_grad():
        lp = torch.log_softmax(m.eval()(torch.tensor([ids])).logits[0].double(), dim=-1)  # (T, V)
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_end_to_end_coordinator_node_and_client(tmp_path):
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    model, adapter = tiny_model_and_adapter()
    write_bundle(tmp_path / "base.ffb", encode_state_dict(model.state_dict(), expert_codec="fp32", other_codec="fp32"),
                 {"model": "base", "model_config": dataclasses.asdict(model.cfg)})
    blob = encode_adapter(adapter)

    async def go():
        # TLS both ways: clients and nodes to the coordinator, and the coordinator to the nodes
        handle = await start_coordinator(tmp_path, tls_cert=cert, tls_key=key, chunk_size=256 * 1024,
                                         max_message_bytes=4 * 1024 * 1024, node_tls_ca=tmp_path / "ca.pem")
        handle.store.put_file("base.fp32", tmp_path / "base.ffb", model="base", codec="fp32")
        target = f"127.0.0.1:{handle.port}"
        host = NodeHost(torch_threads=1, server_tls=(key.read_bytes(), cert.read_bytes()))
        stranger = NodeHost(torch_threads=1, heartbeats=False)
        try:
            # a node without the CA cannot even register; one with it installs over TLS
            refused = await stranger.start(target, [{"node_id": "no-ca"}], NODE)
            started = await host.start(target, [{"node_id": "tls-node"}], NODE, tls_root_cert=ca)
            creds = grpc.ssl_channel_credentials(root_certificates=ca)
            async with grpc.aio.secure_channel(target, creds) as ch:
                s = rpc.FederationStub(ch)
                put = await s.PutUser(pb.PutUserRequest(user_id="alice", adapter=pb.Adapter(
                    data=blob, sha256=hashlib.sha256(blob).digest())), metadata=meta(ADMIN))
                await s.AssignUser(pb.AssignUserRequest(user_id="alice", node_id="tls-node"), metadata=meta(ADMIN))
                reply = await s.Score(pb.ScoreRequest(user_id="alice", text=TEXT), metadata=meta(put.token))
            wrong_ca = grpc.ssl_channel_credentials(root_certificates=(tmp_path / "other.pem").read_bytes())
            codes = []
            for ch in (grpc.aio.secure_channel(target, wrong_ca), grpc.aio.insecure_channel(target)):
                async with ch:
                    codes.append(await _code(rpc.FederationStub(ch).ListUsers(
                        pb.ListUsersRequest(), metadata=meta(ADMIN), timeout=3)))
            # the node's own server refuses plaintext, even with the node token
            async with grpc.aio.insecure_channel(started[0]["address"]) as ch:
                codes.append(await _code(rpc.NodeStub(ch).Status(pb.NodeStatusRequest(), metadata=meta(NODE),
                                                                 timeout=3)))
            return refused, started, reply, codes
        finally:
            await host.stop()
            await stranger.stop()
            await handle.stop()

    refused, started, reply, codes = asyncio.run(go())
    assert not refused[0]["ok"] and refused[0]["error"].startswith("UNAVAILABLE")
    assert started[0]["ok"] and started[0]["ready"]
    assert started[0]["install"]["bytes_fetched"] == (tmp_path / "base.ffb").stat().st_size
    assert (reply.node_id, reply.model) == ("tls-node", "adapter:alice")
    want = reference_logprobs(model, adapter, encode(tmp_path, TEXT))
    torch.testing.assert_close(torch.tensor(list(reply.logprobs), dtype=torch.float64), want, atol=1e-4, rtol=0)
    # a certificate from another CA, plaintext to the coordinator and plaintext to the node are refused
    assert codes == [C.UNAVAILABLE, C.UNAVAILABLE, C.UNAVAILABLE]


async def _code(awaitable) -> grpc.StatusCode:
    try:
        await awaitable
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK
