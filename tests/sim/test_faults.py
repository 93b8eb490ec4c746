"""Fault injection: the faulty link on a real coordinator, and the fault scenario on a live federation."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import grpc
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.server import serve
from model.codecs import encode_state_dict
from model.config import PRESETS
from model.fractal_moe import build_model
from node.fetch import FetchError, FetchPolicy, fetch_bundle
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.auth_metadata import bearer_metadata
from proto.bundle import encode_bundle, read_manifest
from sim.faults import (
    Answer,
    FaultError,
    FaultSettings,
    FaultyLink,
    LinkFaults,
    answer_diff,
    run_faults,
    summarise_requests,
)
from sim.run import run_federation
from sim.scenario import load, override

SCENARIOS = sorted(Path(__file__).resolve().parents[2].glob("scenarios/*fault*.toml"))
NODE_TOKEN = "node-token-for-fault-tests"
META = bearer_metadata(NODE_TOKEN)
DATA = encode_bundle(encode_state_dict(build_model(PRESETS["tiny"].model, 1).state_dict(), expert_codec="int8",
                                       other_codec="fp16"), {"model": "base"})
MANIFEST = read_manifest(DATA)
TENSORS = sorted((MANIFEST.payload_start + e.offset, e.length) for e in MANIFEST.entries if e.length >= 2)


def test_settings_are_validated_by_name():
    with pytest.raises(FaultError, match="tolerance"):
        FaultSettings(tolerance=0)
    with pytest.raises(FaultError, match="attempts"):
        FaultSettings(attempts=0)


def test_an_answer_is_wrong_when_tokens_model_or_logprobs_differ():
    want = Answer("n1", "adapter:u", (1, 2), (-1.0, -2.0))
    assert answer_diff(Answer("n2", "adapter:u", (1, 2), (-1.0, -2.00005), True), want) == pytest.approx(5e-5)
    assert answer_diff(Answer("n1", "base", (1, 2), (-1.0, -2.0)), want) == math.inf  # the adapter was lost
    assert answer_diff(Answer("n1", "adapter:u", (1, 3), (-1.0, -2.0)), want) == math.inf
    assert answer_diff(Answer("n1", "adapter:u", (1,), (-1.0,)), want) == math.inf


def test_request_counts():
    recs = [{"ok": True, "codes": [], "attempts": 1, "wrong": False, "diff": 0.0},
            {"ok": True, "codes": ["UNAVAILABLE", "INTERNAL"], "attempts": 3, "wrong": False, "diff": 1e-6,
             "failed_over": True, "errors": ["score u: UNAVAILABLE: gone", "score u: INTERNAL: cut"]},
            {"ok": False, "codes": ["UNAVAILABLE"] * 2, "attempts": 2, "wrong": False, "diff": math.inf},
            {"ok": True, "codes": [], "attempts": 1, "wrong": True, "diff": math.inf}]
    for i, r in enumerate(recs):
        r.update(t0=float(i), t1=float(i) + 0.5 * (i + 1))
    s = summarise_requests(recs)
    assert (s["requests"], s["requests_failed"], s["requests_retried"], s["requests_unanswered"]) == (4, 2, 3, 1)
    assert (s["wrong_answers"], s["failed_over_replies"], s["max_abs_logprob_diff"]) == (1, 1, 1e-6)
    assert s["error_codes"] == {"INTERNAL": 1, "UNAVAILABLE": 3} and s["max_request_s"] == 2.0
    assert s["errors"] == ["score u: UNAVAILABLE: gone", "score u: INTERNAL: cut"]


def fetch_through(tmp_path: Path, faults: LinkFaults, policy: FetchPolicy):
    """A real coordinator with the bundle, a FaultyLink in front, a node's fetch through the link."""
    async def go():
        handle = await serve(CoordinatorConfig(db_path=tmp_path / "db", bundle_dir=tmp_path / "store",
                                               admin_token="admin-token-0123456789", node_token=NODE_TOKEN))
        (tmp_path / "b.ffb").write_bytes(DATA)
        meta = handle.store.put_file("b", tmp_path / "b.ffb", model="base", codec="int8")
        link = FaultyLink(handle.address, {"n1": faults})
        await link.start()
        try:
            async with grpc.aio.insecure_channel(link.address) as ch:
                stub = rpc.NodeControlStub(ch)
                # the link forwards the other NodeControl calls untouched
                reg = await stub.Register(pb.RegisterRequest(node_id="n1", address="127.0.0.1:9", model="base"),
                                          metadata=META)
                try:
                    got = await fetch_bundle(stub, pb.BundleRef(name="b", size=meta.size, sha256=meta.sha256),
                                             node_id="n1", metadata=META, policy=policy)
                except FetchError as exc:
                    got = exc
            return reg, got
        finally:
            await link.stop()
            await handle.stop()
    return asyncio.run(go())


def test_a_cut_stream_resumes_from_the_offset_reached(tmp_path):
    faults = LinkFaults(cut_at=len(DATA) // 2)
    reg, got = fetch_through(tmp_path, faults, FetchPolicy(chunk_size=4096, backoff_s=0))
    assert [b.name for b in reg.bundles] == ["b"]
    cut = faults.streams[0]["cut_at"]
    assert cut == (len(DATA) // 2) // 4096 * 4096  # the last whole chunk before half-way
    assert [s["offset"] for s in faults.streams] == [0, cut]  # resumed from there, not from 0
    assert got.resumes == 1 and got.refetches == 0 and got.payload_bytes == len(DATA)  # nothing shipped twice


def test_corrupt_chunks_are_fetched_again_from_the_damaged_tensor(tmp_path):
    picks = [TENSORS[len(TENSORS) // 3], TENSORS[2 * len(TENSORS) // 3]]
    faults = LinkFaults(corrupt=[start + length // 2 for start, length in picks])
    _, got = fetch_through(tmp_path, faults, FetchPolicy(chunk_size=4096, backoff_s=0))
    assert [s["offset"] for s in faults.streams] == [0] + [start for start, _ in picks]
    assert [s["corrupted"] for s in faults.streams] == [[faults.corrupt[0]], [faults.corrupt[1]], []]
    assert got.refetches == 2 and got.payload_bytes > len(DATA)
    assert encode_bundle(got.bundle.records, got.bundle.meta) == DATA  # what was verified is the original


def test_a_link_that_always_corrupts_gets_data_loss_and_nothing(tmp_path):
    start, length = TENSORS[len(TENSORS) // 2]
    faults = LinkFaults(corrupt_always=start + length // 2)
    _, got = fetch_through(tmp_path, faults, FetchPolicy(chunk_size=4096, backoff_s=0, max_refetch=2))
    assert isinstance(got, FetchError) and got.code == grpc.StatusCode.DATA_LOSS
    assert [s["offset"] for s in faults.streams] == [0, start, start]  # 1 + max_refetch streams, then it gave up


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.name for p in SCENARIOS])
def test_shipped_fault_scenarios_load_and_inject_every_fault(path):
    scn = load(path)
    f = scn.faults
    assert f.kill_nodes >= 1 and 0 < f.cut_stream_at < 1 and f.corrupt_chunks >= 1 and f.restart_coordinator
    base_nodes = scn.federation.nodes - len(scn.specialists())
    assert f.kill_nodes < base_nodes  # failover needs a surviving base node


@pytest.mark.slow
def test_fault_scenario_on_a_live_federation(tiny_suite, tmp_path):
    scn = load(SCENARIOS[0])
    scn = override(scn, "model", specialists=[])
    scn = override(scn, "federation", nodes=3)
    scn = override(scn, "workload", score_requests_per_user=1, generate_requests_per_user=0, mixture_requests=0,
                   score_chars=300, concurrency=4)
    scn = override(scn, "faults", kill_nodes=1, corrupt_chunks=1)
    light = FaultSettings(requests_after_fault=1, generate_tokens=4, score_chars=200)

    report = asyncio.run(run_federation(scn, tmp_path, suite=tiny_suite, progress=False,
                                        extra=lambda fed, rep: run_faults(fed, rep, light)))
    f = report["faults"]
    assert f["checks"] == dict.fromkeys(f["checks"], True) and f["passed"]
    assert set(f["checks"]) == {"all_answered", "no_wrong_answer", "no_adapter_lost", "users_failed_over",
                                "registry_survived_restart", "cut_stream_resumed_from_offset",
                                "corrupt_chunks_refetched", "persistent_corruption_never_installed"}
    assert (f["requests_unanswered"], f["adapters_lost"], f["requests"]["wrong_answers"]) == (0, 0, 0)
    assert f["requests"]["max_abs_logprob_diff"] <= 1e-4
    kinds = [i["fault"] for i in f["injected"]]
    assert kinds.count("kill_actor") == 1 and "restart_coordinator" in kinds and "cut_stream" in kinds
    assert kinds.count("corrupt_chunk") == 1 and "corrupt_chunk_every_stream" in kinds
    kill = f["kill"]
    assert kill["users_on_killed_nodes"] and not set(kill["users_now_on"].values()) & set(kill["nodes_killed"])
    assert f["restart"]["registry_survived"] and f["restart"]["tokens_still_valid"]
    assert json.loads((tmp_path / "report.json").read_text())["faults"]["passed"]
