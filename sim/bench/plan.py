"""Planner benchmarks of `sim.bench`: the planner's week at deployment scale, and the event loop chosen.

``plan``: the plan scenario (default ``scenarios/target_215k.toml``: 215,000 users, 10,000 schools, a
week) simulated end to end; value = wall seconds (the issue's target: under 60), baseline = the wall
seconds a plain ``heapq`` event loop would need for the same number of events, at the rate it is
measured to run in this process on the same FIFO queues (below).

``des_loop``: one day of FIFO node queues (arrival and departure events, the planner's serving model)
run three ways on the same requests: the vectorised Lindley recursion the planner uses, a ``heapq``
event loop, and SimPy (a well-kept DES library) when it is importable. Value = the recursion's events
per second, baseline = the heapq loop's; SimPy's rate is in ``detail``. All three must give the same
departures (checked).
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from pathlib import Path

import numpy as np

from ..plan import calibration, config, planner
from ..plan.serving import fifo
from .core import BenchResult

ROOT = Path(__file__).resolve().parents[2]


def _queues(n: int, schools: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` requests over a school day at ``schools`` schools: (school sorted, arrival sorted per school, service)."""
    rng = np.random.default_rng(seed)
    school = np.sort(rng.integers(0, schools, n))
    a = np.sort(rng.uniform(8 * 3600, 16 * 3600, n) + school * 1e6) - school * 1e6  # sorted within each school
    s = rng.lognormal(np.log(0.06), 0.5, n)
    return school, a, s


def heapq_loop(school: np.ndarray, a: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, int]:
    """FIFO single-server queues as a plain event loop: arrivals and departures through one heap."""
    heap = [(float(a[i]), 0, i) for i in range(len(a))]
    heapq.heapify(heap)
    busy: dict[int, bool] = {}
    waiting: dict[int, list[int]] = {}
    dep = np.zeros(len(a))
    events = 0
    while heap:
        t, kind, i = heapq.heappop(heap)
        events += 1
        k = int(school[i])
        if kind == 0:  # arrival
            if busy.get(k):
                waiting.setdefault(k, []).append(i)
                continue
            busy[k] = True
            dep[i] = t + s[i]
            heapq.heappush(heap, (dep[i], 1, i))
        else:  # departure: the next in line starts
            q = waiting.get(k)
            if q:
                j = q.pop(0)
                dep[j] = t + s[j]
                heapq.heappush(heap, (dep[j], 1, j))
            else:
                busy[k] = False
    return dep, events


def simpy_loop(school: np.ndarray, a: np.ndarray, s: np.ndarray) -> np.ndarray | None:
    """The same queues in SimPy (a Resource of capacity 1 per school); None when SimPy is not installed."""
    try:
        import simpy  # not a dependency: measured when present
    except ImportError:
        return None
    env = simpy.Environment()
    servers = {int(k): simpy.Resource(env, capacity=1) for k in np.unique(school)}
    dep = np.zeros(len(a))

    def request(i: int):
        yield env.timeout(float(a[i]))
        with servers[int(school[i])].request() as req:
            yield req
            yield env.timeout(float(s[i]))
            dep[i] = env.now

    for i in np.argsort(a, kind="stable"):
        env.process(request(int(i)))
    env.run()
    return dep


def _rate(fn, events: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return events / dt, dt


async def des_loop(ctx) -> list[BenchResult]:
    """Events per second of the vectorised recursion vs a heapq event loop vs SimPy, same queues."""
    n = ctx.config.des_requests
    school, a, s = _queues(n, max(1, n // 150), ctx.config.seed)
    free = np.zeros(int(school.max()) + 1)
    want = fifo(school, a, s, free)
    got, events = heapq_loop(school, a, s)
    assert np.allclose(got, want, atol=1e-6), "heapq loop and recursion disagree"
    vec_rate, _ = _rate(lambda: fifo(school, a, s, free), 2 * n)
    heap_rate, _ = _rate(lambda: heapq_loop(school, a, s), events)
    detail: dict = {"requests": n, "events": events}
    t0 = time.perf_counter()
    dep = simpy_loop(school, a, s)
    if dep is not None:
        assert np.allclose(dep, want, atol=1e-6), "SimPy and recursion disagree"
        detail["simpy_events_per_s"] = round(2 * n / (time.perf_counter() - t0))
    else:
        detail["simpy_events_per_s"] = None
    detail["heapq_events_per_s"] = round(heap_rate)
    ctx.notes["heapq_events_per_s"] = heap_rate
    return [BenchResult(name="des_loop", value=vec_rate, baseline=heap_rate, unit="events/s", better="higher",
                        description="FIFO node queues: vectorised Lindley recursion vs a heapq event loop "
                                    "(SimPy's rate in detail when installed)", detail=detail)]


def plan_scenario(ctx) -> tuple[config.PlanScenario, calibration.Calibration]:
    """The benchmark's plan and its calibration (quick: 200 schools for two days, same calibration)."""
    path = ROOT / (ctx.config.plan_scenario or "scenarios/target_215k.toml")
    scn = config.load(path)
    if not ctx.config.plan_scenario:
        pop = dataclasses.replace(scn.population, schools=200, users=4000)
        scn = dataclasses.replace(scn, days=2, population=pop).validate()
    return scn, calibration.from_run(scn.calibration)


async def plan(ctx) -> list[BenchResult]:
    """Wall seconds of the plan scenario end to end, against a heapq loop's estimate for its events."""
    scn, cal = plan_scenario(ctx)
    if "heapq_events_per_s" not in ctx.notes:
        await des_loop(ctx)
    t0 = time.perf_counter()
    res = planner.plan(scn, cal)
    wall = time.perf_counter() - t0
    r = res.report
    baseline = r["events"] / ctx.notes["heapq_events_per_s"]
    return [BenchResult(name="plan", value=wall, baseline=baseline, unit="s", better="lower",
                        description=f"{scn.name}: {r['population']['users']:,} users, {r['population']['schools']:,} "
                                    f"schools, {scn.days} days, vs a heapq loop at its measured rate",
                        target=60.0 if ctx.config.plan_scenario else None, target_on="value",
                        detail={"events": r["events"], "events_per_s": round(r["events"] / wall),
                                "requests": r["requests"]["total"], "wall_phases_s": r["wall_seconds"]})]
