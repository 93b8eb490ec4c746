"""NodeHost: many virtual nodes in one process, registered with a (fake) coordinator; and the Ray actor."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading

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

from node.actor import NodeHost, SpecError
from node.adapters import encode_adapter
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc

MODEL = tiny_model(20)
BUNDLE = bundle_bytes(MODEL)
IDS = torch.randint(0, TINY.vocab_size, (30,), generator=torch.Generator().manual_seed(4)).tolist()
ADAPTERS = {u: random_adapter(MODEL, s) for u, s in (("alice", 1), ("bob", 2), ("carol", 3))}


def make_coordinator() -> FakeCoordinator:
    return FakeCoordinator(
        bundles={"base": BUNDLE}, adapters={u: encode_adapter(a) for u, a in ADAPTERS.items()},
        # n1 learns its bundle and bob from the Register reply; n2 names everything in its spec
        assign={"n1": (["base"], ["bob"])},
        faults={"base": Faults(cut_after_chunks=3, cuts=1)},
    )


SPECS = [{"node_id": "n1", "users": ["alice"], "link": "adsl"},
         {"node_id": "n2", "bundles": ["base"], "users": ["carol"], "link": "fibre"}]


async def score_on(address: str, user: str = "") -> torch.Tensor:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await rpc.NodeStub(channel).ScoreTokens(pb.ScoreTokensRequest(token_ids=IDS, user_id=user),
                                                         metadata=META)
    return torch.tensor(reply.logprobs, dtype=torch.float64)


def check_started(infos: list[dict], coord: FakeCoordinator) -> None:
    by_id = {i["node_id"]: i for i in infos}
    assert all(i["ok"] and i["ready"] and i["error"] is None for i in infos), infos
    assert by_id["n1"]["users"] == ["alice", "bob"] and by_id["n2"]["users"] == ["carol"]
    assert by_id["n1"]["link"] == "adsl" and by_id["n1"]["address"] != by_id["n2"]["address"]
    for nid in ("n1", "n2"):
        assert coord.registered[nid].address == by_id[nid]["address"]
        # each virtual node fetched the whole bundle itself: bytes stay exact per node
        assert by_id[nid]["install"]["bytes_fetched"] == len(BUNDLE) == coord.bundle_bytes_sent[nid]
        assert by_id[nid]["bytes"]["by_kind"]["bundle"]["payload"] == len(BUNDLE)


def test_host_runs_two_virtual_nodes_sharing_weights():
    coord = make_coordinator()

    async def main():
        fake, address = await serve_fake(coord)
        host = NodeHost(torch_threads=None)  # leave the test process's torch threads alone
        try:
            infos = await host.start(address, SPECS, TOKEN)
            by_id = {i["node_id"]: i for i in infos}
            scores = {(n, u): await score_on(by_id[n]["address"], u)
                      for n, u in (("n1", "alice"), ("n1", "bob"), ("n2", "carol"), ("n2", ""))}
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await score_on(by_id["n2"]["address"], "alice")  # alice lives on n1 only
            await asyncio.sleep(0.5)  # a couple of heartbeats (200 ms in the fake's Register reply)
            status = await host.status()
            coord.forget_nodes = True  # the coordinator "restarted": nodes must register again
            before = len(list(coord.registered))
            coord.registered.clear()
            await asyncio.sleep(0.5)
            reregistered = {k: list(v.user_ids) for k, v in coord.registered.items()}
            with pytest.raises(SpecError, match="already hosted"):
                await host.start(address, [{"node_id": "n1"}], TOKEN)
            return infos, scores, err.value.code(), status, before, reregistered
        finally:
            await host.stop()
            await fake.stop(None)

    infos, scores, code, status, before, reregistered = asyncio.run(main())
    check_started(infos, coord)
    for (n, u), got in scores.items():
        assert torch.allclose(got, log_softmax_next(MODEL, IDS, ADAPTERS.get(u)), atol=1e-5), (n, u)
    assert code == grpc.StatusCode.NOT_FOUND
    assert status["store"]["bundles"] == 1 and status["store"]["models"] == 1 and status["store"]["references"] == 2
    beats = {h.node_id for h in coord.heartbeats if h.state == pb.NODE_STATE_HEALTHY}
    assert beats == {"n1", "n2"} and {r.node_id for r in coord.reports} == {"n1", "n2"}
    assert before == 2 and reregistered == {"n1": ["alice", "bob"], "n2": ["carol"]}


def test_a_node_that_cannot_install_reports_why_and_the_others_run():
    coord = make_coordinator()
    coord.faults["base"] = Faults(corrupt_chunk=1, corruptions=99)
    coord.bundles["other"] = bundle_bytes(tiny_model(21))

    async def main():
        fake, address = await serve_fake(coord)
        host = NodeHost(heartbeats=False, torch_threads=None)
        try:
            infos = await host.start(address, [{"node_id": "bad", "bundles": ["base"]},
                                               {"node_id": "good", "bundles": ["other"]}], TOKEN)
            return infos, await host.status()
        finally:
            await host.stop()
            await fake.stop(None)

    infos, status = asyncio.run(main())
    by_id = {i["node_id"]: i for i in infos}
    assert not by_id["bad"]["ok"] and "DATA_LOSS" in by_id["bad"]["error"]
    assert by_id["good"]["ok"] and [n["node_id"] for n in status["nodes"]] == ["good"]


@pytest.mark.parametrize("spec, match", [
    ({"node_id": "../x"}, "node_id"),
    ({"node_id": "n", "colour": "red"}, "unknown key 'colour'"),
    ({"node_id": "n", "users": ["ok", "no/pe"]}, "users"),
    ({"node_id": "n", "bundles": [{"name": "b", "sha256": "zz"}]}, "sha256"),
])
def test_bad_specs_are_refused_before_anything_starts(spec, match):
    async def main():
        host = NodeHost(torch_threads=None)  # leave the test process's torch threads alone
        with pytest.raises(SpecError, match=match):
            await host.start("127.0.0.1:1", [spec], TOKEN)
        return host.nodes

    assert asyncio.run(main()) == {}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_host_reaches_a_tls_coordinator_only_with_its_certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    coord = FakeCoordinator(bundles={"base": BUNDLE})

    async def main():
        fake, address = await serve_fake(coord, tls=(key.read_bytes(), cert.read_bytes()))
        try:
            plain, secure = (NodeHost(heartbeats=False, torch_threads=None) for _ in range(2))
            refused = await plain.start(address, [{"node_id": "plain", "bundles": ["base"]}], TOKEN)
            ok = await secure.start(address, [{"node_id": "tls", "bundles": ["base"]}], TOKEN,
                                    tls_root_cert=cert.read_bytes())
            await plain.stop()
            await secure.stop()
            return refused, ok
        finally:
            await fake.stop(None)

    refused, ok = asyncio.run(main())
    assert not refused[0]["ok"] and refused[0]["error"].startswith("UNAVAILABLE")
    assert ok[0]["ok"] and ok[0]["install"]["bytes_fetched"] == len(BUNDLE) and list(coord.registered) == ["tls"]


class BackgroundFake:
    """The fake coordinator on its own event loop thread (the Ray driver blocks in ray.get)."""

    def __init__(self, coord: FakeCoordinator) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.address = asyncio.run_coroutine_threadsafe(serve_fake(coord), self.loop).result(30)

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def stop(self) -> None:
        self.run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.mark.slow
def test_ray_actor_hosts_two_virtual_nodes():
    ray = pytest.importorskip("ray")
    from node.actor import NodeActor

    coord = make_coordinator()
    fake = BackgroundFake(coord)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray on 127.0.0.1 only
    try:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    except Exception:  # noqa: BLE001 - Ray's node start-up can time out on a loaded machine: once more
        ray.shutdown()
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        actor = NodeActor.remote()
        infos = ray.get(actor.start.remote(fake.address, SPECS, TOKEN), timeout=120)
        check_started(infos, coord)
        by_id = {i["node_id"]: i for i in infos}
        got = fake.run(score_on(by_id["n2"]["address"], "carol"))
        assert torch.allclose(got, log_softmax_next(MODEL, IDS, ADAPTERS["carol"]), atol=1e-5)
        status = ray.get(actor.status.remote(), timeout=60)
        assert status["store"]["references"] == 2 and len(status["nodes"]) == 2
        assert status["rss_bytes"] > 0
        ray.get(actor.stop.remote(), timeout=60)
    finally:
        ray.shutdown()
        fake.stop()
