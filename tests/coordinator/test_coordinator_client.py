"""The command-line client and `python -m coordinator`, run as real subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import sys
from pathlib import Path

import grpc
from coordinator_harness import ADMIN, NODE, encode, federation, make_adapter, run, write_tokenizer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator import client

REPO = Path(__file__).resolve().parents[2]
TEXT = "the cat sat on the mat"


async def cli_process(address: str, *args: str, token: str | None = None) -> tuple[int, str, str]:
    """Run `python -m coordinator.client` as a subprocess, token in $FRACTAL_TOKEN; (status, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FRACTAL_TOKEN", None)
    if token is not None:
        env["FRACTAL_TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "coordinator.client", "--address", address,
                                                "--timeout", "10", *args, cwd=REPO, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def cli(address: str, *args: str, token: str | None = None) -> tuple[int, str, str]:
    """The client's main() in a thread (the server shares this process's event loop); (status, stdout, stderr)."""
    argv = ["--address", address, "--timeout", "10", *(["--token", token] if token is not None else []), *args]
    out, err = io.StringIO(), io.StringIO()

    def call() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return client.main(argv)
    rc = await asyncio.to_thread(call)
    return rc, out.getvalue(), err.getvalue()


def test_cli_covers_the_client_rpcs_and_prints_one_line_errors(tmp_path):
    async def go():
        fed = await federation(tmp_path)
        try:
            await fed.add_node("n1", seed=1)
            await fed.add_node("s1", seed=2, model="novelist")
            adapter = tmp_path / "alice.safetensors"
            adapter.write_bytes(make_adapter("alice", 3))
            addr = fed.coordinator.address
            rc, out, err = await cli(addr, "put-user", "alice", "--persona", "novelist", "--adapter", str(adapter),
                                     token=ADMIN)
            assert rc == 0, err
            alice = json.loads(out)["token"]
            rc, out, _ = await cli_process(addr, "--json", "score", "--user", "alice", TEXT, token=alice)
            reply = json.loads(out)
            assert rc == 0 and reply["model"] == "adapter:alice"
            assert [int(i) for i in reply["token_ids"]] == encode(tmp_path, TEXT)[1:]
            rc, out, _ = await cli(addr, "score", "--mix", "base", "--mix", "novelist", "--mode", "posterior",
                                   "--tokens", TEXT, token=ADMIN)
            assert rc == 0 and "model mixture" in out and "component novelist on s1" in out
            rc, out, _ = await cli(addr, "generate", "--user", "alice", "--max-new-tokens", "3", "--temperature",
                                   "0", "the", token=alice)
            assert rc == 0 and len(out.split()) == 3
            for args, key in ((("nodes",), "nodes"), (("users",), "users"), (("stats",), "by_kind"),
                              (("bundles",), None), (("routing",), None)):
                rc, out, err = await cli(addr, *args, token=ADMIN)
                assert rc == 0, err
                if key:
                    assert key in json.loads(out)
            rc, out, _ = await cli(addr, "adapter", "--user", "alice", "--out", str(tmp_path / "back.bin"),
                                   token=alice)
            assert rc == 0 and (tmp_path / "back.bin").read_bytes() == adapter.read_bytes()
            bundle = tmp_path / "b.bin"
            bundle.write_bytes(os.urandom(300_000))
            rc, out, _ = await cli(addr, "put-bundle", "base.fp16", str(bundle), "--model", "base", "--codec", "fp16",
                                   token=ADMIN)
            assert rc == 0 and json.loads(out)["size"] == "300000"
            assert fed.coordinator.store.get("base.fp16").size == 300_000
            rc, _, _ = await cli(addr, "assign", "alice", "--node", "n1", token=ADMIN)
            assert rc == 0 and fed.coordinator.registry.get_user("alice").node_id == "n1"
            rc, out, _ = await cli(addr, "set-node-state", "s1", "draining", token=ADMIN)
            assert rc == 0 and json.loads(out)["state"] == "NODE_STATE_DRAINING"
            # errors: one line, the status name, exit 1
            for args, token, status in ((("score", "--user", "bob", TEXT), ADMIN, "NOT_FOUND"),
                                        (("score", "--user", "alice", TEXT), "forged-token", "UNAUTHENTICATED"),
                                        (("users",), None, "UNAUTHENTICATED"),
                                        (("reset-stats",), alice, "PERMISSION_DENIED"),
                                        (("score", ""), ADMIN, "INVALID_ARGUMENT")):
                rc, out, err = await cli(addr, *args, token=token)
                assert rc == 1 and err.startswith(f"error: {status}: ") and err.count("\n") == 1, (args, err)
            rc, _, _ = await cli(addr, "delete-user", "alice", token=ADMIN)
            assert rc == 0 and fed.coordinator.registry.get_user("alice") is None
            rc, _, _ = await cli(addr, "reset-stats", token=ADMIN)
            assert rc == 0
        finally:
            await fed.close()
    run(go())


def test_python_m_coordinator_serves_until_sigterm(tmp_path):
    async def go():
        env = {**os.environ, "PYTHONPATH": str(REPO), "FRACTAL_ADMIN_TOKEN": ADMIN, "FRACTAL_NODE_TOKEN": NODE}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "coordinator", "--port", "0", "--db", str(tmp_path / "r.db"), "--bundle-dir",
            str(tmp_path / "b"), "--tokenizer", str(write_tokenizer(tmp_path / "tok.json")), cwd=REPO, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert line.startswith("coordinator listening on 127.0.0.1:"), line
            address = line.split()[-1]
            async with grpc.aio.insecure_channel(address) as ch:
                reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            rc, out, err = await cli_process(address, "score", "--user", "nobody", TEXT, token=ADMIN)
            assert (rc, out, err) == (1, "", "error: NOT_FOUND: unknown user 'nobody'\n")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert (tmp_path / "r.db").exists()

    run(go())


def test_python_m_coordinator_refuses_a_bad_configuration(tmp_path):
    async def go():
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRACTAL_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "coordinator", "--port", "0", "--db", str(tmp_path / "r.db"), "--admin-token",
            "short", "--node-token", NODE, cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode == 1
        assert err.decode() == "error: admin_token must have at least 16 characters\n"
    run(go())
