"""Serving a request with part of the experts installed: what a miss costs under each policy, in virtual time.

A request is a prefill step over its prompt, then one step per further token; each step runs the blocks in
order and needs, in each block, the experts its tokens route to. A use is a *hit* when its expert was
prefetched and had arrived by the time its block ran (a prefetch that arrives late is a miss, and so is
an expert fetched on demand earlier in the same request). On a miss:

* ``wait``: block until the expert is there: a prefetched one still in flight is waited for, any other is
  fetched on demand; the stall is virtual time, and the fetched expert stays installed.
* ``substitute``: run the installed expert the router scores highest instead (``model.serving(available=...)``);
  no time is lost, the cost is in perplexity (``quality.segmented_substitution_ppl``). A block with no
  expert installed at all waits for its first one, having nothing to substitute with.
* ``remote``: send the tokens' hidden states (d_model floats each) to a node that holds the expert and get
  its output back; bytes both ways are counted, and the round trip is virtual time.
* ``auto``: per request, whichever of ``wait`` and ``remote`` finishes the request sooner (both are exact;
  ``substitute`` is left out because it buys time with quality). The choice is made with hindsight, so it
  is an upper bound on what a planner deciding from predictions alone would get.

Times come from the network model as plain numbers or callables (``link_time``, ``remote_time``, or
``sim.network.TransferSimulator.fetch_fn``), so this module knows no simulator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

POLICIES = ("wait", "substitute", "remote", "auto")

# (nbytes, at_s) -> when the transfer ends, in virtual seconds
TransferTime = Callable[[int, float], float]


class PolicyError(ValueError):
    """An unknown miss policy or malformed request inputs."""


def link_time(*, rtt_s: float, bps: float) -> TransferTime:
    """On-demand transfer on an otherwise idle link: one round trip, then the bytes at ``bps`` bits/s."""
    def end(nbytes: int, at: float) -> float:
        return at + rtt_s + 8 * nbytes / bps
    return end


def remote_time(*, rtt_s: float, up_bps: float, down_bps: float) -> TransferTime:
    """A remote expert call: ``nbytes`` up to the holder and ``nbytes`` of output back, one round trip.

    ``rtt_s`` is the path's (both nodes' RTTs for a peer); store and forward, so the two directions add up.
    """
    def end(nbytes: int, at: float) -> float:
        return at + rtt_s + 8 * nbytes / up_bps + 8 * nbytes / down_bps
    return end


def stream_arrivals(order: Sequence[tuple[int, int]], sizes: np.ndarray, at: float, *, rtt_s: float,
                    bps: float) -> np.ndarray:
    """When each expert arrives when ``order`` is shipped back to back on one idle stream from ``at``.

    Returns (L, E) virtual seconds, inf where not shipped. The simulator's ``sim.network.expert_arrivals``
    is the same with the coordinator's egress shared among nodes.
    """
    sizes = np.asarray(sizes)
    arrival = np.full(sizes.shape, np.inf)  # (L, E)
    if order:
        idx = tuple(np.array(order).T)
        arrival[idx] = at + rtt_s + 8 * np.cumsum(sizes[idx]) / bps
    return arrival


# (first token, end token, installed mask (L, E)): the experts a run of steps was served with
Segment = tuple[int, int, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class RequestOutcome:
    """How a request went under one miss policy."""

    policy: str  # the policy applied ("auto" reports the one it chose)
    uses: int  # (token, block) expert uses
    hits: int  # uses whose expert had been prefetched and had arrived in time
    stall_s: float  # virtual seconds spent waiting for experts or remote calls
    ttft_s: float  # from the request's arrival to the end of its prefill step
    end_s: float  # virtual time the request finished
    fetched_bytes: int  # experts fetched on demand
    remote_bytes: int  # hidden states sent plus outputs received (remote)
    substituted: int  # uses served by another expert (substitute)
    fetches: tuple[tuple[int, int, int, float, float], ...]  # (block, expert, bytes, start, end) on demand
    remote_calls: tuple[tuple[int, int, float, float], ...]  # (block, bytes each way, start, end)
    segments: tuple[Segment, ...]  # substitute only: which experts served which tokens

    @property
    def hit_rate(self) -> float:
        """Share of expert uses that found their expert prefetched and arrived in time."""
        return self.hits / self.uses if self.uses else 1.0


def _steps(T: int, prompt_len: int) -> list[slice]:
    return [slice(0, prompt_len)] + [slice(t, t + 1) for t in range(prompt_len, T)]


class _Serving:
    """The mutable state of one request being served: the clock, installed experts and the tallies."""

    def __init__(self, mask: np.ndarray, arrival_s: np.ndarray, sizes: np.ndarray, start_s: float,
                 fetch: TransferTime | None) -> None:
        self.prefetched = np.where(mask, np.asarray(arrival_s, dtype=np.float64), np.inf)  # (L, E)
        self.ready = self.prefetched.copy()  # (L, E) when each expert is installed, on-demand ones included
        self.sizes = np.asarray(sizes)
        self.fetch = fetch
        self.now = float(start_s)
        self.stall = 0.0
        self.fetched = 0
        self.fetches: list[tuple[int, int, int, float, float]] = []

    def wait_until(self, t: float) -> None:
        if t > self.now:
            self.stall += t - self.now
            self.now = t

    def fetch_on_demand(self, b: int, experts: np.ndarray) -> float:
        """Fetch ``experts`` of block ``b`` in one transfer from now; returns when they are installed."""
        if self.fetch is None:
            raise PolicyError("an on-demand fetch is needed but no fetch time was given")
        nbytes = int(self.sizes[b, experts].sum())
        end = float(self.fetch(nbytes, self.now))
        self.ready[b, experts] = end
        self.fetched += nbytes
        self.fetches.extend((b, int(e), int(self.sizes[b, e]), self.now, end) for e in experts)
        return end


def simulate_request(routes: np.ndarray, mask: np.ndarray, arrival_s: np.ndarray, *, policy: str,
                     sizes: np.ndarray, start_s: float = 0.0, prompt_len: int = 1, step_s: float = 0.0,
                     fetch: TransferTime | None = None, remote: TransferTime | None = None,
                     activation_bytes: int = 0) -> RequestOutcome:
    """Walk one request through its steps and blocks under a miss ``policy`` (see the module docstring).

    ``routes`` (L, T) the experts the full model uses; ``mask`` (L, E) the shipped experts, which arrive at
    ``arrival_s`` (L, E) (-inf: installed before the request); ``sizes`` (L, E) bytes for on-demand fetches.
    ``prompt_len`` tokens form the prefill step; ``step_s`` is compute time per step. ``fetch`` times
    on-demand fetches, ``remote`` remote calls of ``activation_bytes`` per token each way. Under
    ``substitute`` a block with nothing installed yet waits for its first expert (there is nothing to
    substitute with); the outcome's ``segments`` say which experts served which tokens.
    """
    if policy not in POLICIES:
        raise PolicyError(f"unknown miss policy {policy!r}; choose one of {', '.join(POLICIES)}")
    routes = np.asarray(routes)
    mask = np.asarray(mask, dtype=bool)
    L, T = routes.shape
    if mask.shape[0] != L or np.shape(arrival_s) != mask.shape or np.shape(sizes) != mask.shape:
        raise PolicyError(f"mask, arrival_s and sizes must be (L={L}, E), got {mask.shape}, "
                          f"{np.shape(arrival_s)}, {np.shape(sizes)}")
    if not 1 <= prompt_len <= T:
        raise PolicyError(f"prompt_len must be in [1, {T}], got {prompt_len}")
    if policy in ("wait", "auto") and fetch is None:
        raise PolicyError(f"policy {policy!r} needs a fetch time")
    if policy in ("remote", "auto") and remote is None:
        raise PolicyError(f"policy {policy!r} needs a remote time")
    if policy == "auto":
        runs = [simulate_request(routes, mask, arrival_s, policy=p, sizes=sizes, start_s=start_s,
                                 prompt_len=prompt_len, step_s=step_s, fetch=fetch, remote=remote,
                                 activation_bytes=activation_bytes) for p in ("wait", "remote")]
        return min(runs, key=lambda r: r.end_s)  # ties go to wait, which ships no hidden state

    st = _Serving(mask, arrival_s, sizes, start_s, fetch)
    uses = hits = substituted = remote_bytes = 0
    ttft = 0.0
    segments: list[Segment] = []
    calls: list[tuple[int, int, float, float]] = []
    for i, step in enumerate(_steps(T, prompt_len)):
        served = np.zeros(mask.shape, dtype=bool)  # (L, E) installed when each block ran
        for b in range(L):
            experts, counts = np.unique(routes[b, step], return_counts=True)
            uses += int(counts.sum())
            hits += int(counts[st.prefetched[b, experts] <= st.now].sum())
            late = st.ready[b, experts] > st.now  # (k,)
            if policy == "substitute":
                if not (st.ready[b] <= st.now).any():  # nothing to substitute with: wait for the first one
                    first = st.ready[b].min()
                    if math.isinf(first):
                        first = st.fetch_on_demand(b, experts[np.argmax(counts)][None])
                    st.wait_until(first)
                    late = st.ready[b, experts] > st.now
                substituted += int(counts[late].sum())
                served[b] = st.ready[b] <= st.now
                continue
            if not late.any():
                continue
            missing = experts[late]
            if policy == "remote":
                assert remote is not None  # checked on entry: the remote policy needs a remote time
                nbytes = int(counts[late].sum()) * activation_bytes
                end = float(remote(nbytes, st.now))
                calls.append((b, nbytes, st.now, end))
                st.wait_until(end)
                remote_bytes += 2 * nbytes
                continue
            in_flight = mask[b, missing]
            done = float(st.ready[b, missing[in_flight]].max(initial=st.now))
            if (~in_flight).any():
                done = max(done, st.fetch_on_demand(b, missing[~in_flight]))
            st.wait_until(done)
        if policy == "substitute":
            if segments and np.array_equal(segments[-1][2], served):
                segments[-1] = (segments[-1][0], step.stop, served)
            else:
                segments.append((step.start, step.stop, served))
        st.now += step_s
        if i == 0:
            ttft = st.now - start_s
    return RequestOutcome(policy=policy, uses=uses, hits=hits, stall_s=st.stall, ttft_s=ttft, end_s=st.now,
                          fetched_bytes=st.fetched, remote_bytes=remote_bytes, substituted=substituted,
                          fetches=tuple(st.fetches), remote_calls=tuple(calls),
                          segments=tuple(segments))
