"""sim.run end to end: a small tiny federation on Ray and gRPC, checked against independent computation."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest
import torch

from model.evaluate import token_logps
from model.tokenizer import encode
from model.train import apply_adapter
from proto import federation_pb2 as pb
from sim.run import run_federation
from sim.scenario import Scenario, from_dict

pytestmark = pytest.mark.slow


def tiny_scenario(**sections) -> Scenario:
    data = {"name": "test", "federation": {"nodes": 4, "preset": "tiny"},
            # fp32 on the wire, so the nodes' weights equal the in-process models exactly
            "model": {"expert_codec": "fp32", "other_codec": "fp32"},
            "workload": {"generate_tokens": 4, "score_chars": 400, "mixture_modes": ["uniform"]}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return from_dict(data)


@pytest.fixture(scope="module")
def federation_run(tiny_suite, tmp_path_factory):
    """One 4-node run; the extra hook scores a mixture and a user's text while the federation is up."""
    out = tmp_path_factory.mktemp("run")
    captured = {}
    persona = "programmer"
    text = tiny_suite.text(persona, "eval")[:300]

    async def extra(fed, report):
        spec = pb.MixtureSpec(components=[pb.MixtureComponent(specialist=s) for s in ("programmer", "novelist")],
                              mode=pb.MIXTURE_MODE_UNIFORM)
        captured["mixture"] = await fed.stub.Score(pb.ScoreRequest(text=text, mixture=spec), metadata=fed.admin)
        user = tiny_suite.known_users[0]
        captured["user"] = user
        captured["own"] = await fed.stub.Score(pb.ScoreRequest(user_id=user, text=text), metadata=fed.token(user))
        # a user token reaches only its own user
        other = tiny_suite.known_users[1]
        try:
            await fed.stub.Score(pb.ScoreRequest(user_id=other, text=text), metadata=fed.token(user))
            captured["cross_user"] = "OK"
        except grpc.aio.AioRpcError as exc:
            captured["cross_user"] = exc.code().name

    report = asyncio.run(run_federation(tiny_scenario(), out, suite=tiny_suite, progress=False, extra=extra))
    return report, captured, out, text


def test_report_files_and_keys(federation_run):
    report, _, out, _ = federation_run
    for f in ("report.json", "report.md", "events.jsonl", "bytes_per_node.png", "own_vs_base.png"):
        assert (out / f).exists(), f
    on_disk = json.loads((out / "report.json").read_text())
    for key in ("nodes", "bytes_total", "bytes_by_kind", "per_node", "quality", "wall_seconds"):
        assert key in on_disk
    assert on_disk["nodes"] == 4 and len(on_disk["per_node"]) == 4
    assert sum(on_disk["bytes_by_kind"].values()) == on_disk["bytes_total"]
    for n in on_disk["per_node"]:
        assert {"node", "bytes", "virtual_seconds"} <= set(n)
        assert n["virtual_seconds"] > 0
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert all({"kind", "node", "bytes", "start", "end"} <= set(e) for e in events)
    assert all(e["end"] >= e["start"] for e in events)
    assert report["requests"]["failed"] == 0
    # the tail after the workload is timed part by part
    assert {"workload", "section model_regime", "section codec_quality", "stop"} <= set(on_disk["wall_phases"])
    mem = on_disk["memory"]
    assert mem["nodes"] == 4 and len(mem["actors"]) == on_disk["actors"]
    assert all(a["rss_bytes"] > 10_000_000 for a in mem["actors"])  # a live process with torch loaded


def test_the_coordinators_request_counters_reach_the_report(federation_run):
    report, _, out, _ = federation_run
    counted = json.loads((out / "report.json").read_text())["coordinator_requests"]
    # every workload request went through the Federation service (so did the set-up's admin calls)
    ok = report["requests"]["total"] - report["requests"]["failed"]
    assert ok > 0 and counted["requests_ok"] >= ok


def test_bundle_bytes_equal_the_bundle_files(federation_run):
    report, _, out, _ = federation_run
    sizes = {b["name"]: (out / "work" / "bundles" / f"{b['name']}.ffb").stat().st_size for b in report["bundles"]}
    for n in report["per_node"]:
        bundle = f"{n['model']}-fp32"
        assert n["bundle_payload_bytes"] == sizes[bundle], n["node"]
    # every node downloaded exactly one bundle: the payload total is the sum of what each holds
    assert report["bytes_detail"]["BUNDLE"]["payload"] == sum(sizes[f"{n['model']}-fp32"] for n in report["per_node"])


def test_mixture_equals_logsumexp_of_the_specialists_minus_log_n(federation_run, tiny_suite):
    _, captured, _, text = federation_run
    reply = captured["mixture"]
    ids = torch.tensor(encode(tiny_suite.tokenizer, text))
    per = torch.stack([token_logps(tiny_suite.specialist(p), ids) for p in ("programmer", "novelist")])  # (2, T)
    expected = torch.logsumexp(per, dim=0) - math.log(2)
    got = torch.tensor(list(reply.logprobs), dtype=torch.float64)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)
    for c, row in zip(reply.components, per):
        torch.testing.assert_close(torch.tensor(list(c.logprobs), dtype=torch.float64), row, atol=2e-4, rtol=0)
    attribution = torch.tensor([list(c.attribution) for c in reply.components])
    torch.testing.assert_close(attribution.sum(0), torch.ones(attribution.size(1)), atol=1e-4, rtol=0)


def test_own_adapter_beats_base_and_matches_in_process(federation_run, tiny_suite):
    report, captured, _, text = federation_run
    assert report["quality"]["users"], "no user was scored"
    assert all(u["own_beats_base"] for u in report["quality"]["users"])
    user = captured["user"]
    ids = torch.tensor(encode(tiny_suite.tokenizer, text))
    # adapters travel in fp16 (9 KB at 30m): the node serves exactly the fp16-rounded adapter
    fp16 = {k: v.half().float() for k, v in tiny_suite.adapter_state(user).items()}
    expected = token_logps(apply_adapter(tiny_suite.base(), fp16), ids)
    torch.testing.assert_close(torch.tensor(list(captured["own"].logprobs), dtype=torch.float64), expected,
                               atol=2e-4, rtol=0)
    assert captured["own"].model == f"adapter:{user}"
    assert captured["cross_user"] == "PERMISSION_DENIED"


def test_unknown_users_are_served_by_the_base(federation_run):
    report, _, _, _ = federation_run
    assert report["quality"]["unknown"]
    assert all(u["model"] == "base" for u in report["quality"]["unknown"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_address_joins_an_existing_ray_cluster(tiny_suite, tmp_path):  # tiny_suite: trains the cache first
    """`ray start --head` here, then a federation on it through --address; only our own head is stopped."""
    ray_bin = Path(sys.executable).parent / "ray"
    assert ray_bin.exists(), "the ray CLI is installed with the project"
    port = _free_port()
    log = open(tmp_path / "ray.log", "w")  # noqa: SIM115 - closed in the finally below, once the head is gone
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # AF_UNIX socket paths must stay under 108 bytes
    # --block keeps `ray start` in the foreground, so ending it ends this head's processes and no other Ray
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--node-ip-address=127.0.0.1",
                             f"--temp-dir={ray_tmp}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in (tmp_path / "ray.log").read_text():
            assert head.poll() is None, (tmp_path / "ray.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        # as a user would: the command line, in its own process (the tiny models come from the session cache)
        run = subprocess.run([sys.executable, "-m", "sim.run", "--nodes", "2", "--preset", "tiny", "--quiet",
                              "--address", f"127.0.0.1:{port}", "--out", str(tmp_path / "out")],
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        assert run.returncode == 0, run.stderr[-3000:]
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        assert report["nodes"] == 2 and report["requests"]["failed"] == 0
        assert report["scenario"]["federation"]["address"] == f"127.0.0.1:{port}"
    finally:
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_every_run_says_which_regime_its_model_is_in(federation_run, tiny_suite):
    _, _, out, _ = federation_run
    regime = json.loads((out / "report.json").read_text())["model_regime"]
    assert regime["pretrained_on"] == list(tiny_suite.pretrain) and "reference" in regime["pretrained_on"]
    assert regime["expert_reliance"] == tiny_suite.reliance()["texts"]
    ref = regime["real_text_bpc"]["reference"]
    assert ref["beats_zlib"] == (ref["bpc"] < ref["zlib_bpc"])
    md = (out / "report.md").read_text()
    assert "## Model regime" in md and "| reference |" in md
