"""`python -m model export` writes a bundle that `python -m proto.bundle verify` accepts, and a damaged one it
refuses."""

import subprocess
import sys

import pytest

from model.codecs import decode_tensor
from proto.bundle import read_bundle_verified


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("codec", ["int8", "ternary"])
def test_export_verify_inspect_and_corruption(tiny_suite, tmp_path, codec):
    out = tmp_path / f"base-{codec}.ffb"
    r = run("model", "export", "--preset", "tiny", "--codec", codec, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert run("proto.bundle", "verify", str(out)).returncode == 0
    inspect = run("proto.bundle", "inspect", str(out))
    assert inspect.returncode == 0 and "blocks.0.moe.experts.0.fc1.weight" in inspect.stdout
    # the bundle holds the cached base model's weights, within the codec's error
    bundle = read_bundle_verified([out.read_bytes()])
    rec = {r.name: r for r in bundle.records}
    base = tiny_suite.base_state()
    w = base["blocks.1.moe.experts.3.fc1.weight"]
    got = decode_tensor(rec["blocks.1.moe.experts.3.fc1.weight"])
    assert got.shape == w.shape
    tol = 0.02 if codec == "int8" else 1.0  # ternary keeps sign and scale only
    assert float((got - w).abs().max() / w.abs().max()) < tol
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.ffb"
    bad.write_bytes(bytes(data))
    v = run("proto.bundle", "verify", str(bad))
    assert v.returncode != 0 and len(v.stderr.strip().splitlines()) == 1
    bad.write_bytes(bytes(data[: len(data) // 3]))
    v = run("proto.bundle", "verify", str(bad))
    assert v.returncode != 0 and "trunc" in v.stderr.lower()


def test_export_refuses_an_unknown_codec(tmp_path):
    r = run("model", "export", "--preset", "tiny", "--codec", "zip9", "--out", str(tmp_path / "x.ffb"))
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "zip9" in r.stderr
    assert not (tmp_path / "x.ffb").exists()
