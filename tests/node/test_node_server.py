"""The Node gRPC service on a real grpc.aio server, checked against independent computations."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
import torch
from node_support import META, TINY, TOKEN, decoded, log_softmax_next, random_adapter, tiny_model

from model.evaluate import sample, token_logps
from node.adapters import encode_adapter
from node.assembly import WeightStore
from node.runtime import NodeLimits, VirtualNode
from node.server import start_node_server
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc

MODEL = tiny_model(0)


def run_with_node(body, *, install: bool = True, limits: NodeLimits | None = None):
    """Run ``body(node, stub)`` against a node serving MODEL on a loopback port (default limits unless given)."""
    limits = limits or NodeLimits()

    async def main():
        node = VirtualNode("node-1", store=WeightStore(), limits=limits)
        if install:
            await node.adopt([decoded("tiny", MODEL)])
        server = await start_node_server(node, TOKEN)
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                return await body(node, rpc.NodeStub(channel))
        finally:
            await server.stop(None)

    return asyncio.run(main())


def ids_of(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, TINY.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_score_tokens_matches_log_softmax_and_routes():
    ids = ids_of(40)

    async def body(node, stub):
        return await stub.ScoreTokens(pb.ScoreTokensRequest(token_ids=ids, return_routes=True), metadata=META)

    reply = run_with_node(body)
    expected = log_softmax_next(MODEL, ids)
    assert len(reply.logprobs) == len(ids) - 1
    assert torch.allclose(torch.tensor(reply.logprobs, dtype=torch.float64), expected, atol=1e-5)
    with torch.no_grad():
        MODEL(torch.tensor([ids]))
    routes = torch.tensor(list(reply.routes)).view(TINY.n_layers, len(ids))
    assert torch.equal(routes, MODEL.routes()[:, 0])
    assert len(set(routes.flatten().tolist())) > 3  # tokens really spread over experts
    assert reply.model == "base" and reply.node_id == "node-1"


def test_score_tokens_longer_than_context_uses_windows_like_token_logps():
    ids = ids_of(3 * TINY.context + 5, seed=1)

    async def body(node, stub):
        return await stub.ScoreTokens(pb.ScoreTokensRequest(token_ids=ids), metadata=META)

    reply = run_with_node(body)
    expected = token_logps(MODEL, torch.tensor(ids))
    assert torch.allclose(torch.tensor(reply.logprobs, dtype=torch.float64), expected, atol=1e-5)


def test_next_token_full_and_top_k_with_remaining_mass():
    ids = ids_of(20, seed=2)
    with torch.no_grad():
        ref = torch.log_softmax(MODEL(torch.tensor([ids])).logits[0, -1].double(), -1)

    async def body(node, stub):
        full = await stub.NextTokenDistribution(pb.NextTokenRequest(token_ids=ids), metadata=META)
        top = await stub.NextTokenDistribution(pb.NextTokenRequest(token_ids=ids, top_k=7), metadata=META)
        every = await stub.NextTokenDistribution(pb.NextTokenRequest(token_ids=ids, top_k=TINY.vocab_size),
                                                 metadata=META)
        return full, top, every

    full, top, every = run_with_node(body)
    assert full.vocab_size == TINY.vocab_size and not full.top_ids
    assert torch.allclose(torch.tensor(full.logprobs, dtype=torch.float64), ref, atol=1e-5)
    assert list(top.top_ids) == torch.topk(ref, 7).indices.tolist()
    masses = torch.tensor(list(top.top_logprobs) + [top.rest_logmass], dtype=torch.float64)
    assert math.isclose(float(torch.logsumexp(masses, 0)), 0.0, abs_tol=1e-5)
    assert top.rest_logmass > -50  # the rest really holds mass (vocab of 384, top 7)
    assert every.rest_logmass == -math.inf and len(every.top_ids) == TINY.vocab_size


def test_generate_greedy_matches_model_sample_and_seeded_sampling_repeats():
    prompt = ids_of(10, seed=3)
    expected = sample(MODEL, torch.tensor(prompt), 12, greedy=True).tolist()

    async def collect(stub, **kw):
        req = pb.NodeGenerateRequest(token_ids=prompt, **kw)
        return [t async for t in stub.Generate(req, metadata=META)]

    async def body(node, stub):
        greedy = await collect(stub, max_new_tokens=12)
        a = await collect(stub, max_new_tokens=12, temperature=1.0, seed=7)
        b = await collect(stub, max_new_tokens=12, temperature=1.0, seed=7)
        c = await collect(stub, max_new_tokens=12, temperature=1.0, seed=8)
        stop = await collect(stub, max_new_tokens=12, stop_ids=[expected[3]])
        return greedy, a, b, c, stop

    greedy, a, b, c, stop = run_with_node(body)
    assert [t.token_id for t in greedy] == expected
    assert greedy[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert all(t.finish_reason == pb.FINISH_REASON_UNSPECIFIED for t in greedy[:-1])
    # each token's log-prob is the untempered model's
    seq = prompt + expected
    ref = log_softmax_next(MODEL, seq)[len(prompt) - 1:]
    assert torch.allclose(torch.tensor([t.logprob for t in greedy], dtype=torch.float64), ref, atol=1e-5)
    assert [t.token_id for t in a] == [t.token_id for t in b] != [t.token_id for t in c]
    first_stop = expected.index(expected[3])
    assert len(stop) == first_stop + 1 and stop[-1].finish_reason == pb.FINISH_REASON_STOP


def test_adapters_are_isolated_between_users_even_concurrently():
    ad_a, ad_b = random_adapter(MODEL, 1), random_adapter(MODEL, 2)
    ids = ids_of(30, seed=4)
    expect = {"": log_softmax_next(MODEL, ids), "alice": log_softmax_next(MODEL, ids, ad_a),
              "bob": log_softmax_next(MODEL, ids, ad_b)}
    assert (expect["alice"] - expect[""]).abs().max() > 0.05  # the adapters really change the answer

    async def body(node, stub):
        for uid, ad in (("alice", ad_a), ("bob", ad_b)):
            blob = encode_adapter(ad)
            r = await stub.LoadUser(pb.LoadUserRequest(adapter=pb.Adapter(user_id=uid, format="safetensors",
                                                                          data=blob)), metadata=META)
            assert r.user_id == uid and r.bytes == len(blob)
        users = ["", "alice", "bob"] * 8
        replies = await asyncio.gather(*(
            stub.ScoreTokens(pb.ScoreTokensRequest(token_ids=ids, user_id=u), metadata=META) for u in users))
        unloaded = await stub.UnloadUser(pb.UnloadUserRequest(user_id="alice"), metadata=META)
        again = await stub.UnloadUser(pb.UnloadUserRequest(user_id="alice"), metadata=META)
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stub.ScoreTokens(pb.ScoreTokensRequest(token_ids=ids, user_id="alice"), metadata=META)
        return users, replies, unloaded.unloaded, again.unloaded, gone.value.code()

    users, replies, unloaded, again, gone = run_with_node(body)
    for u, r in zip(users, replies):
        assert torch.allclose(torch.tensor(r.logprobs, dtype=torch.float64), expect[u], atol=1e-5), u
        assert r.model == ("base" if not u else f"adapter:{u}")  # proto.model_labels: the coordinator's form
    assert unloaded and not again and gone == grpc.StatusCode.NOT_FOUND


BAD_REQUESTS = [
    ("ScoreTokens", pb.ScoreTokensRequest(token_ids=[]), grpc.StatusCode.INVALID_ARGUMENT),
    ("ScoreTokens", pb.ScoreTokensRequest(token_ids=[5]), grpc.StatusCode.INVALID_ARGUMENT),
    ("ScoreTokens", pb.ScoreTokensRequest(token_ids=[1, TINY.vocab_size]), grpc.StatusCode.INVALID_ARGUMENT),
    ("ScoreTokens", pb.ScoreTokensRequest(token_ids=[1, 2**32 - 1]), grpc.StatusCode.INVALID_ARGUMENT),
    ("ScoreTokens", pb.ScoreTokensRequest(token_ids=[1] * 301), grpc.StatusCode.INVALID_ARGUMENT),
    ("ScoreTokens", pb.ScoreTokensRequest(token_ids=[1, 2], user_id="nobody"), grpc.StatusCode.NOT_FOUND),
    ("ScoreTokens", pb.ScoreTokensRequest(token_ids=[1, 2], user_id="../etc"), grpc.StatusCode.INVALID_ARGUMENT),
    ("NextTokenDistribution", pb.NextTokenRequest(token_ids=[]), grpc.StatusCode.INVALID_ARGUMENT),
    ("NextTokenDistribution", pb.NextTokenRequest(token_ids=[1], top_k=TINY.vocab_size + 1),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("LoadUser", pb.LoadUserRequest(adapter=pb.Adapter(user_id="u", data=b"not safetensors")),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("LoadUser", pb.LoadUserRequest(adapter=pb.Adapter(user_id="u", format="pickle", data=b"x")),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("LoadUser", pb.LoadUserRequest(adapter=pb.Adapter(user_id="u", data=encode_adapter(
        {"ln_f.weight": torch.ones(TINY.d_model + 1)}))), grpc.StatusCode.INVALID_ARGUMENT),
    ("LoadUser", pb.LoadUserRequest(adapter=pb.Adapter(user_id="u", data=encode_adapter(
        {"ln_f.weight": torch.full((TINY.d_model,), float("nan"))}))), grpc.StatusCode.INVALID_ARGUMENT),
    ("LoadUser", pb.LoadUserRequest(adapter=pb.Adapter(user_id="u", data=encode_adapter(
        {"ln_f.weight": torch.ones(TINY.d_model)}), sha256=b"\0" * 32)), grpc.StatusCode.INVALID_ARGUMENT),
    ("LoadUser", pb.LoadUserRequest(adapter=pb.Adapter(user_id="u")), grpc.StatusCode.FAILED_PRECONDITION),
    ("UnloadUser", pb.UnloadUserRequest(user_id=""), grpc.StatusCode.INVALID_ARGUMENT),
    ("InstallBundles", pb.InstallBundlesRequest(), grpc.StatusCode.INVALID_ARGUMENT),
    ("InstallBundles", pb.InstallBundlesRequest(bundles=[pb.BundleRef(name="../x")]),
     grpc.StatusCode.INVALID_ARGUMENT),
]


def test_bad_requests_get_precise_codes_and_the_node_keeps_serving():
    ids = ids_of(8, seed=5)

    async def body(node, stub):
        codes = []
        for method, req, _ in BAD_REQUESTS:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await getattr(stub, method)(req, metadata=META)
            codes.append(err.value.code())
        gen_codes = []
        for kw in ({"max_new_tokens": 0}, {"max_new_tokens": 3, "temperature": float("nan")},
                   {"max_new_tokens": 3, "temperature": 11.0}, {"max_new_tokens": 3, "stop_ids": [10**6]}):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [t async for t in stub.Generate(pb.NodeGenerateRequest(token_ids=ids, **kw), metadata=META)]
            gen_codes.append(err.value.code())
        auth = []
        for md in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ScoreTokens(pb.ScoreTokensRequest(token_ids=ids), metadata=md)
            auth.append(err.value.code())
        ok = await stub.ScoreTokens(pb.ScoreTokensRequest(token_ids=ids), metadata=META)
        return codes, gen_codes, auth, ok, node.inflight

    codes, gen_codes, auth, ok, inflight = run_with_node(body, limits=NodeLimits(max_score_tokens=300))
    assert codes == [c for _, _, c in BAD_REQUESTS]
    assert gen_codes == [grpc.StatusCode.INVALID_ARGUMENT] * 4
    assert auth == [grpc.StatusCode.UNAUTHENTICATED] * 3
    assert len(ok.logprobs) == len(ids) - 1 and inflight == 0


def test_no_model_is_failed_precondition_and_status_still_answers():
    async def body(node, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ScoreTokens(pb.ScoreTokensRequest(token_ids=[1, 2]), metadata=META)
        status = await stub.Status(pb.NodeStatusRequest(), metadata=META)
        return err.value.code(), status

    code, status = run_with_node(body, install=False)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert status.state == pb.NODE_STATE_REGISTERED and not status.bundles and status.n_blocks == 0


def test_status_counts_every_byte_received_and_sent():
    ids = ids_of(25, seed=6)

    async def body(node, stub):
        received = sent = 0
        for req in (pb.ScoreTokensRequest(token_ids=ids, return_routes=True), pb.ScoreTokensRequest(token_ids=ids)):
            reply = await stub.ScoreTokens(req, metadata=META)
            received, sent = received + req.ByteSize(), sent + reply.ByteSize()
        req = pb.NextTokenRequest(token_ids=ids, top_k=5)
        reply = await stub.NextTokenDistribution(req, metadata=META)
        received, sent = received + req.ByteSize(), sent + reply.ByteSize()
        req = pb.NodeGenerateRequest(token_ids=ids, max_new_tokens=4)
        tokens = [t async for t in stub.Generate(req, metadata=META)]
        received, sent = received + req.ByteSize(), sent + sum(t.ByteSize() for t in tokens)
        bad = pb.ScoreTokensRequest(token_ids=[1])
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ScoreTokens(bad, metadata=META)
        received += bad.ByteSize()
        status = await stub.Status(pb.NodeStatusRequest(), metadata=META)
        return status, received, sent, node.summary()

    status, received, sent, summary = run_with_node(body)
    # the Status request is counted before it is answered; its own reply after
    assert status.bytes_received == received + pb.NodeStatusRequest().ByteSize()
    assert status.bytes_sent == sent
    kinds = summary["bytes"]["by_kind"]
    assert kinds["score"]["messages"] == 2 + 2 + 1 and kinds["generate"]["messages"] == 2 + 1 + 4
    # routing histogram: one count per block per prediction served (24 + 24 + 1 + 4)
    assert status.routing.tokens == 24 + 24 + 1 + 4
    counts = torch.tensor(list(status.routing.counts)).view(TINY.n_layers, TINY.n_experts)
    assert counts.sum(1).tolist() == [status.routing.tokens] * TINY.n_layers
