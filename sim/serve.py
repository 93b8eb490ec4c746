"""`python -m sim.serve`: bring up a scenario's federation and keep it serving outside clients.

    python -m sim.serve --preset tiny --nodes 3                  # 127.0.0.1:50051, files in runs/serve
    python -m sim.serve --scenario scenarios/soup_of_experts.toml --port 50052 --out runs/soup-serve

The federation is the one `python -m sim.run` would start (same scenario file and flags). Once every
node is healthy it writes OUT/federation.json (the coordinator's address, nodes and the model each
serves, users and where their adapters sit) and OUT/tokens.json (the admin token and every user's
token; file mode 0600), prints the address and a client command to paste, and serves until SIGINT
or SIGTERM. Then it stops accepting calls, lets calls in flight finish (up to --grace seconds),
stops the nodes, writes the coordinator's counters, prints what it served, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

from model.config import ConfigError
from model.corpora import CorpusError

from . import network
from .actors import RayStartError
from .console import noise_to
from .federation import FederationError, LocalFederation
from .run import add_scenario_arguments, build_suite, link_names, scenario_from_args
from .scenario import ScenarioError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """sim.run's flags plus where to listen and how long calls in flight may take at shutdown."""
    ap = argparse.ArgumentParser(prog="python -m sim.serve", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    add_scenario_arguments(ap, out="runs/serve")
    ap.add_argument("--host", default="127.0.0.1", help="address the coordinator listens on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=50051, help="its port (default 50051; 0: any free port)")
    ap.add_argument("--grace", type=float, default=5.0,
                    help="seconds calls in flight may take to finish at shutdown (default 5)")
    return ap.parse_args(argv)


def describe(fed: LocalFederation, address: str) -> dict:
    """federation.json: what an outside client needs to know of the running federation (no secrets)."""
    return {
        "address": address,
        "scenario": fed.scn.name,
        "preset": fed.suite.preset.name,
        "nodes": [{"node_id": p.node_id, "model": p.model, "bundle": p.bundle, "link": p.link, "users": p.users}
                  for p in fed.plans],
        "users": [{"user_id": u, "persona": fed.suite.sources[u].persona,
                   "has_adapter": u in fed.suite.known_users,
                   "node_id": next((p.node_id for p in fed.plans if u in p.users), "")}
                  for u in fed.user_tokens],
        "tokens_file": "tokens.json",
    }


def write_private(path: Path, data: dict) -> None:
    """Write JSON readable by this user only (mode 0600 from the start, never wider)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)


def client_command(address: str, tokens_path: Path, user: str) -> str:
    """A command line that scores a text as ``user`` with the token from ``tokens_path``."""
    read = f"import json; print(json.load(open('{tokens_path}'))['users']['{user}'])"
    return (f'FRACTAL_TOKEN=$(python -c "{read}") python -m coordinator.client --address {address} '
            f'score --user {user} "the weather was fine"')


async def serve_federation(args: argparse.Namespace, console: TextIO | None = None) -> dict:
    """Bring the federation up, serve until a signal, shut down gracefully; what it served.

    What a user must see while it serves (the address, a client command, the shutdown) goes to
    ``console`` (default: stdout); `main` hands it the console while Ray's noise goes to the log.
    """
    console = console or sys.stdout
    scn = scenario_from_args(args)
    out = Path(args.out)
    suite = build_suite(scn, corpus_dir=args.corpus, progress=not args.quiet)
    names, _ = link_names(scn)
    out.mkdir(parents=True, exist_ok=True)
    fed = LocalFederation(scn, suite, out / "work", link_names=names, progress=not args.quiet,
                          host=args.host, port=args.port)
    stop = asyncio.Event()
    try:
        await fed.start()
        handle = fed.handle
        assert handle is not None  # start() serves the coordinator
        address = handle.address
        (out / "federation.json").write_text(json.dumps(describe(fed, address), indent=2))
        tokens = out / "tokens.json"
        write_private(tokens, {"address": address, "admin": fed.admin_token, "users": fed.user_tokens})
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        user = next(iter(suite.known_users), next(iter(fed.user_tokens), ""))
        print(f"serving {len(fed.plans)} nodes on {address} (federation.json and tokens.json in {out})\n"
              f"try:  {client_command(address, tokens.resolve(), user)}\n"
              "stop: Ctrl-C or SIGTERM", file=console, flush=True)
        t0 = time.monotonic()
        await stop.wait()
        print("stopping: no new calls; calls in flight get "
              f"{args.grace:g} s", file=console, flush=True)
        await handle.stop(grace=args.grace)  # stops accepting, waits for calls in flight, writes counters
        stats = handle.core.stats(None)
        return {"address": address, "seconds": round(time.monotonic() - t0, 1), "requests_ok": stats.requests_ok,
                "requests_failed": stats.requests_failed, "requests_shed": stats.requests_shed,
                "bytes_total": stats.bytes_total}
    finally:
        await fed.stop()


def console_stdout() -> TextIO:
    """A line-buffered copy of stdout's descriptor as it is now (sys.stdout itself when it has none)."""
    try:
        return os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, closefd=True)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):  # a test capturing stdout
        return sys.stdout


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m sim.serve`."""
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # stdout as it is now: while the federation serves, descriptors 1 and 2 go to OUT/stderr.log
    # (Ray's and gRPC's noise, as with sim.run), and the address and shutdown lines still reach the user
    console = console_stdout()
    try:
        with noise_to(Path(args.out) / "stderr.log"):
            served = asyncio.run(serve_federation(args, console))
    except (ScenarioError, ConfigError, CorpusError, FederationError, RayStartError, network.NetworkError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:  # the port is taken (gRPC: RuntimeError), --out is not writable
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the federation was up
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if console is not sys.stdout:
            console.close()
    print(f"served {served['requests_ok']} requests ok, {served['requests_failed']} failed, "
          f"{served['requests_shed']} shed in {served['seconds']} s on {served['address']}; "
          f"{served['bytes_total'] / 1e6:.1f} MB crossed the coordinator boundary; stopped cleanly", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
