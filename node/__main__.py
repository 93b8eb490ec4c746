"""`python -m node`: one federation node (or K virtual nodes) as a plain process, outside Ray.

    export FRACTAL_NODE_TOKEN=...            # or --token-file FILE
    python -m node --coordinator 127.0.0.1:50051 --node-id school-1 --model base
    python -m node --coordinator 127.0.0.1:50051 --node-id lab --nodes 4     # lab-0 .. lab-3, one process

Each node serves its own gRPC `Node` service on --host (a free port each), registers with the
coordinator, fetches and verifies the bundles the coordinator holds for its model (every checksum
before anything is installed), loads the adapters of the users assigned to it, and heartbeats. With
--store DIR the verified bundles are also kept on disk, so a node started again with the same id
installs them from there (verified again) instead of fetching them. On SIGTERM or Ctrl-C each node
leaves cleanly: it tells the coordinator it is draining (no new requests are routed to it), lets
requests in flight finish (up to --grace seconds), says it is down, stops its server and exits 0.
Bad input (no token, a malformed id or address, unreadable TLS files, a coordinator that refuses
the node) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

import grpc

from proto import federation_pb2 as pb
from proto.ids import is_valid_codec, is_valid_id

from .actor import NodeHost, SpecError

TOKEN_ENV = "FRACTAL_NODE_TOKEN"
MAX_NODES = 4096


class NodeCliError(ValueError):
    """A command line or environment the node cannot start from; the message is one line."""


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m node", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's address")
    p.add_argument("--node-id", required=True, help="this node's id (with --nodes K: the prefix of ID-0 .. ID-K-1)")
    p.add_argument("--model", default="base", help='the model to serve: "base" (default) or a specialist name')
    p.add_argument("--codec", default="", help="install only bundles of this expert codec (default: any)")
    p.add_argument("--nodes", type=int, default=1, metavar="K", help="virtual nodes in this process (default 1)")
    p.add_argument("--token-file", type=Path, help=f"file holding the node token (default: ${TOKEN_ENV})")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the nodes' servers bind and announce to the coordinator (default 127.0.0.1)")
    p.add_argument("--store", type=Path, metavar="DIR",
                   help="keep verified bundles here; a node started again installs them from here")
    p.add_argument("--tls-ca", type=Path, help="PEM CA certificate of the coordinator: reach it over TLS")
    p.add_argument("--tls-server-name", help="name to expect in the coordinator's certificate (default: its host)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate: the nodes' own servers speak TLS (with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument("--grace", type=float, default=5.0, help="seconds requests in flight get at shutdown (default 5)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for registration and the first install (default 120)")
    p.add_argument("-v", "--verbose", action="store_true", help="log warnings (retries, a damaged local copy, ...)")
    return p


def read_token(token_file: Path | None, environ: dict[str, str] | os._Environ = os.environ) -> str:
    """The node token from ``token_file`` (surrounding whitespace dropped) or the environment."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise NodeCliError(f"cannot read --token-file {token_file}: {exc}") from None
        if not token:
            raise NodeCliError(f"--token-file {token_file} is empty")
        return token
    token = environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise NodeCliError(f"no node token: set ${TOKEN_ENV} or give --token-file FILE")
    return token


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise NodeCliError(f"cannot read {what} {path}: {exc}") from None


def node_ids(prefix: str, k: int) -> list[str]:
    """The ids of K virtual nodes: the id itself for one, ID-0 .. ID-(K-1) for more."""
    if not 1 <= k <= MAX_NODES:
        raise NodeCliError(f"--nodes must be between 1 and {MAX_NODES}, got {k}")
    ids = [prefix] if k == 1 else [f"{prefix}-{i}" for i in range(k)]
    bad = [i for i in ids if not is_valid_id(i)]
    if bad:
        raise NodeCliError(f"node id {bad[0]!r} is not a valid id (A-Z a-z 0-9 . _ -, starting with a letter or digit)")
    return ids


def check_args(args: argparse.Namespace) -> None:
    """Refuse what cannot work before any socket is opened."""
    host, sep, port = args.coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise NodeCliError(f"--coordinator {args.coordinator!r} is not HOST:PORT")
    if not is_valid_id(args.model):
        raise NodeCliError(f"--model {args.model!r} is not a valid model name")
    if args.codec and not is_valid_codec(args.codec):
        raise NodeCliError(f"--codec {args.codec!r} is not a valid codec name")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise NodeCliError("--tls-cert and --tls-key go together")
    if args.grace < 0 or args.timeout <= 0:
        raise NodeCliError("--grace must be >= 0 and --timeout > 0")


def describe_start(r: dict) -> str:
    """One line on a started node: its address, its bundles and where they came from, its users."""
    install = r.get("install") or {}
    held = ", ".join(install.get("installed", []))
    if not held:
        held = "no bundle yet (it installs one of its model as soon as the coordinator has one)"
    origin = []
    if install.get("fetched"):
        origin.append(f"fetched {install['bytes_fetched']:,} bytes")
    if install.get("from_local"):
        origin.append(f"{len(install['from_local'])} read from its store")
    more = f" ({'; '.join(origin)})" if origin else ""
    return (f"node {r['node_id']} serving model {r['model']} on {r['address']}: {held}{more}; "
            f"{len(r.get('users', []))} users")


async def leave(host: NodeHost, grace_s: float) -> None:
    """Leave the federation cleanly: every node drains (the coordinator stops routing to it), requests
    in flight finish (``grace_s`` at most), each node says it is down, then servers and links stop."""
    hosted = list(host.nodes.values())
    for h in hosted:
        h.node.state = pb.NODE_STATE_DRAINING
    await asyncio.gather(*(_beat(h) for h in hosted))
    deadline = time.monotonic() + grace_s
    while any(h.node.inflight for h in hosted) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for h in hosted:
        h.node.state = pb.NODE_STATE_DOWN
        if h.task is not None:
            h.task.cancel()  # no beat may say HEALTHY after DOWN
    await asyncio.gather(*(_beat(h) for h in hosted))
    await host.stop()


async def _beat(h) -> None:
    """One heartbeat carrying the node's state as it is now; a coordinator that is gone is fine here."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        await h.link.stub.Heartbeat(h.node.heartbeat(), metadata=h.link.metadata, timeout=5)


async def run(args: argparse.Namespace, token: str) -> int:
    """Start the nodes, serve until SIGTERM/SIGINT, leave cleanly; the exit status."""
    ids = node_ids(args.node_id, args.nodes)
    ca = _read(args.tls_ca, "--tls-ca")
    server_tls = None
    if args.tls_cert is not None:
        key, cert = _read(args.tls_key, "--tls-key"), _read(args.tls_cert, "--tls-cert")
        assert key is not None and cert is not None  # both given: check_args
        server_tls = (key, cert)
    host = NodeHost(bind_host=args.host, server_tls=server_tls, bundle_dir=args.store)
    specs = [{"node_id": i, "model": args.model, "codec": args.codec} for i in ids]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        results = await asyncio.wait_for(host.start(args.coordinator, specs, token, tls_root_cert=ca,
                                                    tls_server_name=args.tls_server_name), args.timeout)
    except (TimeoutError, SpecError) as exc:
        await host.stop()
        raise NodeCliError(f"nodes did not start within {args.timeout:g} s" if isinstance(exc, asyncio.TimeoutError)
                           else str(exc)) from None
    failed = [r for r in results if not r["ok"]]
    if failed:
        await host.stop()
        raise NodeCliError(f"node {failed[0]['node_id']} could not join {args.coordinator}: {failed[0]['error']}")
    for r in results:
        print(describe_start(r), flush=True)
    print(f"{len(results)} node(s) joined {args.coordinator}; stop with Ctrl-C or SIGTERM", flush=True)
    await stop.wait()
    served = sum(h.node.predictions for h in host.nodes.values())
    await leave(host, args.grace)
    print(f"left {args.coordinator} cleanly ({served} predictions served)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m node`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR, format="%(levelname)s: %(message)s")
    try:
        check_args(args)
        return asyncio.run(run(args, read_token(args.token_file)))
    except (NodeCliError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
