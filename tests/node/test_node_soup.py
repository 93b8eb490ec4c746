"""A node that holds a Soup-of-Experts bank: shipped as a bundle over gRPC, instantiated on the node.

The bank travels like any bundle (NodeControl.FetchBundle from a fake coordinator); the node
rebuilds it, serves h = uniform at first, and ``InstantiateSoup`` switches it to the specialist of
given or estimated domain weights. References are computed in-process from the same bank after
the same codec round trip, through an ordinary FractalMoE.
"""

from __future__ import annotations

import dataclasses

import grpc
import pytest
import torch
from node_support import META, TINY, FakeCoordinator, bundle_bytes, log_softmax_next, tiny_model
from test_node_install import IDS, run_node, score

from model.codecs import decode_state_dict
from model.fractal_moe import build_model
from model.soup_of_experts import (
    SoupConfig,
    SoupOfExperts,
    estimate_domain_weights,
    soup_from_wire,
    unigram_log_tables,
    wire_meta,
    wire_records,
)
from proto import federation_pb2 as pb
from proto.bundle import encode_bundle

DOMAINS = ("red", "green", "blue")
STREAMS = [torch.randint(lo, lo + 100, (400,), generator=torch.Generator().manual_seed(i))
           for i, lo in enumerate((0, 120, 240))]  # three domains over disjoint token ranges


def trained_like_bank(rank: int = 0) -> SoupOfExperts:
    """A bank whose entries and MLP are far from zero, so that every h gives another model."""
    soup = SoupOfExperts(TINY, SoupConfig(bank_size=3, rank=rank, steps=1, seq_len=16, lr=1e-3), DOMAINS,
                         shared=tiny_model(3).state_dict(), seed=4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in soup.named_parameters():
            if not name.startswith("shared."):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return soup.eval()


def bank_bytes(soup: SoupOfExperts, codec: str = "int8", tables: bool = True) -> bytes:
    recs = wire_records(soup, unigram_log_tables(STREAMS, TINY.vocab_size) if tables else None, expert_codec=codec)
    return encode_bundle(recs, {**wire_meta(soup), "model": "soup", "model_config": dataclasses.asdict(TINY)})


def reference(data: bytes, h: torch.Tensor):
    """The model the node should serve for h: the bank as shipped (codec round trip), instantiated."""
    from proto.bundle import read_bundle_verified

    b = read_bundle_verified([data])
    soup, _ = soup_from_wire(TINY, b.meta, decode_state_dict(b.records))
    m = build_model(TINY, 0)
    m.load_state_dict(soup.instantiate(h))
    return m.eval(), soup


@pytest.mark.parametrize("rank", [0, 2])
def test_a_bank_shipped_over_grpc_serves_uniform_then_the_instantiated_specialist(rank):
    data = bank_bytes(trained_like_bank(rank))
    coord = FakeCoordinator(bundles={"bank": data})
    h = torch.tensor([0.7, 0.0, 0.3])

    async def body(node, stub, coord):
        await stub.InstallBundles(pb.InstallBundlesRequest(bundles=[coord.ref("bank")]), metadata=META)
        first = await score(stub), (await stub.ScoreTokens(pb.ScoreTokensRequest(token_ids=IDS), metadata=META)).model
        status = await stub.Status(pb.NodeStatusRequest(), metadata=META)
        reply = await stub.InstantiateSoup(pb.InstantiateSoupRequest(domain_weights=h.tolist()), metadata=META)
        return first, status, reply, await score(stub), node.summary()

    (uniform_lp, label), status, reply, special_lp, summary = run_node(coord, body)
    uniform_model, soup = reference(data, torch.full((3,), 1 / 3))
    special_model, _ = reference(data, h)
    assert torch.allclose(uniform_lp, log_softmax_next(uniform_model, IDS), atol=1e-5)
    assert torch.allclose(special_lp, log_softmax_next(special_model, IDS), atol=1e-5)
    assert not torch.allclose(uniform_lp, special_lp, atol=1e-3)  # h changed the served model
    assert label == "soup:h=0.333,0.333,0.333"
    assert list(status.bundles) == ["bank"] and status.state == pb.NODE_STATE_HEALTHY
    assert list(reply.domains) == list(DOMAINS) and reply.bank == "bank" and reply.model == "soup:h=0.700,0.000,0.300"
    assert torch.allclose(torch.tensor(list(reply.alpha)), soup.alpha(h), atol=1e-6)
    assert summary["soup"]["domain_weights"] == pytest.approx(h.tolist())


def test_the_node_estimates_h_from_a_sample_of_token_ids():
    data = bank_bytes(trained_like_bank())
    coord = FakeCoordinator(bundles={"bank": data})
    sample = torch.cat([STREAMS[1][:150], STREAMS[2][:50]])  # 3:1 green:blue

    async def body(node, stub, coord):
        await stub.InstallBundles(pb.InstallBundlesRequest(bundles=[coord.ref("bank")]), metadata=META)
        reply = await stub.InstantiateSoup(pb.InstantiateSoupRequest(sample_token_ids=sample.tolist()), metadata=META)
        return reply, await score(stub)

    reply, got = run_node(coord, body)
    h = torch.tensor(list(reply.domain_weights))
    assert h[0] < 0.02 and 0.6 < h[1] < 0.9 and 0.1 < h[2] < 0.4  # no red in the sample; 3:1 green:blue
    expected = estimate_domain_weights(sample, unigram_log_tables(STREAMS, TINY.vocab_size))
    assert torch.allclose(h, expected, atol=2e-3)  # the shipped tables are fp16
    assert torch.allclose(got, log_softmax_next(reference(data, h)[0], IDS), atol=1e-5)


def test_bad_soup_requests_get_precise_codes_and_leave_the_served_model_alone():
    data = bank_bytes(trained_like_bank(), tables=False)
    coord = FakeCoordinator(bundles={"bank": data, "plain": bundle_bytes(tiny_model(1))})

    async def body(node, stub, coord):
        async def code(req):
            try:
                await stub.InstantiateSoup(req, metadata=META)
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details()
            return grpc.StatusCode.OK, ""
        await stub.InstallBundles(pb.InstallBundlesRequest(bundles=[coord.ref("plain")]), metadata=META)
        no_bank = await code(pb.InstantiateSoupRequest(domain_weights=[1, 0, 0]))
        await stub.InstallBundles(pb.InstallBundlesRequest(bundles=[coord.ref("bank")]), metadata=META)
        before = await score(stub)
        bad = [await code(r) for r in (
            pb.InstantiateSoupRequest(),
            pb.InstantiateSoupRequest(domain_weights=[0.5, 0.5]),
            pb.InstantiateSoupRequest(domain_weights=[0.5, 0.6, -0.1]),
            pb.InstantiateSoupRequest(domain_weights=[0.5, 0.2, 0.2]),
            pb.InstantiateSoupRequest(domain_weights=[float("nan"), 0.5, 0.5]),
            pb.InstantiateSoupRequest(domain_weights=[1, 0, 0], sample_token_ids=[1, 2]),
            pb.InstantiateSoupRequest(sample_token_ids=[1, 2]),  # this bank ships no unigram tables
            pb.InstantiateSoupRequest(sample_token_ids=[TINY.vocab_size]),
        )]
        return no_bank, bad, before, await score(stub)

    no_bank, bad, before, after = run_node(coord, body)
    assert no_bank[0] == grpc.StatusCode.FAILED_PRECONDITION and "no Soup-of-Experts bank" in no_bank[1]
    assert [c for c, _ in bad] == [grpc.StatusCode.INVALID_ARGUMENT] * len(bad), bad
    assert "3 domains" in bad[1][1] and "unigram" in bad[6][1]
    assert torch.equal(before, after)


def test_a_bank_with_a_missing_tensor_is_refused_with_data_loss():
    soup = trained_like_bank()
    recs = [r for r in wire_records(soup, expert_codec="fp16") if not r.name.startswith("mlp:")]
    data = encode_bundle(recs, {**wire_meta(soup), "model": "soup", "model_config": dataclasses.asdict(TINY)})
    coord = FakeCoordinator(bundles={"bank": data})

    async def body(node, stub, coord):
        try:
            await stub.InstallBundles(pb.InstallBundlesRequest(bundles=[coord.ref("bank")]), metadata=META)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details(), node.bank, node.served
        return grpc.StatusCode.OK, "", node.bank, node.served

    code, details, bank, served = run_node(coord, body)
    assert code == grpc.StatusCode.DATA_LOSS and "mlp:" in details
    assert bank is None and served is None
