"""What a fault run is set to and what it compares: its settings, the users' probes and their answers.

Shared by the other modules of `sim.faults`; imports nothing of the federation.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


class FaultError(RuntimeError):
    """Fault injection could not run as asked (bad settings, or a federation it cannot work on)."""


@dataclass(frozen=True, kw_only=True)
class FaultSettings:
    """How faults are driven and checked (the scenario's ``[faults]`` says which faults)."""

    tolerance: float = 1e-4  # largest per-token log-prob difference from the pre-fault answer
    attempts: int = 8  # per request, the first one included
    backoff_s: float = 0.2  # pause after the first failure, doubled after each
    max_backoff_s: float = 2.0
    request_timeout_s: float = 30.0  # per attempt; propagated to the coordinator, which bounds its node calls by it
    requests_after_fault: int = 2  # requests of every probe started after a fault, and answered, before the next
    generate_tokens: int = 8
    score_chars: int = 600
    chunks_per_bundle: int = 32  # the faulty links ask for chunks this fine, to cut mid-bundle
    max_refetch: int = 3  # corruptions a node tolerates per bundle (the FetchPolicy's)
    wait_s: float = 120.0  # bound on every wait for the federation to settle

    def __post_init__(self) -> None:
        checks = [(self.tolerance > 0, "tolerance must be > 0"), (self.attempts >= 1, "attempts must be >= 1"),
                  (self.backoff_s >= 0 and self.max_backoff_s >= self.backoff_s, "backoffs must be 0 <= first <= max"),
                  (self.request_timeout_s > 0, "request_timeout_s must be > 0"),
                  (self.requests_after_fault >= 1, "requests_after_fault must be >= 1"),
                  (1 <= self.generate_tokens <= 64, "generate_tokens must be 1..64"),
                  (self.score_chars >= 50, "score_chars must be >= 50"),
                  (self.chunks_per_bundle >= 2, "chunks_per_bundle must be >= 2"),
                  (self.max_refetch >= 0, "max_refetch must be >= 0"), (self.wait_s > 0, "wait_s must be > 0")]
        for ok, message in checks:
            if not ok:
                raise FaultError(f"fault settings: {message}")


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    t0 = time.monotonic()
    while True:
        if await predicate():
            return True
        if time.monotonic() - t0 > timeout:
            return False
        await asyncio.sleep(interval)


@dataclass(frozen=True)
class Probe:
    """One request a user keeps making: scoring a fixed text, or greedy generation from a prompt."""

    kind: str  # "score" or "generate"
    user: str  # "" for the admin scoring on the base model
    text: str


@dataclass(frozen=True)
class Answer:
    """What came back: the serving node, the model label, the token ids and their log-probs."""

    node: str
    model: str
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    failed_over: bool = False


def answer_diff(got: Answer, want: Answer) -> float:
    """Largest per-token log-prob difference; infinite when the tokens or the model label differ."""
    if got.tokens != want.tokens or got.model != want.model or len(got.logprobs) != len(want.logprobs):
        return math.inf
    return max((abs(a - b) for a, b in zip(got.logprobs, want.logprobs)), default=0.0)

