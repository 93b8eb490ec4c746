"""InstallBundles and LoadUser through real gRPC, from a fake coordinator that cuts and corrupts."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from node_support import (
    META,
    TINY,
    TOKEN,
    FakeCoordinator,
    Faults,
    bundle_bytes,
    log_softmax_next,
    random_adapter,
    serve_fake,
    tiny_model,
)

from model.codecs import CODECS
from model.fractal_moe import expert_of
from node.adapters import encode_adapter
from node.assembly import WeightStore
from node.counting import CountingChannel
from node.fetch import FetchPolicy
from node.runtime import ControlLink, VirtualNode
from node.server import start_node_server
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc

MODEL_A, MODEL_B = tiny_model(10), tiny_model(11)
IDS = torch.randint(0, TINY.vocab_size, (40,), generator=torch.Generator().manual_seed(9)).tolist()


def run_node(coord: FakeCoordinator, body):
    """``body(node, stub, coord)`` with a node whose control link reaches the fake coordinator."""

    async def main():
        fake, address = await serve_fake(coord)
        node = VirtualNode("node-1", store=WeightStore())
        async with grpc.aio.insecure_channel(address) as channel:
            node.control = ControlLink(stub=rpc.NodeControlStub(CountingChannel(channel, node.counter)),
                                       metadata=META, policy=FetchPolicy(backoff_s=0.0, allowed_codecs=CODECS))
            server = await start_node_server(node, TOKEN)
            try:
                async with grpc.aio.insecure_channel(server.address) as to_node:
                    return await body(node, rpc.NodeStub(to_node), coord)
            finally:
                await server.stop(None)
                await fake.stop(None)

    return asyncio.run(main())


async def score(stub) -> torch.Tensor:
    reply = await stub.ScoreTokens(pb.ScoreTokensRequest(token_ids=IDS), metadata=META)
    return torch.tensor(reply.logprobs, dtype=torch.float64)


def test_install_cut_half_way_resumes_and_serves_the_model():
    data = bundle_bytes(MODEL_A)
    half = len(data) // 4096 // 2
    coord = FakeCoordinator(bundles={"a": data}, faults={"a": Faults(cut_after_chunks=half, cuts=1)})

    async def body(node, stub, coord):
        reply = await stub.InstallBundles(pb.InstallBundlesRequest(bundles=[coord.ref("a")]), metadata=META)
        again = await stub.InstallBundles(pb.InstallBundlesRequest(bundles=[coord.ref("a")]), metadata=META)
        status = await stub.Status(pb.NodeStatusRequest(), metadata=META)
        return reply, again, status, await score(stub), node.summary()

    reply, again, status, got, summary = run_node(coord, body)
    assert list(reply.installed) == ["a"] and reply.bytes_fetched == len(data)
    assert [off for _, _, off in coord.fetches] == [0, half * 4096]
    assert again.bytes_fetched == 0 and len(coord.fetches) == 2  # already held: not fetched again
    assert status.state == pb.NODE_STATE_HEALTHY and list(status.bundles) == ["a"]
    assert status.expert_mask == b"\xff" * (TINY.n_layers * TINY.n_experts // 8)
    assert torch.allclose(got, log_softmax_next(MODEL_A, IDS), atol=1e-5)
    # the node counted exactly the chunk messages the coordinator sent
    assert summary["bytes"]["by_kind"]["bundle"]["received"] == coord.bundle_message_bytes["node-1"]
    assert summary["bytes"]["by_kind"]["bundle"]["payload"] == len(data)


def test_corrupt_bundle_leaves_the_previous_model_untouched_then_is_fetched_again():
    a, b = bundle_bytes(MODEL_A), bundle_bytes(MODEL_B)
    coord = FakeCoordinator(bundles={"a": a, "b": b}, faults={"b": Faults(corrupt_chunk=3, corruptions=99)})

    async def body(node, stub, coord):
        await stub.InstallBundles(pb.InstallBundlesRequest(bundles=[coord.ref("a")]), metadata=META)
        before = await score(stub)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.InstallBundles(pb.InstallBundlesRequest(bundles=[coord.ref("b")]), metadata=META)
        during = await score(stub)
        status = await stub.Status(pb.NodeStatusRequest(), metadata=META)
        coord.faults["b"].corruptions = 1  # the link heals: one more corruption, then clean bytes
        reply = await stub.InstallBundles(pb.InstallBundlesRequest(bundles=[coord.ref("b")]), metadata=META)
        return err.value.code(), before, during, list(status.bundles), reply, await score(stub), node.store.stats()

    code, before, during, bundles, reply, after, stats = run_node(coord, body)
    assert code == grpc.StatusCode.DATA_LOSS
    assert torch.equal(before, during) and bundles == ["a"]
    assert torch.allclose(before, log_softmax_next(MODEL_A, IDS), atol=1e-5)
    assert list(reply.installed) == ["b"] and len(b) < reply.bytes_fetched < 2 * len(b)
    assert torch.allclose(after, log_softmax_next(MODEL_B, IDS), atol=1e-5)
    assert stats["bundles"] == 1 and stats["models"] == 1  # model A's weights were freed


def test_partial_bundles_over_the_wire_with_a_preset_named_shape():
    core = bundle_bytes(MODEL_A, lambda n: (expert_of(n) or (0, 0))[1] < 4, expert_codec="int8",
                        model_config=False)
    rest = bundle_bytes(MODEL_A, lambda n: (expert_of(n) or (0, 0))[1] >= 4, expert_codec="int8",
                        model_config=False)
    coord = FakeCoordinator(bundles={"core": core, "rest": rest})

    async def body(node, stub, coord):
        await stub.InstallBundles(pb.InstallBundlesRequest(bundles=[coord.ref("core")]), metadata=META)
        partial = await stub.Status(pb.NodeStatusRequest(), metadata=META)
        with_core = await score(stub)
        await stub.InstallBundles(pb.InstallBundlesRequest(bundles=[coord.ref("rest")]), metadata=META)
        full = await stub.Status(pb.NodeStatusRequest(), metadata=META)
        return partial.expert_mask, with_core, full.expert_mask, list(full.bundles), await score(stub)

    partial_mask, with_core, full_mask, bundles, full = run_node(coord, body)
    assert partial_mask == b"\x0f\x00" * TINY.n_layers  # experts 0-3 of every block
    assert full_mask == b"\xff\xff" * TINY.n_layers and bundles == ["core", "rest"]
    # int8 experts: close to the fp32 model, not equal
    exact = log_softmax_next(MODEL_A, IDS)
    assert (full - exact).abs().max() < 0.05 and not torch.allclose(with_core, full, atol=1e-3)


def test_load_user_fetches_the_adapter_from_the_coordinator():
    ad = random_adapter(MODEL_A, 3)
    blob = encode_adapter(ad)
    coord = FakeCoordinator(bundles={"a": bundle_bytes(MODEL_A)}, adapters={"alice": blob})

    async def body(node, stub, coord):
        await stub.InstallBundles(pb.InstallBundlesRequest(bundles=[coord.ref("a")]), metadata=META)
        reply = await stub.LoadUser(pb.LoadUserRequest(adapter=pb.Adapter(user_id="alice")), metadata=META)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.LoadUser(pb.LoadUserRequest(adapter=pb.Adapter(user_id="bob")), metadata=META)
        scored = await stub.ScoreTokens(pb.ScoreTokensRequest(token_ids=IDS, user_id="alice"), metadata=META)
        return reply, err.value.code(), scored, node.summary()

    reply, code, scored, summary = run_node(coord, body)
    assert reply.user_id == "alice" and reply.bytes == len(blob) and code == grpc.StatusCode.NOT_FOUND
    assert torch.allclose(torch.tensor(scored.logprobs, dtype=torch.float64), log_softmax_next(MODEL_A, IDS, ad),
                          atol=1e-5)
    assert summary["users"] == ["alice"] and summary["bytes"]["by_kind"]["adapter"]["payload"] == len(blob)
