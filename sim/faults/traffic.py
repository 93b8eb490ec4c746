"""The users' requests during faults: :class:`UserTraffic` sends them over and over, retries them
as a user's client would, and checks each answer against the one given before any fault."""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable

import grpc

from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as rpc

from ..federation import CHANNEL_OPTIONS, LocalFederation
from .settings import Answer, FaultError, FaultSettings, Probe, answer_diff, until

# A client that outlives a coordinator restart must find it again within a second, not after
# gRPC's default reconnect backoff (which grows to two minutes).
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]
# What a user's client retries: a node or the coordinator going away, or load shedding.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN}


def summarise_requests(records: list[dict]) -> dict:
    """Counts over request records (one per logical request, retries inside it)."""
    codes = collections.Counter(c for r in records for c in r["codes"])
    diffs = [r["diff"] for r in records if r["ok"] and math.isfinite(r["diff"])]
    return {
        "requests": len(records),
        "requests_failed": sum(bool(r["codes"]) for r in records),  # saw at least one error
        "requests_retried": sum(r["attempts"] - 1 for r in records),  # extra attempts made
        "requests_unanswered": sum(not r["ok"] for r in records),  # no answer after every attempt
        "wrong_answers": sum(r["ok"] and r["wrong"] for r in records),
        "failed_over_replies": sum(r.get("failed_over", False) for r in records),
        "max_abs_logprob_diff": max(diffs, default=0.0),
        "max_request_s": round(max((r["t1"] - r["t0"] for r in records), default=0.0), 3),
        "error_codes": dict(sorted(codes.items())),
        "errors": [e for r in records for e in r.get("errors", [])][:5],  # the first few, as the client saw them
    }


class UserTraffic:
    """The users' requests, sent over and over while faults happen, retried, and checked against a baseline.

    It dials the coordinator on its own channel (with a short reconnect backoff), so it outlives
    a coordinator restart on the same port.
    """

    def __init__(self, fed: LocalFederation, probes: list[Probe], settings: FaultSettings, *,
                 concurrency: int, clock: Callable[[], float]) -> None:
        self.fed = fed
        self.probes = probes
        self.settings = settings
        self.clock = clock
        self.sem = asyncio.Semaphore(concurrency)
        self.channel = grpc.aio.insecure_channel(fed.coordinator.address, options=CHANNEL_OPTIONS + RECONNECT_OPTIONS)
        self.stub = rpc.FederationStub(self.channel)
        self.baseline: dict[Probe, Answer] = {}
        self.records: list[dict] = []
        self.inflight: collections.Counter[tuple[str, str]] = collections.Counter()  # (user, kind) -> requests
        self.phase = "baseline"

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    def _metadata(self, user: str) -> tuple[tuple[str, str], ...]:
        return self.fed.token(user)

    async def ask(self, probe: Probe) -> Answer:
        """One attempt at ``probe`` (raises grpc.aio.AioRpcError on failure)."""
        timeout = self.settings.request_timeout_s
        if probe.kind == "score":
            r = await self.stub.Score(pb.ScoreRequest(user_id=probe.user, text=probe.text, omit_token_strings=True),
                                      metadata=self._metadata(probe.user), timeout=timeout)
            return Answer(r.node_id, r.model, tuple(r.token_ids), tuple(r.logprobs), r.failed_over)
        request = pb.GenerateRequest(user_id=probe.user, prompt=probe.text, temperature=0.0,
                                     max_new_tokens=self.settings.generate_tokens)
        chunks = [c async for c in self.stub.Generate(request, metadata=self._metadata(probe.user), timeout=timeout)]
        node = chunks[0].node_id if chunks else ""
        return Answer(node, "greedy", tuple(c.token_id for c in chunks), tuple(c.logprob for c in chunks))

    async def take_baseline(self) -> None:
        """Every probe once, before any fault; FaultError if one fails (nothing to compare with)."""
        for probe in self.probes:
            try:
                self.baseline[probe] = await self.ask(probe)
            except grpc.aio.AioRpcError as exc:
                raise FaultError(f"the pre-fault {probe.kind} request of {probe.user or 'admin'!r} failed: "
                                 f"{exc.code().name}: {exc.details()}") from None

    async def request(self, probe: Probe) -> dict:
        """``probe`` with retries; the record says how it went and how its answer compares."""
        rec = {"phase": self.phase, "kind": probe.kind, "user": probe.user, "t0": self.clock(), "attempts": 0,
               "codes": [], "ok": False, "wrong": False, "diff": math.inf}
        async with self.sem:
            self.inflight[(probe.user, probe.kind)] += 1
            try:
                await self._attempts(probe, rec)
            finally:
                self.inflight[(probe.user, probe.kind)] -= 1
        rec["t1"] = self.clock()
        self.records.append(rec)
        return rec

    async def _attempts(self, probe: Probe, rec: dict) -> None:
        s = self.settings
        for attempt in range(s.attempts):
            rec["attempts"] += 1
            try:
                got = await self.ask(probe)
            except grpc.aio.AioRpcError as exc:
                if not rec["codes"]:
                    rec["phase"] = self.phase  # a failed request counts under the fault it failed in
                rec["codes"].append(exc.code().name)
                rec.setdefault("errors", []).append(f"{probe.kind} {probe.user or 'admin'}: {exc.code().name}: "
                                                    f"{exc.details()}"[:200])
                if exc.code() not in RETRYABLE or attempt + 1 == s.attempts:
                    return
                await asyncio.sleep(min(s.max_backoff_s, s.backoff_s * 2 ** attempt))
                continue
            diff = answer_diff(got, self.baseline[probe])
            rec.update(ok=True, node=got.node, failed_over=got.failed_over, diff=diff, wrong=diff > s.tolerance)
            return

    async def one_round(self) -> list[dict]:
        """Every probe once, concurrently (bounded)."""
        return list(await asyncio.gather(*(self.request(p) for p in self.probes)))

    async def run(self, stop: asyncio.Event) -> None:
        """Every probe over and over, each in its own loop (a slow request holds up only its own
        probe), until ``stop`` is set; requests in progress are finished."""
        async def loop(probe: Probe) -> None:
            while not stop.is_set():
                await self.request(probe)
        await asyncio.gather(*(loop(p) for p in self.probes))

    async def answered_since(self, t: float, n: int, timeout: float) -> bool:
        """Wait until every probe has ``n`` requests started at or after ``t`` finished (False on timeout)."""
        async def enough() -> bool:
            done = collections.Counter((r["user"], r["kind"]) for r in self.records if r["t0"] >= t)
            return all(done[(p.user, p.kind)] >= n for p in self.probes)
        return await until(enough, timeout)
