"""`python -m coordinator`: serve a federation's coordinator until interrupted.

Tokens come from --admin-token/--node-token or, better (they stay out of `ps`), the environment
variables FRACTAL_ADMIN_TOKEN and FRACTAL_NODE_TOKEN.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from proto.message_limits import MAX_MESSAGE_BYTES, MIB

from .config import KIB, CoordinatorConfig, CoordinatorConfigError


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m coordinator", description="Serve the federation's gRPC coordinator.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="port to bind; 0 picks a free one (default 50051)")
    p.add_argument("--db", type=Path, default=Path("runs/coordinator/registry.db"), help="SQLite registry file")
    p.add_argument("--bundle-dir", type=Path, default=Path("runs/coordinator/bundles"), help="bundle store directory")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json (without it Score/Generate are refused)")
    p.add_argument("--bos-token", help="token prepended to every text so its first token is scored too")
    p.add_argument("--admin-token", default=os.environ.get("FRACTAL_ADMIN_TOKEN"),
                   help="admin bearer token (default: $FRACTAL_ADMIN_TOKEN)")
    p.add_argument("--node-token", default=os.environ.get("FRACTAL_NODE_TOKEN"),
                   help="node bearer token (default: $FRACTAL_NODE_TOKEN)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (enables TLS, with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
    p.add_argument("--node-tls-ca", type=Path,
                   help="PEM CA certificate of the nodes' certificates: call every node over TLS")
    p.add_argument("--chunk-kib", type=int, default=1024, help="bundle chunk size in KiB (default 1024)")
    p.add_argument("--bundle-memory-mib", type=int, default=512,
                   help="bundles shipped from memory up to this many MiB held; 0: from disk (default 512)")
    p.add_argument("--max-message-mib", type=int, default=MAX_MESSAGE_BYTES // MIB,
                   help=f"largest gRPC message in MiB (default {MAX_MESSAGE_BYTES // MIB})")
    p.add_argument("--max-concurrent-rpcs", type=int, default=64, help="client RPCs in flight before shedding")
    p.add_argument("--max-text-chars", type=int, default=32_768, help="longest text or prompt accepted")
    p.add_argument("--max-tokens", type=int, default=4_096, help="most tokens in a scored text or prompt")
    p.add_argument("--max-new-tokens", type=int, default=512, help="most tokens one Generate may produce")
    p.add_argument("--node-timeout", type=float, default=30.0, help="seconds any one call to a node may take")
    p.add_argument("--heartbeat-ms", type=int, default=2_000, help="heartbeat interval asked of nodes")
    return p


def config_from_args(args: argparse.Namespace) -> CoordinatorConfig:
    """A validated config from parsed arguments (CoordinatorConfigError when invalid)."""
    if not args.admin_token or not args.node_token:
        raise CoordinatorConfigError("set --admin-token and --node-token (or FRACTAL_ADMIN_TOKEN / FRACTAL_NODE_TOKEN)")
    return CoordinatorConfig(
        host=args.host, port=args.port, db_path=args.db, bundle_dir=args.bundle_dir, tokenizer_path=args.tokenizer,
        bos_token=args.bos_token, admin_token=args.admin_token, node_token=args.node_token, tls_cert=args.tls_cert,
        tls_key=args.tls_key, node_tls_ca=args.node_tls_ca, chunk_size=args.chunk_kib * KIB,
        bundle_memory_bytes=args.bundle_memory_mib * MIB,
        max_message_bytes=args.max_message_mib * MIB,
        max_concurrent_rpcs=args.max_concurrent_rpcs, max_text_chars=args.max_text_chars, max_tokens=args.max_tokens,
        max_new_tokens=args.max_new_tokens, node_timeout_s=args.node_timeout, heartbeat_interval_ms=args.heartbeat_ms)


async def _run(config: CoordinatorConfig) -> None:
    from .server import serve

    handle = await serve(config)
    print(f"coordinator listening on {handle.address}{' (TLS)' if config.tls_cert else ''}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await handle.stop(grace=2.0)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        asyncio.run(_run(config))
    except (CoordinatorConfigError, OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
