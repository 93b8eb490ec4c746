"""sim.bench's planner benchmarks at quick sizes (a smoke test: no timing assertions), and the heapq
event loop they compare against agreeing with the planner's vectorised queues."""

from __future__ import annotations

import json

import numpy as np

from sim.bench.plan import _queues, heapq_loop
from sim.bench.runner import main
from sim.plan.serving import fifo


def test_heapq_loop_agrees_with_the_recursion():
    school, a, s = _queues(2000, 13, seed=1)
    dep, events = heapq_loop(school, a, s)
    assert events == 2 * len(a)
    np.testing.assert_allclose(dep, fifo(school, a, s, np.zeros(13)), atol=1e-6)


def test_plan_benchmarks_run_and_print_json(capsys):
    assert main(["des_loop", "plan", "--quick", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["des_loop", "plan"]
    for r in rows:
        assert r["value"] > 0 and r["baseline"] > 0
    assert rows[0]["detail"]["heapq_events_per_s"] > 0
    assert rows[1]["detail"]["events"] > rows[1]["detail"]["requests"]
