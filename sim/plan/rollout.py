"""Model rollouts: a new bundle, then the users' adapters for it, to every school; star or peer relay.

**Star**: every school fetches from the coordinator, as ``sim.run`` ships (:mod:`sim.shipping`): one
stream per school, the bundle then its users' adapters chained behind it (no second round trip), all
schools at once (or ``star_streams`` at a time), sharing the coordinator's egress.

**Relay** (a greedy swarm of whole bundles): each school's adapters are private to its users, so they
come from the coordinator first, all schools at once (a few KB each); then the coordinator serves the
bundle to ``relay_seeds`` schools at a time, and a school that holds it serves it to up to
``relay_fanout`` others at once from its uplink (if that uplink is at least ``relay_min_up_mbps``: a
copy over ADSL's 0.8 Mbit/s takes minutes, while faster relays free up in seconds). A waiting school
takes a free coordinator stream if there is one, else the free peer slot with the fastest uplink;
waiting schools are served fastest uplink first, so good uploaders become relays early. Bundles are
relayed whole (store and forward): a school relays only what it has verified.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from .flows import EGRESS, Flow, FlowEngine
from .population import Population


@dataclass(kw_only=True)
class Rollout:
    """One rollout's outcome; times in virtual seconds after its start."""

    mode: str
    bundle_s: np.ndarray  # (S,) when each school holds the bundle
    done_s: np.ndarray  # (S,) when it also holds its users' adapters
    source: np.ndarray  # (S,) where its bundle came from: -1 the coordinator, else the school
    up_bytes: np.ndarray  # (S,) bytes each school uploaded to peers
    egress_bytes: float = 0.0  # bytes the coordinator sent
    events: int = 0
    egress_series: list[tuple[float, float]] = field(default_factory=list)  # (t, bits/s) at each change

    @property
    def makespan_s(self) -> float:
        """When the last school is done."""
        return float(self.done_s.max()) if len(self.done_s) else 0.0

    def egress_bits_between(self, t0: float, t1: float) -> float:
        """Bits the coordinator sent for this rollout between ``t0`` and ``t1`` (seconds after its start)."""
        total = 0.0
        series = self.egress_series
        for (ta, rate), (tb, _) in zip(series, series[1:] + [(np.inf, 0.0)]):
            lo, hi = max(ta, t0), min(tb, t1)
            if hi > lo and rate > 0:
                total += rate * (hi - lo)
        return total


def _result(mode: str, n: int) -> Rollout:
    return Rollout(mode=mode, bundle_s=np.full(n, np.nan), done_s=np.full(n, np.nan), source=np.full(n, -1),
                   up_bytes=np.zeros(n))


def _school_resources(engine: FlowEngine, pop: Population) -> None:
    for i, (up, down) in enumerate(zip(pop.up_bps, pop.down_bps)):
        engine.add_resource(f"{i}:up", up)
        engine.add_resource(f"{i}:down", down)


def star(pop: Population, bundle_bytes: np.ndarray, adapter_bytes: np.ndarray, *, egress_bps: float,
         streams: int = 0) -> Rollout:
    """Every school from the coordinator: bundle then adapters on one stream, ``streams`` schools at a
    time (0: all at once, identical schools grouped into one weighted flow)."""
    n = pop.schools
    res = _result("star", n)
    engine = FlowEngine(egress_bps)
    rtt, down = pop.rtt_s, pop.down_bps

    def chain_adapters(members: np.ndarray, flow: Flow) -> None:
        res.bundle_s[members] = flow.end_s
        # the adapters follow on the same stream, with no round trip; grouped by their size
        for size in np.unique(adapter_bytes[members]):
            group = members[adapter_bytes[members] == size]
            done = (lambda g: lambda f: res.done_s.__setitem__(g, f.end_s))(group)
            if size == 0:
                res.done_s[group] = flow.end_s
                continue
            engine.submit(_group_path(engine, group, down), size, rtt_s=0.0, weight=len(group), on_done=done)

    if streams == 0:
        keys = np.stack([pop.school_link, bundle_bytes]).T
        for key in np.unique(keys, axis=0):
            members = np.flatnonzero((keys == key).all(axis=1))
            i = members[0]
            engine.submit(_group_path(engine, members, down), bundle_bytes[i], rtt_s=rtt[i], weight=len(members),
                          on_done=(lambda m: lambda f: chain_adapters(m, f))(members))
    else:
        _school_resources(engine, pop)
        queue = deque(range(n))

        def start_next() -> None:
            if queue:
                i = queue.popleft()
                engine.submit((EGRESS, f"{i}:down"), bundle_bytes[i], rtt_s=rtt[i],
                              on_done=partial(after_bundle, i))

        def after_bundle(i: int, f: Flow) -> None:
            res.bundle_s[i] = f.end_s
            engine.submit((EGRESS, f"{i}:down"), adapter_bytes[i], rtt_s=0.0, on_done=partial(finish, i))

        def finish(i: int, f: Flow) -> None:
            res.done_s[i] = f.end_s
            start_next()

        for _ in range(min(streams, n)):
            start_next()
    engine.run()
    res.egress_bytes = float(bundle_bytes.sum() + adapter_bytes.sum())
    res.events, res.egress_series = engine.events, engine.egress_series
    return res


def _group_path(engine: FlowEngine, members: np.ndarray, down: np.ndarray) -> tuple[str, ...]:
    """Egress and a private down link of ``len(members)`` schools' capacity (members share a link profile)."""
    name = f"group-{int(members[0])}-{len(members)}:down"
    engine.add_resource(name, float(down[members[0]]) * len(members))
    return (EGRESS, name)


def relay(pop: Population, bundle_bytes: np.ndarray, adapter_bytes: np.ndarray, *, egress_bps: float,
          seeds: int, fanout: int, min_up_bps: float = 0.0) -> Rollout:
    """Peer relay: ``seeds`` coordinator streams, ``fanout`` uploads per school holding the bundle (schools
    with an uplink under ``min_up_bps`` do not relay).

    Each school's adapters (private to its users, so never relayed) come first, from the coordinator,
    all schools at once as in a star; a school queues for the bundle once they are in.
    """
    n = pop.schools
    res = _result("relay", n)
    engine = FlowEngine(egress_bps)
    _school_resources(engine, pop)
    rtt, up, down = pop.rtt_s, pop.up_bps, pop.down_bps
    waiting: list[tuple[float, int]] = []  # (-uplink, school): ready for the bundle, fastest uplink first
    free = {"coordinator": seeds}
    peer_slots: list[tuple[float, int]] = []  # (-uplink, school): a free upload slot
    adapters_s = np.zeros(n)

    def dispatch() -> None:
        while waiting and (free["coordinator"] > 0 or peer_slots):
            _, i = heapq.heappop(waiting)
            if free["coordinator"] > 0:
                free["coordinator"] -= 1
                engine.submit((EGRESS, f"{i}:down"), bundle_bytes[i], rtt_s=rtt[i],
                              on_done=partial(got_bundle, i, -1))
            else:
                _, p = heapq.heappop(peer_slots)
                engine.submit((f"{p}:up", f"{i}:down"), bundle_bytes[i], rtt_s=rtt[i] + rtt[p],
                              on_done=partial(got_bundle, i, p))

    def got_bundle(i: int, parent: int, f: Flow) -> None:
        res.bundle_s[i], res.source[i] = f.end_s, parent
        res.done_s[i] = max(f.end_s, adapters_s[i])
        if parent < 0:
            free["coordinator"] += 1
        else:
            res.up_bytes[parent] += bundle_bytes[i]
            heapq.heappush(peer_slots, (-up[parent], parent))
        if up[i] >= min_up_bps:
            for _ in range(fanout):
                heapq.heappush(peer_slots, (-up[i], i))
        dispatch()

    def ready(group: np.ndarray, t: float) -> None:
        adapters_s[group] = t
        for i in group:
            heapq.heappush(waiting, (-up[i], int(i)))
        dispatch()

    keys = np.stack([pop.school_link, adapter_bytes]).T
    for key in np.unique(keys, axis=0):
        members = np.flatnonzero((keys == key).all(axis=1))
        if adapter_bytes[members[0]] == 0:
            engine.call_at(0.0, (lambda m: lambda: ready(m, 0.0))(members))
            continue
        engine.submit(_group_path(engine, members, down), adapter_bytes[members[0]], rtt_s=rtt[members[0]],
                      weight=len(members), on_done=(lambda m: lambda f: ready(m, f.end_s))(members))
    engine.run()
    res.egress_bytes = float(bundle_bytes[res.source < 0].sum() + adapter_bytes.sum())
    res.events, res.egress_series = engine.events, engine.egress_series
    return res
