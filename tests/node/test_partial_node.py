"""Partial nodes against the real coordinator: expert byte ranges, the live planner, the miss policies.

Bytes are checked against the bundle's own manifest (read here with proto.bundle, not the code under
test), log-probs against a FractalMoE built here from the bundle's decoded tensors.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import pytest
import torch
from node_support import TINY, TOKEN, bundle_bytes, random_adapter, tiny_model

from coordinator.config import CoordinatorConfig
from coordinator.prefetch_live import LivePlanner, NodeBudget, PlanError
from coordinator.server import serve
from model.codecs import decode_tensor
from model.fractal_moe import FractalMoE, expert_of
from node.actor import NodeHost, SpecError
from node.adapters import encode_adapter
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.auth_metadata import bearer_metadata
from proto.bundle import read_bundle_verified, read_manifest

MODEL = tiny_model(7)
BUNDLE = bundle_bytes(MODEL, expert_codec="int8", other_codec="fp16")
MANIFEST = read_manifest(BUNDLE)
IDS = torch.randint(0, TINY.vocab_size, (TINY.context + 1,), generator=torch.Generator().manual_seed(3)).tolist()
ADAPTER = random_adapter(MODEL, 5)
META = bearer_metadata(TOKEN)


def decoded_model() -> FractalMoE:
    """The model the bundle decodes to, built independently of node.assembly."""
    sd = {r.name: decode_tensor(r) for r in read_bundle_verified([BUNDLE]).records}
    m = FractalMoE(TINY)
    m.load_state_dict(sd)
    return m.eval()


REF = decoded_model()


def expert_bytes(b: int, e: int) -> int:
    return sum(x.length for x in MANIFEST.entries if expert_of(x.name) == (b, e))


def reference_logps(available: torch.Tensor | None, adapter=None) -> torch.Tensor:
    x = torch.tensor(IDS[:-1])[None]
    with torch.no_grad(), REF.serving(available=available):
        logits = (torch.func.functional_call(REF, adapter, (x,), strict=False) if adapter else REF(x)).logits[0]
    return torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(IDS[1:])[:, None])[:, 0]


async def _score(address: str, user: str = "") -> torch.Tensor:
    async with grpc.aio.insecure_channel(address) as ch:
        reply = await rpc.NodeStub(ch).ScoreTokens(pb.ScoreTokensRequest(token_ids=IDS, user_id=user), metadata=META)
    return torch.tensor(reply.logprobs, dtype=torch.float64)


def _spec(node_id: str, policy: str, k: int) -> dict:
    return {"node_id": node_id, "codec": "int8",
            "prefetch": {"source": "base", "budget_experts": k, "policy": policy}}


def test_partial_nodes_install_expert_ranges_and_serve_every_miss_policy(tmp_path: Path):
    async def main():
        cfg = CoordinatorConfig(db_path=tmp_path / "c.db", bundle_dir=tmp_path / "store",
                                admin_token="admin-token-for-tests", node_token=TOKEN, heartbeat_interval_ms=60_000)
        handle = await serve(cfg)
        handle.store.put_bytes("base", BUNDLE, model="base", codec="int8")
        budgets = {n: NodeBudget(source="base", budget_experts=4, predictor="user") for n in ("ps", "pr", "pa")}
        budgets["pw"] = NodeBudget(source="base", budget_experts=4, predictor="lfu")  # learns from its own routes
        planner = LivePlanner(handle.core.registry, handle.store, budgets)
        handle.core.prefetch_planner, handle.core.expert_peer = planner, planner.expert_peer
        host = NodeHost(torch_threads=None, heartbeats=False)
        try:
            full = (await host.start(handle.address, [{"node_id": "full", "codec": "int8", "bundles": ["base"]}],
                                     TOKEN))[0]
            infos = await host.start(handle.address, [_spec("ps", "substitute", 4), _spec("pw", "wait", 4),
                                                      _spec("pr", "remote", 4), _spec("pa", "auto", 4)], TOKEN)
            by_id = {i["node_id"]: i for i in infos}
            assert all(i["ok"] and i["ready"] for i in infos), infos
            L, E = TINY.n_layers, TINY.n_experts
            # no routing seen yet: the plan is experts 0..3 of every block, the non-expert tensors with them
            first = torch.zeros(L, E, dtype=torch.bool)
            first[:, :4] = True
            core = sum(x.length for x in MANIFEST.entries if expert_of(x.name) is None)
            head = MANIFEST.payload_start
            want = head + core + sum(expert_bytes(b, e) for b in range(L) for e in range(4))
            for nid in ("ps", "pw", "pr", "pa"):
                pf = host.nodes[nid].node.partial
                assert torch.equal(host.nodes[nid].node.mask, first)
                assert pf.bytes_planned == want == by_id[nid]["bytes"]["by_kind"]["bundle"]["payload"]
            assert full["bytes"]["by_kind"]["bundle"]["payload"] == len(BUNDLE)

            # substitute: the router's best installed expert, as FractalMoE.serving(available=...) computes
            got = await _score(by_id["ps"]["address"])
            assert torch.allclose(got, reference_logps(first), atol=1e-5)
            # wait: every missing expert fetched on demand, so the full model's log-probs; the budget holds
            got = await _score(by_id["pw"]["address"])
            assert torch.allclose(got, reference_logps(None), atol=1e-5)
            pw = host.nodes["pw"].node.partial
            rec = pw.requests[-1]
            fetched = {(b, e) for b, e, _ in rec.fetched}
            assert pw.bytes_on_demand == sum(expert_bytes(b, e) for b, e in fetched) > 0
            assert all(int(host.nodes["pw"].node.mask[b].sum()) <= 4 for b in range(L))
            routes = REF.routes()[:, 0, :]  # (L, T) of the full model's last pass: the request's routing
            missed = {(b, int(e)) for b in range(L) for e in routes[b].unique() if not first[b, e]}
            assert fetched == missed
            assert rec.hits == int(first.gather(1, routes).sum()) and rec.uses == routes.numel()
            # the planner learns the node's routing: the next plan holds the experts the request used most
            await host.heartbeat_now("pw")
            counts = torch.stack([torch.bincount(routes[b], minlength=E) for b in range(L)])  # (L, E)
            mask = host.nodes["pw"].node.mask
            for b in range(L):
                top = counts[b].sort(descending=True, stable=True).indices[:4]
                assert bool(mask[b, top].all()) and int(mask[b].sum()) == 4, (b, counts[b], mask[b])
            assert planner.log[-1]["node"] == "pw"
            # remote: the peer (the full node) runs the missing experts on the hidden states sent
            await host.heartbeat_now("pr")  # learns the expert peer
            assert host.nodes["pr"].node.partial.peer == full["address"]
            held = host.nodes["pr"].node.mask.clone()  # the plan moved on: it learnt pw's routing (user -> global)
            got = await _score(by_id["pr"]["address"])
            assert torch.allclose(got, reference_logps(None), atol=1e-5)
            pr = host.nodes["pr"].node.partial.requests[-1]
            C = TINY.d_model
            missed = {(b, int(e)) for b in range(L) for e in routes[b].unique() if not held[b, e]}
            rows = sum(int((routes[b] == e).sum()) for b, e in missed)
            assert {(b, e) for b, e, _, _ in pr.remote} == missed
            assert sum(up for *_, up, _ in pr.remote) == sum(d for *_, d in pr.remote) == rows * C * 4
            act = host.nodes["pr"].node.counter.as_dict()["by_kind"]["activation"]
            assert act["payload"] == 2 * rows * C * 4 and act["sent"] > rows * C * 4
            assert torch.equal(host.nodes["pr"].node.mask, held)  # remote installs nothing
            # an adapter on a partial node: the staged pass uses the user's norms
            blob = encode_adapter(ADAPTER)
            async with grpc.aio.insecure_channel(by_id["pw"]["address"]) as ch:
                await rpc.NodeStub(ch).LoadUser(pb.LoadUserRequest(adapter=pb.Adapter(user_id="u1", data=blob)),
                                                metadata=META)
            g0 = await _score(by_id["pw"]["address"])  # again, from what the plan left: the same log-probs
            assert torch.allclose(g0, reference_logps(None), atol=1e-5)
            got = await _score(by_id["pw"]["address"], "u1")
            assert torch.allclose(got, reference_logps(None, ADAPTER), atol=1e-5)
            # a bad range is refused with a status, a full node refuses ranges
            async with grpc.aio.insecure_channel(by_id["ps"]["address"]) as ch:
                bad = pb.InstallBundlesRequest(ranges=[pb.ByteRange(bundle="base", offset=head + 1, length=10)])
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await rpc.NodeStub(ch).InstallBundles(bad, metadata=META)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            async with grpc.aio.insecure_channel(full["address"]) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await rpc.NodeStub(ch).InstallBundles(bad, metadata=META)
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
                miss = pb.RunExpertRequest(block=0, expert=0, rows=2, hidden=b"\0" * 12)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await rpc.NodeStub(ch).RunExpert(miss, metadata=META)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await host.stop()
            await handle.stop()

    asyncio.run(main())


def test_bad_budgets_are_refused():
    with pytest.raises(SpecError, match="budget"):
        NodeHost.__init__  # noqa: B018 (the spec check is static)
        from node.actor import NodeSpec
        NodeSpec.from_dict(_spec("x", "wait", 0))
    with pytest.raises(SpecError, match="policy"):
        from node.actor import NodeSpec
        NodeSpec.from_dict(_spec("x", "teleport", 2))
    with pytest.raises(PlanError, match="predictor"):
        NodeBudget(source="base", budget_experts=2, predictor="oracle")
    with pytest.raises(PlanError, match="exactly one"):
        NodeBudget(source="base", budget_experts=2, budget_bytes=10)
    assert dataclasses.is_dataclass(NodeBudget)


def test_a_router_prior_is_kept_only_with_a_beta_and_checked_against_the_model():
    from node.errors import InvalidRequest
    from node.partial import PartialExperts, PrefetchSettings

    class Host:  # what on_heartbeat reads of a node: a model installed, its shape
        node_id, served = "n", object()

        def shape(self) -> tuple[int, int]:
            return 2, 4

    usage = [0.1, 0.2, 0.3, 0.4, 0.25, 0.25, 0.25, 0.25]
    reply = pb.HeartbeatReply(known=True, router_prior=pb.RouterPrior(n_blocks=2, n_experts=4, usage=usage))
    off = PartialExperts(Host(), PrefetchSettings(source="b", budget_experts=2))  # type: ignore[arg-type]
    asyncio.run(off.on_heartbeat(reply))
    assert off.prior_usage is None  # beta 0: no prior, whatever the coordinator sends
    on = PartialExperts(Host(), PrefetchSettings(source="b", budget_experts=2, prior_beta=0.3))  # type: ignore[arg-type]
    asyncio.run(on.on_heartbeat(reply))
    assert on.prior_usage is not None and torch.allclose(on.prior_usage, torch.tensor(usage).view(2, 4))
    for bad in (pb.RouterPrior(n_blocks=4, n_experts=2, usage=usage), pb.RouterPrior(n_blocks=2, n_experts=4),
                pb.RouterPrior(n_blocks=2, n_experts=4, usage=[-1.0] + usage[1:]),
                pb.RouterPrior(n_blocks=2, n_experts=4, usage=[float("nan")] + usage[1:])):
        with pytest.raises(InvalidRequest):
            asyncio.run(on.on_heartbeat(pb.HeartbeatReply(known=True, router_prior=bad)))
    assert torch.allclose(on.prior_usage, torch.tensor(usage).view(2, 4))  # a refused prior changes nothing
    with pytest.raises(ValueError, match="prior_beta"):
        PrefetchSettings.from_dict({"source": "b", "budget_experts": 2, "prior_beta": -1})
    with pytest.raises(PlanError, match="router prior"):
        NodeBudget(source="base", budget_experts=2, predictor="lru", prior=True)
