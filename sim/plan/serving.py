"""Requests in virtual time: arrivals per user and hour, one FIFO compute thread per school, latency.

Each active day, every user sends a Poisson number of requests (their persona's mean), at hours drawn
from the daily profile, a ``workload.burst_share`` of them in class bursts (a class of
``workload.class_size`` users of a school asking within ``workload.burst_window_s`` of one moment);
each request's kind is drawn from the persona's mix, its service time from the
calibration's measured times of that kind (times ``serving.compute_scale``), its bytes are the kind's
calibrated quanta. A request goes to its user's home school, the node holding the adapter.

Each school's node serves one request at a time, first come first served (a node has one compute
thread). Departures follow Lindley's recursion ``D_n = max(A_n, D_{n-1}) + S_n``, which is exactly what
an event loop of arrivals and departures computes for a FIFO queue; it runs vectorised over all
schools at once (a segmented running maximum), so a day of millions of requests costs a few numpy
passes. A request that would wait longer than ``serving.max_wait_s`` at its adapter's node is routed by
the coordinator to another school, served there on the base model (it then waits in that queue).

Latency = queueing + service + the node's path: its RTT, the request down its link and the reply up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .calibration import Calibration
from .config import REQUEST_KINDS, PlanScenario
from .population import Population

DAY_S = 86_400.0


@dataclass(kw_only=True)
class DayServed:
    """One day's requests, served: arrays of one entry per request (times in seconds of the plan)."""

    t: np.ndarray  # arrival
    kind: np.ndarray  # index into REQUEST_KINDS
    home: np.ndarray  # the user's home school
    school: np.ndarray  # the school that served it
    known: np.ndarray  # bool: the user has an adapter
    at_adapter: np.ndarray  # bool: served on the node holding the user's adapter
    wait_s: np.ndarray
    latency_s: np.ndarray
    sent: np.ndarray  # bytes coordinator -> node
    received: np.ndarray  # bytes node -> coordinator


def draw_day(pop: Population, scn: PlanScenario, cal: Calibration, day: int, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One active day's requests, in arrival order: (arrival s, user, kind index, service s)."""
    personas = [scn.personas[p] for p in pop.persona_names]
    w = scn.workload
    rate = np.array([p.requests_per_day for p in personas])[pop.user_persona]
    counts = rng.poisson(rate * (1 - w.burst_share))
    users = np.repeat(np.arange(len(counts)), counts)
    hourly = np.asarray(w.hourly, float)
    hour = rng.choice(24, size=len(users), p=hourly / hourly.sum())
    t = day * DAY_S + 3600.0 * (hour + rng.random(len(users)))
    if w.burst_share > 0:
        bt, bu = _bursts(pop, w, rate, day, rng)
        t, users = np.concatenate([t, bt]), np.concatenate([users, bu])
    mix = np.array([[p.kinds.get(k, 0.0) for k in REQUEST_KINDS] for p in personas])  # (P, K)
    cum = np.cumsum(mix / mix.sum(axis=1, keepdims=True), axis=1)
    u = rng.random(len(users))
    kind = np.minimum((u[:, None] >= cum[pop.user_persona[users]]).sum(axis=1), len(REQUEST_KINDS) - 1)
    service = np.zeros(len(users))
    for k, name in enumerate(REQUEST_KINDS):
        idx = np.flatnonzero(kind == k)
        if len(idx):
            samples = cal.service_samples(name)
            service[idx] = samples[rng.integers(len(samples), size=len(idx))] * scn.serving.compute_scale
    order = np.argsort(t, kind="stable")
    return t[order], users[order], kind[order], service[order]


def _bursts(pop: Population, w, rate: np.ndarray, day: int, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """Class bursts: each class asks a Poisson number of times (burst_share of its members' mean rate),
    at moments drawn from the daily profile; every member sends one request within the burst window."""
    starts, sizes = pop.classes(w.class_size)
    class_rate = np.add.reduceat(rate, starts) / sizes
    k = rng.poisson(class_rate * w.burst_share)
    burst_class = np.repeat(np.arange(len(starts)), k)
    hourly = np.asarray(w.hourly, float)
    moment = day * DAY_S + 3600.0 * (rng.choice(24, size=len(burst_class), p=hourly / hourly.sum())
                                     + rng.random(len(burst_class)))
    n = sizes[burst_class]
    offsets = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    users = np.repeat(starts[burst_class], n) + offsets
    t = np.repeat(moment, n) + w.burst_window_s * rng.random(len(users))
    return t, users


def fifo(school: np.ndarray, a: np.ndarray, s: np.ndarray, free_at: np.ndarray) -> np.ndarray:
    """Departures of FIFO single-server queues, one per school, all at once.

    ``school`` sorted, ``a`` sorted within each school, ``s`` service times, ``free_at[school]`` when each
    server finishes its earlier work. ``D_n = max(A_n, D_{n-1}) + S_n`` as a segmented running maximum:
    ``D_n = C_n + max_{j<=n} (A_j - C_{j-1})`` with C the cumulative service within the school.
    """
    n = len(a)
    if n == 0:
        return np.zeros(0)
    first = np.ones(n, bool)
    first[1:] = school[1:] != school[:-1]
    a_eff = a.copy()
    a_eff[first] = np.maximum(a[first], free_at[school[first]])
    seg = np.cumsum(first) - 1
    cs = np.cumsum(s)
    start = (cs - s)[first]  # cumulative service before each school's first request
    c = cs - start[seg]  # C_n within the school
    v = a_eff - (c - s)
    base = v.min()
    span = float(v.max() - base) + 1.0
    offset = seg * span  # later schools lie above every earlier value: the maximum restarts per school
    m = np.maximum.accumulate(v - base + offset) - offset + base
    return c + m


def _fifo_balking(a: np.ndarray, s: np.ndarray, free_at: float, max_wait: float) -> np.ndarray:
    """One school's queue where a request that would wait more than ``max_wait`` leaves (admitted mask)."""
    admitted = np.ones(len(a), bool)
    d = free_at
    for i in range(len(a)):
        start = max(a[i], d)
        if start - a[i] > max_wait:
            admitted[i] = False
        else:
            d = start + s[i]
    return admitted


def serve_day(pop: Population, scn: PlanScenario, cal: Calibration, day: int, rng: np.random.Generator,
              free_at: np.ndarray) -> DayServed:
    """Draw and serve one active day; ``free_at`` (S,) is updated to when each node is next idle."""
    t, users, kind, service = draw_day(pop, scn, cal, day, rng)
    home = pop.user_school[users]
    known = pop.user_known[users]
    max_wait = scn.serving.max_wait_s
    up = ~_offline(pop, scn, day, rng, t, home)  # requests whose home node is online when they arrive
    order = np.lexsort((t, home))
    order = order[up[order]]
    d = np.empty_like(t)
    d[order] = fifo(home[order], t[order], service[order], free_at)
    wait = np.where(up, d - service - t, 0.0)
    admitted = up.copy()
    for sch in np.unique(home[wait > max_wait]):  # only overloaded schools: re-served with balking
        idx = np.flatnonzero((home == sch) & up)
        idx = idx[np.argsort(t[idx], kind="stable")]
        admitted[idx] = _fifo_balking(t[idx], service[idx], free_at[sch], max_wait)
    school = home.copy()
    moved = np.flatnonzero(~admitted)
    if len(moved):
        if pop.schools > 1:  # another school, uniformly: the coordinator's fallback on the base model
            other = rng.integers(pop.schools - 1, size=len(moved))
            school[moved] = other + (other >= home[moved])
        order = np.lexsort((t, school))
        d[order] = fifo(school[order], t[order], service[order], free_at)
    last = np.full(pop.schools, -np.inf)
    np.maximum.at(last, school, d)
    np.maximum(free_at, last, out=free_at)
    sent = _per_kind(cal.request_sent, kind)
    received = _per_kind(cal.request_received, kind)
    net = pop.rtt_s[school] + 8 * sent / pop.down_bps[school] + 8 * received / pop.up_bps[school]
    return DayServed(t=t, kind=kind, home=home, school=school, known=known, at_adapter=admitted & known,
                     wait_s=np.maximum(d - service - t, 0.0), latency_s=d - t + net, sent=sent, received=received)


def _offline(pop: Population, scn: PlanScenario, day: int, rng: np.random.Generator, t: np.ndarray,
             home: np.ndarray) -> np.ndarray:
    """Whether each request's home node is offline at its arrival (serving.outage_share of schools today)."""
    sv = scn.serving
    if sv.outage_share == 0:
        return np.zeros(len(t), bool)
    down = rng.random(pop.schools) < sv.outage_share
    hourly = np.asarray(scn.workload.hourly, float)
    start = day * DAY_S + 3600.0 * (rng.choice(24, size=pop.schools, p=hourly / hourly.sum())
                                    + rng.random(pop.schools))
    return down[home] & (t >= start[home]) & (t < start[home] + 3600.0 * sv.outage_h)


def _per_kind(quanta: dict, kind: np.ndarray) -> np.ndarray:
    per = np.array([float(quanta[k].per_item) if k in quanta else 0.0 for k in REQUEST_KINDS])
    return per[kind]
