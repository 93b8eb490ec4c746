"""`python -m sim.loadtest`: a bounded load test of a real coordinator and real nodes on loopback.

Starts a coordinator and N nodes (virtual nodes of one in-process NodeHost, serving a model of
the preset's shape with random weights: no training), registers users with adapters, then C
concurrent clients, each on its own connection, send R requests in total with their users' own
tokens, and it stops by itself. Reports throughput, latency percentiles and errors by status
code; when the clients outnumber the coordinator's concurrency cap (``--cap``), the excess is shed
with RESOURCE_EXHAUSTED and counted as shed. Everything binds 127.0.0.1 only.

    python -m sim.loadtest                                    # 32 clients, 2000 requests, cap 64
    python -m sim.loadtest --clients 64 --cap 8 --requests 1000   # past the cap: excess is shed
    python -m sim.loadtest --kind mixed --json load.json

Clients, coordinator and nodes share one process and its event loop (and the machine's cores),
so the figures are a floor for what the coordinator does with its own machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import math
import random
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenizers import Tokenizer, models, pre_tokenizers

from coordinator.config import CoordinatorConfig
from coordinator.server import CoordinatorHandle, serve
from model.codecs import encode_state_dict
from model.config import PRESETS
from model.fractal_moe import build_model, is_norm_param
from node.actor import NodeHost
from node.adapters import encode_adapter
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc
from proto.auth_metadata import bearer_metadata
from proto.bundle import write_bundle

LOOPBACK = "127.0.0.1"
KINDS = ("score", "generate", "mixed")


class LoadTestError(ValueError):
    """A load-test setting is invalid, or the federation under test could not be started."""


@dataclass(frozen=True, kw_only=True)
class LoadConfig:
    """One load test: the federation under test and the load put on it."""

    clients: int = 32
    requests: int = 2000
    nodes: int = 2
    users: int = 8
    cap: int = 64  # the coordinator's max_concurrent_rpcs
    kind: str = "score"  # score, generate, or mixed (every fourth request generates)
    text_words: int = 48  # words per scored text (one token each)
    generate_tokens: int = 8
    preset: str = "tiny"
    expert_codec: str = "int8"
    timeout_s: float = 30.0  # per request
    max_seconds: float = 600.0  # the whole drive stops taking new requests after this
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.clients <= 1024, f"clients must be 1..1024, got {self.clients}"),
            (1 <= self.requests <= 1_000_000, f"requests must be 1..1000000, got {self.requests}"),
            (1 <= self.nodes <= 64, f"nodes must be 1..64, got {self.nodes}"),
            (1 <= self.users <= 10_000, f"users must be 1..10000, got {self.users}"),
            (self.cap >= 1, f"cap must be >= 1, got {self.cap}"),
            (self.kind in KINDS, f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}"),
            (2 <= self.text_words <= 1000, f"text_words must be 2..1000, got {self.text_words}"),
            (1 <= self.generate_tokens <= 64, f"generate_tokens must be 1..64, got {self.generate_tokens}"),
            (self.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}"),
            (self.timeout_s > 0 and self.max_seconds > 0, "timeout_s and max_seconds must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise LoadTestError(message)


def percentiles(values: list[float]) -> dict:
    """n, mean, p50, p90, p99 and max of latencies in seconds, reported in milliseconds (nearest rank)."""
    if not values:
        return {"n": 0}
    v = sorted(values)
    def rank(q):
        return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]
    def ms(s):
        return round(1000 * s, 3)
    return {"n": len(v), "mean_ms": ms(statistics.fmean(v)), "p50_ms": ms(rank(0.5)), "p90_ms": ms(rank(0.9)),
            "p99_ms": ms(rank(0.99)), "max_ms": ms(v[-1])}


def word_tokenizer(path: Path, n_words: int) -> list[str]:
    """Write a word-level tokenizer of ``n_words`` words (plus [UNK]) to ``path``; returns the words."""
    words = [f"w{i}" for i in range(n_words)]
    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return words


class LoadRig:
    """A coordinator, its nodes and users, started for load (``async with``); :meth:`drive` loads it."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        self.tmp = tempfile.TemporaryDirectory(prefix="fractal-load-")
        self.handle: CoordinatorHandle | None = None
        self.host: NodeHost | None = None
        self.tokens: dict[str, str] = {}
        self.texts: list[str] = []
        self.admin_token = secrets.token_urlsafe(24)
        self.node_token = secrets.token_urlsafe(24)
        self.setup_s = 0.0

    async def __aenter__(self) -> LoadRig:
        t0 = time.perf_counter()
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        self.setup_s = time.perf_counter() - t0
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        """Model bundle, coordinator, nodes, users; LoadTestError if a node does not come up."""
        cfg, root = self.cfg, Path(self.tmp.name)
        preset = PRESETS[cfg.preset].model
        rng = random.Random(cfg.seed)
        words = word_tokenizer(root / "tokenizer.json", min(preset.vocab_size - 1, 500))
        self.texts = [" ".join(rng.choices(words, k=cfg.text_words)) for _ in range(64)]
        model = build_model(preset, cfg.seed).eval()
        entries = encode_state_dict(model.state_dict(), expert_codec=cfg.expert_codec, other_codec="fp16")
        write_bundle(root / "base.ffb", entries, {"model": "base", "model_config": dataclasses.asdict(preset)})
        self.handle = await serve(CoordinatorConfig(
            db_path=root / "coordinator.db", bundle_dir=root / "store", admin_token=self.admin_token,
            node_token=self.node_token, tokenizer_path=root / "tokenizer.json", host=LOOPBACK,
            max_concurrent_rpcs=cfg.cap, node_timeout_s=cfg.timeout_s))
        self.handle.store.put_file(f"base-{cfg.expert_codec}", root / "base.ffb", model="base", codec=cfg.expert_codec)
        self.host = NodeHost(bind_host=LOOPBACK, torch_threads=1)
        started = await self.host.start(self.handle.address, [{"node_id": f"load-{i:03d}"} for i in range(cfg.nodes)],
                                        self.node_token)
        bad = [r for r in started if not (r["ok"] and r["ready"])]
        if bad:
            raise LoadTestError(f"node {bad[0]['node_id']} did not come up: {bad[0]['error']}")
        g = torch.Generator().manual_seed(cfg.seed)
        norms = {n: p.detach() for n, p in model.named_parameters() if is_norm_param(n)}
        async with grpc.aio.insecure_channel(self.coordinator.address) as ch:
            stub = rpc.FederationStub(ch)
            for u in range(cfg.users):
                blob = encode_adapter({n: p + 0.1 * torch.randn(p.shape, generator=g) for n, p in norms.items()})
                user = f"user-{u:04d}"
                reply = await stub.PutUser(pb.PutUserRequest(user_id=user, adapter=pb.Adapter(
                    data=blob, sha256=hashlib.sha256(blob).digest())), metadata=bearer_metadata(self.admin_token))
                self.tokens[user] = reply.token
                await stub.AssignUser(pb.AssignUserRequest(user_id=user, node_id=f"load-{u % cfg.nodes:03d}"),
                                      metadata=bearer_metadata(self.admin_token))

    async def stop(self) -> None:
        """Stop the nodes and the coordinator; remove the temporary files."""
        if self.host is not None:
            await self.host.stop()
            self.host = None
        if self.handle is not None:
            await self.handle.stop()
            self.handle = None
        self.tmp.cleanup()

    def _request(self, stub: rpc.FederationStub, i: int, kind: str):
        """The i-th request: a user (in turn) scoring or generating with their own token."""
        users = sorted(self.tokens)
        user = users[i % len(users)]
        text, meta, timeout = self.texts[i % len(self.texts)], bearer_metadata(self.tokens[user]), self.cfg.timeout_s
        if kind == "generate" or (kind == "mixed" and i % 4 == 3):
            request = pb.GenerateRequest(user_id=user, prompt=text, max_new_tokens=self.cfg.generate_tokens,
                                         temperature=0.8, top_k=20, seed=i)

            async def stream():
                return [c async for c in stub.Generate(request, metadata=meta, timeout=timeout)]
            return stream()
        return stub.Score(pb.ScoreRequest(user_id=user, text=text, omit_token_strings=True), metadata=meta,
                          timeout=timeout)

    @property
    def coordinator(self) -> CoordinatorHandle:
        """The running coordinator; an error outside ``async with``."""
        if self.handle is None:
            raise RuntimeError("the load rig's coordinator is not running")
        return self.handle

    async def stats(self) -> pb.Stats:
        """The coordinator's own counters."""
        async with grpc.aio.insecure_channel(self.coordinator.address) as ch:
            return await rpc.FederationStub(ch).GetStats(pb.GetStatsRequest(),
                                                         metadata=bearer_metadata(self.admin_token))

    async def alive(self) -> bool:
        """A health check and a valid request both succeed."""
        async with grpc.aio.insecure_channel(self.coordinator.address) as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            user = sorted(self.tokens)[0]
            reply = await rpc.FederationStub(ch).Score(pb.ScoreRequest(user_id=user, text=self.texts[0]),
                                                       metadata=bearer_metadata(self.tokens[user]), timeout=30)
        serving = health.status == health_pb2.HealthCheckResponse.SERVING
        return serving and len(reply.logprobs) == self.cfg.text_words - 1

    async def drive(self, clients: int | None = None, requests: int | None = None, kind: str | None = None) -> dict:
        """Put the load on (the config's, or these overrides) and report what happened."""
        clients, requests = clients or self.cfg.clients, requests or self.cfg.requests
        kind = kind or self.cfg.kind
        before = await self.stats()
        tickets = iter(range(requests))
        latencies: list[float] = []
        codes: dict[str, int] = {}
        t0 = time.perf_counter()

        async def client() -> None:
            async with grpc.aio.insecure_channel(self.coordinator.address) as ch:
                stub = rpc.FederationStub(ch)
                for i in tickets:  # a shared iterator: each request is sent exactly once
                    if time.perf_counter() - t0 > self.cfg.max_seconds:
                        return
                    t = time.perf_counter()
                    try:
                        await self._request(stub, i, kind)
                        latencies.append(time.perf_counter() - t)
                        code = "OK"
                    except grpc.aio.AioRpcError as err:
                        code = err.code().name
                    codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
        after = await self.stats()
        sent = sum(codes.values())
        shed = codes.get("RESOURCE_EXHAUSTED", 0)
        return {
            "clients": clients, "requests": sent, "kind": kind, "cap": self.cfg.cap, "nodes": self.cfg.nodes,
            "users": self.cfg.users, "wall_s": round(wall, 3), "ok": codes.get("OK", 0), "shed": shed,
            "errors": sent - codes.get("OK", 0) - shed,
            "codes": dict(sorted(codes.items())),
            "throughput_rps": round(codes.get("OK", 0) / wall, 2), "offered_rps": round(sent / wall, 2),
            "latency_ok": percentiles(latencies),
            # the coordinator's counts; its count of OK excludes the GetStats call that took ``before``
            "coordinator": {"requests_ok": after.requests_ok - before.requests_ok - 1,
                            "requests_failed": after.requests_failed - before.requests_failed,
                            "requests_shed": after.requests_shed - before.requests_shed,
                            "bytes": after.bytes_total - before.bytes_total},
            "stopped_early": sent < requests,
            "alive_after": await self.alive(),
        }


async def run_load(cfg: LoadConfig) -> dict:
    """Start a rig for ``cfg``, warm it up (one request per user, not counted), drive it, stop it."""
    async with LoadRig(cfg) as rig:
        await rig.drive(clients=min(cfg.clients, cfg.users, cfg.cap), requests=cfg.users)
        result = await rig.drive()
        result["setup_s"] = round(rig.setup_s, 2)
        result["preset"], result["expert_codec"] = cfg.preset, cfg.expert_codec
        return result


def summary_line(result: dict) -> str:
    """One line for people: throughput, latency, errors and shed requests of a drive."""
    lat = result["latency_ok"]
    r = result
    return (f"{r['requests']} {r['kind']} requests from {r['clients']} clients over {r['nodes']} nodes in "
            f"{r['wall_s']:.1f} s: {r['throughput_rps']:.1f} ok/s, p50 {lat.get('p50_ms', 0):.1f} ms, "
            f"p99 {lat.get('p99_ms', 0):.1f} ms; {r['errors']} errors, {r['shed']} shed (cap {r['cap']}); "
            f"server {'alive' if r['alive_after'] else 'NOT ANSWERING'} afterwards")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    ap = argparse.ArgumentParser(prog="python -m sim.loadtest", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    d = LoadConfig()
    ap.add_argument("--clients", type=int, default=d.clients, help=f"concurrent clients (default {d.clients})")
    ap.add_argument("--requests", type=int, default=d.requests, help=f"requests in all (default {d.requests})")
    ap.add_argument("--nodes", type=int, default=d.nodes, help=f"nodes serving (default {d.nodes})")
    ap.add_argument("--users", type=int, default=d.users, help=f"users with adapters (default {d.users})")
    ap.add_argument("--cap", type=int, default=d.cap, help=f"coordinator's concurrent-RPC cap (default {d.cap})")
    ap.add_argument("--kind", choices=KINDS, default=d.kind, help=f"request mix (default {d.kind})")
    ap.add_argument("--text-words", type=int, default=d.text_words,
                    help=f"tokens per scored text (default {d.text_words})")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=d.preset, help=f"model shape (default {d.preset})")
    ap.add_argument("--codec", default=d.expert_codec, help=f"expert codec of the bundle (default {d.expert_codec})")
    ap.add_argument("--max-seconds", type=float, default=d.max_seconds,
                    help=f"stop taking new requests after this long (default {d.max_seconds:.0f})")
    ap.add_argument("--seed", type=int, default=d.seed, help=f"seed of weights, texts and adapters (default {d.seed})")
    ap.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m sim.loadtest`."""
    args = parse_args(argv)
    try:
        cfg = LoadConfig(clients=args.clients, requests=args.requests, nodes=args.nodes, users=args.users, cap=args.cap,
                         kind=args.kind, text_words=args.text_words, preset=args.preset, expert_codec=args.codec,
                         max_seconds=args.max_seconds, seed=args.seed)
        torch.set_num_threads(1)
        result = asyncio.run(run_load(cfg))
    except LoadTestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(summary_line(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["errors"] == 0 and result["alive_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
