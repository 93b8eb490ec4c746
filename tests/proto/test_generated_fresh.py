"""The committed gRPC code must be what `python -m proto.generate` produces from federation.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proto import generate  # imports grpc_tools only when it generates

pytest.importorskip("grpc_tools")

REPO = Path(__file__).resolve().parents[2]


def test_committed_code_matches_a_fresh_generation(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    assert [p.name for p in fresh] == list(generate.GENERATED)
    for path in fresh:
        committed = REPO / "proto" / path.name
        assert committed.is_file(), f"{committed} is missing: run `make proto`"
        assert committed.read_bytes() == path.read_bytes(), f"{path.name} is stale: run `make proto`"


@pytest.mark.parametrize("name", ["federation_pb2_grpc.py", "federation_pb2_grpc.pyi"])
def test_generated_grpc_module_imports_the_messages_package_relatively(name: str) -> None:
    source = (REPO / "proto" / name).read_text()
    assert "from . import federation_pb2" in source
    assert "\nimport federation_pb2" not in source


def test_check_flag_detects_a_stale_file(tmp_path: Path) -> None:
    for path in generate.generate(tmp_path):
        if path.name == "federation_pb2.pyi":
            path.write_text(path.read_text() + "\n# edited by hand\n")
    assert generate.stale_files(tmp_path) == ["federation_pb2.pyi"]
    assert generate.stale_files() == []


def test_descriptor_is_the_versioned_package() -> None:
    from proto import federation_pb2, federation_pb2_grpc

    assert federation_pb2.DESCRIPTOR.package == "fractal.federation.v1"
    assert set(federation_pb2.DESCRIPTOR.services_by_name) == {"Federation", "NodeControl", "Node"}
    assert hasattr(federation_pb2_grpc, "NodeServicer")


def test_cli_check_exits_zero_when_fresh() -> None:
    proc = subprocess.run([sys.executable, "-m", "proto.generate", "--check"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
