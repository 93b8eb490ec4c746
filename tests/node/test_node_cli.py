"""The README quick-start, run as a new user would: every step a subprocess (issue 15, item 2).

`python -m model export` (a bundle and the tokenizer) -> `python -m coordinator` -> `put-bundle` ->
two `python -m node` processes -> `python -m coordinator.client score`; the score is checked
against an independent forward pass of the exported weights. Then one node leaves on SIGTERM (the
coordinator marks it down at once, requests go to the other), comes back with the same id and
--store (its bundle read from disk, not fetched), and everything stops cleanly.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from model.codecs import decode_tensor
from model.config import PRESETS
from model.evaluate import token_logps
from model.fractal_moe import build_model
from model.tokenizer import encode, load_tokenizer
from node.__main__ import NodeCliError, build_parser, check_args, node_ids, read_token
from proto.bundle import read_bundle_verified

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ADMIN = "quickstart-admin-token-0123456789"
NODE = "quickstart-node-token-0123456789"
TEXT = "The weather was fine and the children walked to school along the river."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A long-running command whose output (stdout and stderr together) is read by a thread."""

    def __init__(self, args: list[str], env: dict) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.p.stdout], daemon=True).start()

    def until(self, marker: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.seen.append(self.lines.get(timeout=0.5))
            except queue.Empty:
                if self.p.poll() is not None and self.lines.empty():
                    raise AssertionError(f"exited {self.p.returncode}:\n" + "".join(self.seen)) from None
                continue
            if marker in self.seen[-1]:
                return "".join(self.seen)
        raise AssertionError(f"no {marker!r} within {timeout} s:\n" + "".join(self.seen))

    def stop(self, timeout: float = 30) -> int:
        self.p.send_signal(signal.SIGTERM)
        code = self.p.wait(timeout)
        time.sleep(0.2)  # the reader thread drains the pipe
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code


def run(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def expected_logps(bundle: Path, tokenizer: Path, text: str) -> tuple[list[int], list[float]]:
    """Token ids and per-token log-probs of ``text`` under the bundle's weights, computed here."""
    records = read_bundle_verified([bundle.read_bytes()]).records
    model = build_model(PRESETS["tiny"].model, 0)
    model.load_state_dict({r.name: decode_tensor(r) for r in records})
    model.eval()
    ids = torch.tensor(encode(load_tokenizer(tokenizer), text), dtype=torch.long)
    with torch.no_grad():
        return ids.tolist(), token_logps(model, ids).tolist()


def test_quickstart_from_nothing_to_a_scored_request(tmp_path):
    env = {**os.environ, "FRACTAL_ADMIN_TOKEN": ADMIN, "GRPC_VERBOSITY": "ERROR"}
    bundle, tok = tmp_path / "base-int8.ffb", tmp_path / "tokenizer.json"
    r = run(["model", "export", "--preset", "tiny", "--codec", "int8", "--out", str(bundle),
             "--tokenizer-out", str(tok)], env)
    assert r.returncode == 0, r.stderr
    assert bundle.exists() and tok.exists()

    port = _free_port()
    address = f"127.0.0.1:{port}"
    coord = Proc(["coordinator", "--port", str(port), "--db", str(tmp_path / "registry.db"), "--bundle-dir",
                  str(tmp_path / "bundles"), "--tokenizer", str(tok), "--heartbeat-ms", "500"],
                 env | {"FRACTAL_NODE_TOKEN": NODE})
    procs = [coord]
    try:
        coord.until("listening on")
        client_env = env | {"FRACTAL_TOKEN": ADMIN, "FRACTAL_ADDRESS": address}
        put = run(["coordinator.client", "put-bundle", "base-int8", str(bundle), "--model", "base", "--codec", "int8"],
                  client_env)
        assert put.returncode == 0, put.stderr

        token_file = tmp_path / "node.token"
        token_file.write_text(NODE + "\n")
        store = tmp_path / "node-store"
        node_env = env | {"FRACTAL_NODE_TOKEN": NODE}
        n1 = Proc(["node", "--coordinator", address, "--node-id", "school-1", "--token-file", str(token_file),
                   "--store", str(store)], env)
        n2 = Proc(["node", "--coordinator", address, "--node-id", "school-2", "--model", "base"], node_env)
        procs += [n1, n2]
        for n in (n1, n2):
            out = n.until("joined")
            assert "base-int8" in out and "fetched" in out

        ids, want = expected_logps(bundle, tok, TEXT)
        served = set()
        for _ in range(2):  # the two idle nodes are taken in turn
            s = run(["coordinator.client", "--json", "score", TEXT], client_env)
            assert s.returncode == 0, s.stderr
            reply = json.loads(s.stdout)
            served.add(reply["node_id"])
            assert [int(i) for i in reply["token_ids"]] == ids[1:]  # every token after the first is scored
            got = reply["logprobs"]
            assert len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want)) < 1e-4
            assert math.isclose(reply["perplexity"], math.exp(-sum(want) / len(want)), rel_tol=1e-4)
        assert served == {"school-1", "school-2"}

        # school-1 leaves on SIGTERM: exit 0, and the coordinator stops routing to it at once
        assert n1.stop() == 0 and "left" in "".join(n1.seen)
        nodes = json.loads(run(["coordinator.client", "--json", "nodes"], client_env).stdout)["nodes"]
        states = {n["node_id"]: n["state"] for n in nodes}
        assert states == {"school-1": "NODE_STATE_DOWN", "school-2": "NODE_STATE_HEALTHY"}
        s = run(["coordinator.client", "--json", "score", TEXT], client_env)
        assert s.returncode == 0 and json.loads(s.stdout)["node_id"] == "school-2"

        # back with the same id and store: the bundle comes from its own disk, verified, not over the wire
        n1 = Proc(["node", "--coordinator", address, "--node-id", "school-1", "--token-file", str(token_file),
                   "--store", str(store)], env)
        procs.append(n1)
        out = n1.until("joined")
        assert "from its store" in out and "fetched" not in out
        for n in (n1, n2):
            assert n.stop() == 0
        assert coord.stop() == 0
    finally:
        for p in procs:
            if p.p.poll() is None:
                p.p.kill()


def test_node_command_line_refuses_bad_input_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FRACTAL_NODE_TOKEN"}
    r = run(["node", "--coordinator", "127.0.0.1:1", "--node-id", "n1"], env, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "FRACTAL_NODE_TOKEN" in r.stderr
    r = run(["node", "--coordinator", "nowhere", "--node-id", "n1"], env | {"FRACTAL_NODE_TOKEN": NODE}, timeout=60)
    assert r.returncode == 2 and "HOST:PORT" in r.stderr and r.stderr.strip().count("\n") == 0
    # a coordinator that is not there: one line after the timeout, no traceback
    r = run(["node", "--coordinator", f"127.0.0.1:{_free_port()}", "--node-id", "n1", "--timeout", "3"],
            env | {"FRACTAL_NODE_TOKEN": NODE}, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_node_arguments_are_checked_before_anything_starts(tmp_path):
    parse = build_parser().parse_args
    with pytest.raises(NodeCliError, match="HOST:PORT"):
        check_args(parse(["--coordinator", "host:0", "--node-id", "a"]))
    with pytest.raises(NodeCliError, match="go together"):
        check_args(parse(["--coordinator", "h:1", "--node-id", "a", "--tls-cert", "c.pem"]))
    with pytest.raises(NodeCliError, match="not a valid id"):
        node_ids("bad id", 1)
    assert node_ids("lab", 3) == ["lab-0", "lab-1", "lab-2"] and node_ids("n", 1) == ["n"]
    with pytest.raises(NodeCliError, match="between 1"):
        node_ids("lab", 0)
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(NodeCliError, match="empty"):
        read_token(empty, {})
    with pytest.raises(NodeCliError, match="cannot read"):
        read_token(tmp_path / "missing", {})
    assert read_token(None, {"FRACTAL_NODE_TOKEN": " tok \n"}) == "tok"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_nodes_over_tls_both_ways(tmp_path):
    """--tls-ca reaches a TLS coordinator; --tls-cert/--tls-key make the node's own server TLS only
    (the coordinator, given --node-tls-ca, calls it over TLS to score)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=quickstart-ca")
    (tmp_path / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("coord", "node"):  # both signed by the test's CA, both valid for 127.0.0.1
        openssl("req", *ec[:-2], "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", "-extfile", "san.cnf")
    env = {**os.environ, "FRACTAL_ADMIN_TOKEN": ADMIN, "FRACTAL_NODE_TOKEN": NODE, "GRPC_VERBOSITY": "ERROR"}
    bundle, tok = tmp_path / "base.ffb", tmp_path / "tokenizer.json"
    assert run(["model", "export", "--preset", "tiny", "--codec", "int8", "--out", str(bundle), "--tokenizer-out",
                str(tok)], env).returncode == 0
    port = _free_port()
    address = f"127.0.0.1:{port}"
    coord = Proc(["coordinator", "--port", str(port), "--db", str(tmp_path / "db"), "--bundle-dir",
                  str(tmp_path / "bundles"), "--tokenizer", str(tok), "--tls-cert", str(tmp_path / "coord.pem"),
                  "--tls-key", str(tmp_path / "coord.key"), "--node-tls-ca", str(tmp_path / "ca.pem")], env)
    procs = [coord]
    try:
        coord.until("listening on")
        client = env | {"FRACTAL_TOKEN": ADMIN, "FRACTAL_ADDRESS": address}
        ca = ["--tls-ca", str(tmp_path / "ca.pem")]
        assert run(["coordinator.client", *ca, "put-bundle", "base-int8", str(bundle), "--model", "base"],
                   client).returncode == 0
        plain = Proc(["node", "--coordinator", address, "--node-id", "no-tls", "--timeout", "20"], env)
        node = Proc(["node", "--coordinator", address, "--node-id", "tls-1", *ca, "--tls-cert",
                     str(tmp_path / "node.pem"), "--tls-key", str(tmp_path / "node.key")], env)
        procs += [plain, node]
        assert "fetched" in node.until("joined")
        s = run(["coordinator.client", *ca, "--json", "score", TEXT], client)
        assert s.returncode == 0, s.stderr
        assert json.loads(s.stdout)["node_id"] == "tls-1"
        assert plain.p.wait(60) == 2  # a plaintext node cannot join a TLS coordinator
        assert node.stop() == 0 and coord.stop() == 0
    finally:
        for p in procs:
            if p.p.poll() is None:
                p.p.kill()
