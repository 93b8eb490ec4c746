"""`python -m sim.serve` as an outside client meets it (issue 15, items 1 and 6).

The client half of this test knows nothing of the project: it imports no module of ours and no
.proto. It reads the address and a user's token from the files sim.serve writes, discovers the
services and message types through server reflection, scores and generates, then stops the server
with SIGTERM and expects a clean exit.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.json_format import ParseDict
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerOutput:
    """The server's stdout, read line by line by a thread (a select on the pipe would miss lines
    already in the reader's buffer)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.queue.put(line) for line in proc.stdout], daemon=True).start()

    def until(self, marker: str, timeout: float) -> str:
        """Everything read so far, once a line holds ``marker``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.seen.append(self.queue.get(timeout=1.0))
            except queue.Empty:
                if self.proc.poll() is not None and self.queue.empty():
                    raise AssertionError(f"sim.serve exited with {self.proc.returncode}:\n" + "".join(self.seen)) \
                        from None
                continue
            if marker in self.seen[-1]:
                return "".join(self.seen)
        raise AssertionError(f"no {marker!r} from sim.serve within {timeout} s:\n" + "".join(self.seen))


class ReflectionClient:
    """Calls any method of a server that serves reflection, with messages built from dicts."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))

    def services(self) -> list[str]:
        """Service names the server lists."""
        return ProtoReflectionDescriptorDatabase(self.channel).get_services()

    def _method(self, full_method: str):
        service, method = full_method.rsplit("/", 1)
        desc = self.pool.FindServiceByName(service).FindMethodByName(method)
        request = message_factory.GetMessageClass(desc.input_type)
        reply = message_factory.GetMessageClass(desc.output_type)
        return desc, request, reply

    def call(self, full_method: str, body: dict, token: str):
        """A unary call (a list of messages for a server stream)."""
        desc, request, reply = self._method(full_method)
        path = "/" + full_method
        make = self.channel.unary_stream if desc.server_streaming else self.channel.unary_unary
        fn = make(path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=reply.FromString)
        result = fn(ParseDict(body, request()), metadata=(("authorization", f"Bearer {token}"),), timeout=120)
        return list(result) if desc.server_streaming else result


def test_sim_serve_answers_a_reflection_only_client_and_stops_cleanly(tmp_path, tiny_suite):
    out, port = tmp_path / "serve", _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # stderr (Ray's and gRPC's chatter) goes to a file: an unread pipe would fill and block the server
    err = (tmp_path / "serve.err").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "sim.serve", "--preset", "tiny", "--nodes", "3",
                             "--port", str(port), "--out", str(out), "--quiet"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        output = ServerOutput(proc)
        started = output.until("stop: ", timeout=400)
        assert f"127.0.0.1:{port}" in started and "python -m coordinator.client" in started
        fed = json.loads((out / "federation.json").read_text())
        tokens_path = out / "tokens.json"
        assert stat.S_IMODE(tokens_path.stat().st_mode) == 0o600
        tokens = json.loads(tokens_path.read_text())
        assert fed["address"] == tokens["address"] == f"127.0.0.1:{port}"
        assert {n["model"] for n in fed["nodes"]} >= {"base"}
        user = next(u for u in fed["users"] if u["has_adapter"])
        token = tokens["users"][user["user_id"]]

        with grpc.insecure_channel(fed["address"]) as channel:
            client = ReflectionClient(channel)
            assert "fractal.federation.v1.Federation" in client.services()
            scored = client.call("fractal.federation.v1.Federation/Score",
                                 {"user_id": user["user_id"], "text": "the weather was fine and the sea was calm"},
                                 token)
            assert scored.perplexity > 1 and len(scored.logprobs) >= 2 and scored.node_id == user["node_id"]
            chunks = client.call("fractal.federation.v1.Federation/Generate",
                                 {"user_id": user["user_id"], "prompt": "the weather", "max_new_tokens": 5, "seed": 1},
                                 token)
            assert len(chunks) == 5 and chunks[-1].finish_reason
            stats = client.call("fractal.federation.v1.Federation/GetStats", {}, token)
            assert stats.requests_ok >= 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / "serve.err").read_text()[-2000:]
        assert "stopped cleanly" in output.until("stopped cleanly", timeout=10)
        # Ray's and gRPC's noise went to OUT/stderr.log (as with sim.run), not to the user's console
        assert (out / "stderr.log").exists()
        assert "Ray" not in "".join(output.seen) and "raylet" not in (tmp_path / "serve.err").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()
