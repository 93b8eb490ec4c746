"""Regenerate the committed gRPC code from proto/federation.proto.

    python -m proto.generate            # rewrite proto/federation_pb2{,_grpc}.py and their .pyi stubs
    python -m proto.generate --check    # exit 1 when the committed code is stale
    python -m proto.generate --out DIR  # write elsewhere (what the freshness test does)

protoc is run with the proto directory as its include root, so the descriptor is registered as
"federation.proto" (what grpcurl and clients in other languages see), and the one import protoc
writes into the _grpc module and its stub (`import federation_pb2`) is rewritten to a package-relative
import. The .pyi type stubs come from mypy-protobuf's protoc plugins (protoc-gen-mypy and
protoc-gen-mypy_grpc, installed beside the Python running this). Needs grpcio-tools and mypy-protobuf
(dev dependencies); the generated code needs only grpcio and protobuf.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = "federation.proto"
GENERATED = ("federation_pb2.py", "federation_pb2.pyi", "federation_pb2_grpc.py", "federation_pb2_grpc.pyi")

# module -> (the import protoc writes, the package-relative import it becomes)
_RELATIVE_IMPORTS = {
    "federation_pb2_grpc.py": ("import federation_pb2 as federation__pb2",
                               "from . import federation_pb2 as federation__pb2"),
    "federation_pb2_grpc.pyi": ("import federation_pb2 as _federation_pb2",
                                "from . import federation_pb2 as _federation_pb2"),
}


class GenerateError(RuntimeError):
    """protoc failed, or its output did not have the expected shape."""


def _plugin(name: str) -> str:
    """The path of protoc plugin ``name``: beside this Python (a venv's bin/), else on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise GenerateError(f"{name} not found: install the dev extras (mypy-protobuf)")
    return found


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on federation.proto into ``out_dir``; return the generated files' paths."""
    import importlib.resources

    from grpc_tools import protoc  # dev dependency: imported only when generating

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        str(PROTO_DIR / PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise GenerateError(f"protoc failed on {PROTO_DIR / PROTO_FILE}")
    for name, (absolute, relative) in _RELATIVE_IMPORTS.items():
        module = out_dir / name
        source = module.read_text()
        if absolute not in source:
            raise GenerateError(f"expected {absolute!r} in the generated {name}")
        module.write_text(source.replace(absolute, relative))
    return [out_dir / name for name in GENERATED]


def stale_files(committed_dir: Path = PROTO_DIR) -> list[str]:
    """Names of generated files whose committed copy differs from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            path.name
            for path in fresh
            if not (committed_dir / path.name).is_file()
            or (committed_dir / path.name).read_bytes() != path.read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m proto.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help="output directory (default: proto/)")
    parser.add_argument("--check", action="store_true", help="only check that the committed code is fresh")
    args = parser.parse_args(argv)
    try:
        if args.check:
            stale = stale_files()
            if stale:
                print(f"stale generated code: {', '.join(stale)}; run `make proto`", file=sys.stderr)
                return 1
            return 0
        for path in generate(args.out):
            print(path)
    except GenerateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
