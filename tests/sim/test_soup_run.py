"""Soup-of-Experts nodes in a federation run (issue 9, item 4), end to end on Ray and gRPC.

A tiny federation with one soup node: the bank travels as a bundle, the node estimates its users'
domain weights from their text and instantiates their specialist; the checks recompute h, the
served log-probs and the bytes figures independently, in this process, from the same bank.
"""

from __future__ import annotations

import asyncio
import json
import math

import grpc
import pytest
import torch

from model.evaluate import token_logps
from model.fractal_moe import build_model
from model.soup_of_experts import estimate_domain_weights, one_hot, unigram_log_tables
from model.tokenizer import encode
from proto import federation_pb2 as pb
from sim import soup as sim_soup
from sim.run import run_federation
from sim.scenario import from_dict

pytestmark = pytest.mark.slow


def soup_scenario():
    return from_dict({
        "name": "soup-test", "federation": {"nodes": 4, "preset": "tiny"},
        # fp32 on the wire: the node's bank equals the trained one, so its models equal ours exactly
        "model": {"expert_codec": "fp32", "other_codec": "fp32", "specialists": ["programmer"]},
        "workload": {"generate_requests_per_user": 0, "score_chars": 400, "mixture_requests": 0},
        "soup": {"nodes": 1, "sample_chars": 600},
    })


async def _code(call) -> str:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "OK"


@pytest.fixture(scope="module")
def soup_run(tiny_suite, tmp_path_factory):
    out = tmp_path_factory.mktemp("souprun")
    scn = soup_scenario()
    captured = {}

    async def extra(fed, report):
        node = next(p for p in fed.plans if p.model == "soup")
        base_node = next(p for p in fed.plans if p.model == "base")
        text = tiny_suite.text(node.group[0], "eval")[:300]
        spec = pb.MixtureSpec(components=[pb.MixtureComponent(specialist="soup", node_id=node.node_id)])
        captured["estimated"] = await fed.stub.Score(pb.ScoreRequest(text=text, mixture=spec), metadata=fed.admin)
        h = one_hot(tiny_suite.personas, "novelist").tolist()
        captured["explicit"] = await fed.stub.InstantiateSoup(pb.SoupRequest(node_id=node.node_id, domain_weights=h),
                                                              metadata=fed.admin)
        captured["after"] = await fed.stub.Score(pb.ScoreRequest(text=text, mixture=spec), metadata=fed.admin)
        user = tiny_suite.known_users[0]
        captured["codes"] = {
            "wrong-count": await _code(fed.stub.InstantiateSoup(
                pb.SoupRequest(node_id=node.node_id, domain_weights=[0.5, 0.5]), metadata=fed.admin)),
            "not-a-simplex": await _code(fed.stub.InstantiateSoup(
                pb.SoupRequest(node_id=node.node_id, domain_weights=[0.5] * len(h)), metadata=fed.admin)),
            "both": await _code(fed.stub.InstantiateSoup(
                pb.SoupRequest(node_id=node.node_id, domain_weights=h, sample_text="x"), metadata=fed.admin)),
            "base-node": await _code(fed.stub.InstantiateSoup(
                pb.SoupRequest(node_id=base_node.node_id, domain_weights=h), metadata=fed.admin)),
            "ghost": await _code(fed.stub.InstantiateSoup(
                pb.SoupRequest(node_id="ghost", domain_weights=h), metadata=fed.admin)),
            "user-token": await _code(fed.stub.InstantiateSoup(
                pb.SoupRequest(node_id=node.node_id, domain_weights=h), metadata=fed.token(user))),
        }
        # the bad requests changed nothing: the node still serves the explicit specialist
        captured["still"] = await fed.stub.Score(pb.ScoreRequest(text=text, mixture=spec), metadata=fed.admin)
        captured["text"], captured["node"] = text, node

    # twice into the same folder, as `make run` does: the second report must count only its own bytes
    asyncio.run(run_federation(scn, out, suite=tiny_suite, progress=False))
    report = asyncio.run(run_federation(scn, out, suite=tiny_suite, progress=False, extra=extra))
    return report, captured, out, scn


def _served(tiny_suite, scn, h, text) -> torch.Tensor:
    m = build_model(tiny_suite.preset.model, 0)
    m.load_state_dict(sim_soup.bank(scn, tiny_suite).instantiate(torch.tensor(h)))
    return token_logps(m.eval(), torch.tensor(encode(tiny_suite.tokenizer, text)))


def _logps(reply) -> torch.Tensor:
    return torch.tensor(list(reply.components[0].logprobs), dtype=torch.float64)


def test_the_node_estimates_its_users_h_from_their_text_and_serves_that_specialist(soup_run, tiny_suite):
    report, captured, _, scn = soup_run
    node = captured["node"]
    inst = report["soup_of_experts"]["nodes"][0]
    sample = sim_soup.sample_text(tiny_suite, node.group, scn.soup.sample_chars)
    tables = unigram_log_tables([tiny_suite.ids(p, "train") for p in tiny_suite.personas],
                                tiny_suite.preset.model.vocab_size)
    expected_h = estimate_domain_weights(torch.tensor(encode(tiny_suite.tokenizer, sample)), tables)
    torch.testing.assert_close(torch.tensor(inst["domain_weights"]), expected_h, atol=1e-5, rtol=0)
    assert inst["domains"] == list(tiny_suite.personas)
    assert max(inst["domain_weights"]) == inst["domain_weights"][tiny_suite.personas.index(node.target)]
    expected = _served(tiny_suite, scn, inst["domain_weights"], captured["text"])
    torch.testing.assert_close(_logps(captured["estimated"]), expected, atol=2e-4, rtol=0)


def test_instantiate_soup_through_the_coordinator_switches_the_node_and_refuses_bad_requests(soup_run, tiny_suite):
    _, captured, _, scn = soup_run
    h = one_hot(tiny_suite.personas, "novelist").tolist()
    reply = captured["explicit"]
    assert list(reply.domain_weights) == h and reply.bank == "soup-fp32" and reply.node_id == captured["node"].node_id
    alpha = sim_soup.bank(scn, tiny_suite).alpha(torch.tensor(h))
    torch.testing.assert_close(torch.tensor(list(reply.alpha)), alpha.detach(), atol=1e-5, rtol=0)
    expected = _served(tiny_suite, scn, h, captured["text"])
    torch.testing.assert_close(_logps(captured["after"]), expected, atol=2e-4, rtol=0)
    assert not torch.allclose(_logps(captured["after"]), _logps(captured["estimated"]), atol=1e-3)
    assert captured["codes"] == {"wrong-count": "INVALID_ARGUMENT", "not-a-simplex": "INVALID_ARGUMENT",
                                 "both": "INVALID_ARGUMENT", "base-node": "FAILED_PRECONDITION",
                                 "ghost": "NOT_FOUND", "user-token": "PERMISSION_DENIED"}
    assert torch.equal(_logps(captured["still"]), _logps(captured["after"]))


def test_the_report_prices_the_bank_against_specialists_from_the_shipped_files(soup_run):
    report, _, out, _ = soup_run
    sec = json.loads((out / "report.json").read_text())["soup_of_experts"]
    files = out / "work" / "bundles"
    bank, spec = (files / "soup-fp32.ffb").stat().st_size, (files / "base-fp32.ffb").stat().st_size
    assert sec["bank"]["bytes"] == bank and sec["specialist_bundle_bytes"] == spec
    k = sec["break_even_k"]
    assert k == math.floor(bank / spec) + 1 and (k - 1) * spec <= bank < k * spec
    # the soup node downloaded exactly the bank, and nothing else in bundles (nor a previous run's bytes)
    assert sec["nodes"][0]["bundle_payload_bytes"] == bank
    assert report["bytes_detail"]["BUNDLE"]["payload"] == sum(
        (files / f"{n['model']}-fp32.ffb").stat().st_size for n in report["per_node"])
    soup_row = next(n for n in report["per_node"] if n["model"] == "soup")
    assert soup_row["bundle_payload_bytes"] == bank
    # a dense bank of n entries holds S plus n model-sized deltas: more than n + 1 specialists' weights
    assert sec["payload_model"]["bank"]["total"] > (sec["bank"]["bank_size"] + 1) * sec["payload_model"]["specialist"]
    rows = sec["nodes"][0]["users_scored"]
    assert rows and {r["user"] for r in rows} == set(sec["nodes"][0]["users"])
    assert all(r["soup_ppl"] > 1 and r["base_ppl"] > 1 and r["specialist_ppl"] > 1 for r in rows)
    assert report["requests"]["failed"] == 0
    md = (out / "report.md").read_text()
    assert "## Soup-of-Experts nodes" in md
    assert (out / "soup_bytes.png").exists() and (out / "soup_quality.png").exists()


def test_soup_nodes_serve_each_persona_with_users_then_mixed_groups(tiny_suite):
    groups = sim_soup.targets(tiny_suite, 7)
    by_persona = {}
    for u in tiny_suite.known_users:
        by_persona.setdefault(tiny_suite.sources[u].persona, []).append(u)
    pure = [p for p in tiny_suite.personas if p in by_persona]
    assert [label for label, _ in groups[:len(pure)]] == pure
    a, b = pure[0], pure[1]
    assert groups[len(pure)] == (f"{a}+{b}", by_persona[a] + by_persona[b])
    assert all(set(users) <= set(tiny_suite.known_users) and users for _, users in groups)
    # a sample of a mixed group is drawn from both personas' users in equal shares
    text = sim_soup.sample_text(tiny_suite, groups[len(pure)][1], 800)
    assert all(tiny_suite.text(u, "train")[:200] in text for u in groups[len(pure)][1])
