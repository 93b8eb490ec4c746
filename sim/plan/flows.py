"""A discrete-event engine of fluid transfers, for thousands of schools: the network model's rules, at scale.

The rules are :mod:`sim.network`'s, not a copy of them: a transfer first pays its path's round trip
(the sum of its endpoints' RTTs, the coordinator's 0), then shares every resource it crosses (the
coordinator's egress, a school's up or down link) max-min fairly with the transfers active at the same
time, the rates computed by :func:`sim.network.max_min_rates` itself. What changes is the bookkeeping,
so that 10,000 schools stay cheap:

* events (a transfer becoming active, a transfer finishing, a callback) sit in a ``heapq`` in virtual
  time; a finish event carries the flow's version and is dropped when its rates changed since;
* a start or finish recomputes rates only in its *component*: the transfers linked to it through shared
  resources (a relay school's uploads share its uplink; every coordinator transfer shares the egress);
* a *group* of ``weight`` identical transfers (same bytes, start, path and link profile; each to its own
  school) is one flow of that weight (``max_min_rates``' ``weights``) crossing a private down-link
  resource of ``weight`` times one school's capacity.

Units: bits per second, bytes, virtual seconds (as sim.network).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ..network import max_min_rates

EGRESS = "egress"
_EPS = 1e-9  # seconds: events closer than this are simultaneous
_REL = 1e-12  # a rate that moved less than this (relative) is float noise of the water-filling: kept


@dataclass(kw_only=True, eq=False)
class Flow:
    """One transfer (or a group of ``weight`` identical ones) through the engine."""

    id: int
    resources: tuple[str, ...]
    nbytes: float  # per member of the group
    weight: int
    submit_s: float
    active_s: float
    on_done: Callable[[Flow], None] | None
    meta: dict = field(default_factory=dict)
    bits_left: float = 0.0
    rate: float = 0.0  # bits/s per member
    last_s: float = 0.0
    version: int = 0
    end_s: float = math.nan


class FlowEngine:
    """Fluid transfers on shared resources in virtual time (see the module docstring)."""

    def __init__(self, egress_bps: float) -> None:
        if not egress_bps > 0:
            raise ValueError(f"egress_bps must be > 0, got {egress_bps!r}")
        self.capacity: dict[str, float] = {EGRESS: float(egress_bps)}
        self.now = 0.0
        self.events = 0  # events processed (activations, finishes, callbacks)
        self.egress_series: list[tuple[float, float]] = [(0.0, 0.0)]  # (t, egress bits/s) at each change
        self._heap: list[tuple[float, int, int, object, int]] = []  # (t, seq, kind, payload, version)
        self._seq = itertools.count()
        self._flows: dict[int, Flow] = {}  # active flows
        self._by_res: dict[str, set[int]] = {}
        self._next_id = itertools.count()

    def add_resource(self, name: str, bps: float) -> None:
        """A resource (a school's ``i:up`` or ``i:down``) of ``bps`` bits per second."""
        if not bps > 0:
            raise ValueError(f"{name}: capacity must be > 0, got {bps!r}")
        self.capacity[name] = float(bps)

    def submit(self, resources: tuple[str, ...], nbytes: float, *, rtt_s: float, at: float | None = None,
               weight: int = 1, on_done: Callable[[Flow], None] | None = None, meta: dict | None = None) -> Flow:
        """Request a transfer of ``nbytes`` (each member of a group of ``weight``) at ``at`` (default now)
        across ``resources``; its data flows after ``rtt_s``. ``on_done(flow)`` runs when it ends."""
        at = self.now if at is None else at
        if at < self.now - _EPS:
            raise ValueError(f"transfer requested at {at!r}, before now {self.now!r}")
        for r in resources:
            if r not in self.capacity:
                raise ValueError(f"unknown resource {r!r}")
        flow = Flow(id=next(self._next_id), resources=tuple(resources), nbytes=float(nbytes), weight=int(weight),
                    submit_s=at, active_s=at + rtt_s, on_done=on_done, meta=dict(meta or {}),
                    bits_left=8.0 * float(nbytes))
        self._push(flow.active_s, 0, flow, 0)
        return flow

    def call_at(self, t: float, fn: Callable[[], None]) -> None:
        """Run ``fn()`` at virtual time ``t`` (not before now)."""
        self._push(max(t, self.now), 2, fn, 0)

    def _push(self, t: float, kind: int, payload: object, version: int) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, payload, version))

    def run(self, until: float = math.inf) -> None:
        """Process events in time order up to ``until`` (all of them by default)."""
        heap = self._heap
        while heap and heap[0][0] <= until:
            t, _, kind, payload, version = heapq.heappop(heap)
            if kind == 1:
                flow = payload
                assert isinstance(flow, Flow)
                if flow.version != version or flow.id not in self._flows:
                    continue  # its rates changed since this finish was predicted
                self.now = max(self.now, t)
                self.events += 1
                self._finish(flow)
            elif kind == 0:
                flow = payload
                assert isinstance(flow, Flow)
                self.now = max(self.now, t)
                self.events += 1
                self._activate(flow)
            else:
                self.now = max(self.now, t)
                self.events += 1
                payload()  # type: ignore[operator]

    def _activate(self, flow: Flow) -> None:
        flow.last_s = self.now
        self._flows[flow.id] = flow
        for r in flow.resources:
            self._by_res.setdefault(r, set()).add(flow.id)
        if flow.bits_left <= 0:
            self._finish(flow)
            return
        self._recompute(flow.resources)

    def _finish(self, flow: Flow) -> None:
        del self._flows[flow.id]
        for r in flow.resources:
            users = self._by_res[r]
            users.discard(flow.id)
            if not users:
                del self._by_res[r]
        flow.bits_left, flow.end_s = 0.0, self.now
        self._recompute(flow.resources)
        if flow.on_done is not None:
            flow.on_done(flow)

    def _component(self, resources: tuple[str, ...]) -> list[Flow]:
        """Active flows linked to ``resources`` through shared resources, in id order."""
        seen_res: set[str] = set()
        found: set[int] = set()
        stack = list(resources)
        while stack:
            r = stack.pop()
            if r in seen_res:
                continue
            seen_res.add(r)
            for fid in self._by_res.get(r, ()):
                if fid not in found:
                    found.add(fid)
                    stack.extend(self._flows[fid].resources)
        return [self._flows[f] for f in sorted(found)]

    def _recompute(self, resources: tuple[str, ...]) -> None:
        comp = self._component(resources)
        now = self.now
        if comp:
            rates = max_min_rates({f.id: f.resources for f in comp},
                                  {r: self.capacity[r] for f in comp for r in f.resources},
                                  {f.id: f.weight for f in comp if f.weight != 1})
            for f in comp:
                f.bits_left = max(0.0, f.bits_left - f.rate * (now - f.last_s))
                f.last_s = now
                new = rates[f.id]
                if f.version == 0 or abs(new - f.rate) > _REL * new:
                    f.rate = new
                    f.version += 1
                    self._push(now + f.bits_left / new, 1, f, f.version)
        if EGRESS in resources or any(EGRESS in f.resources for f in comp):
            total = sum(self._flows[i].rate * self._flows[i].weight for i in self._by_res.get(EGRESS, ()))
            if self.egress_series[-1][0] == now:
                self.egress_series[-1] = (now, total)
            elif total != self.egress_series[-1][1]:
                self.egress_series.append((now, total))
