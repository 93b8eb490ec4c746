"""sim.sweep of live prefetching end to end at tiny: expert budgets x miss policies, one partial node per
point. Every row's live figures are checked against its own report.json, the frontier against a dominance
check written here on those figures, and the remote policy's perplexity against what it must be (the full
node's log-probs exactly: ratio 1)."""

from __future__ import annotations

import json

import pytest

from sim.sweep.cli import main

pytestmark = pytest.mark.slow

SCENARIO = """
name = "pf"
[federation]
nodes = 2
preset = "tiny"
[model]
expert_codec = "int8"
specialists = []
[workload]
score_requests_per_user = 1
generate_requests_per_user = 0
mixture_requests = 0
unknown_users = false
[prefetch]
live = true
history_requests = 1
requests = 3
[[sweep.points]]                    # single values of list keys: one partial node per point
"prefetch.live_budgets" = 4
"prefetch.live_policies" = "substitute"
[[sweep.points]]
"prefetch.live_budgets" = 4
"prefetch.live_policies" = "remote"
[[sweep.points]]
"prefetch.live_budgets" = 16
"prefetch.live_policies" = "remote"
"""


@pytest.fixture(scope="module")
def sweep(tiny_suite, tmp_path_factory):
    """The sweep, run once: 3 points (substitute and remote at 4 of 16 experts per block, remote at 16)."""
    root = tmp_path_factory.mktemp("sweep_prefetch")
    (root / "s.toml").write_text(SCENARIO)
    out = root / "out"
    rc = main(["--scenario", str(root / "s.toml"), "--out", str(out), "--quiet"])
    return rc, out, json.loads((out / "sweep.json").read_text())


def test_every_row_carries_its_own_partial_node(sweep) -> None:
    rc, out, s = sweep
    assert rc == 0
    assert [r["status"] for r in s["rows"]] == ["ok"] * 3
    assert s["keys"] == ["prefetch.live_budgets", "prefetch.live_policies"]
    assert [(r["values"]["prefetch.live_budgets"], r["values"]["prefetch.live_policies"]) for r in s["rows"]] == \
        [(4, "substitute"), (4, "remote"), (16, "remote")]
    for row in s["rows"]:
        rep = json.loads((out / row["folder"] / "report.json").read_text())
        budget, policy = row["values"]["prefetch.live_budgets"], row["values"]["prefetch.live_policies"]
        assert rep["scenario"]["prefetch"]["live_budgets"] == [budget]  # a single value: a list of one
        assert rep["scenario"]["prefetch"]["live_policies"] == [policy]
        (live,) = rep["prefetch_live"]["rows"]  # one partial node per point
        assert (live["budget"], live["policy"], live["node"]) == (budget, policy, f"pf-{policy}-{budget}e")
        assert (row["live_budget"], row["live_policy"], row["live_node"]) == (budget, policy, live["node"])
        b = live["bytes"]
        assert row["live_bytes_by_kind"] == {"expert_planned": b["expert_planned"],
                                             "expert_on_demand": b["expert_on_demand"],
                                             "activations": b["activations"], "control": b["control"]}
        assert row["live_bytes"] == b["expert_planned"] + b["expert_on_demand"] + b["activations"] > 0
        assert row["hit_rate"] == live["hits"] / live["uses"]
        assert row["stall_seconds"] == live["stall_seconds"]
        assert (row["live_ppl"], row["live_ppl_full"]) == (live["ppl"], live["ppl_full"])
        assert row["live_ppl_ratio"] == pytest.approx(live["ppl"] / live["ppl_full"], rel=1e-12)
        assert row["live_requests"] == 3 and row["live_tokens"] == live["tokens"]
        assert row["bytes_total"] == rep["bytes_total"] and row["wall_seconds"] == rep["wall_seconds"]
        if policy == "remote":  # remote calls run the missing experts on a full node: its log-probs exactly
            assert row["live_ppl_ratio"] == pytest.approx(1.0, abs=1e-5)
            assert (b["activations"] > 0) == (row["hit_rate"] < 1)
        else:
            assert b["activations"] == 0 and row["stall_seconds"] == 0
    sub4, remote4, full = s["rows"]
    assert sub4["hit_rate"] < 1 and sub4["live_ppl_ratio"] > 1.0001  # 4 of 16 held: substitutes cost quality
    assert full["hit_rate"] == 1 and full["stall_seconds"] == 0  # every expert held: nothing to miss
    assert remote4["live_bytes"] < full["live_bytes"]  # 4 experts and the misses' activations: less than all 16


def test_the_frontier_is_of_the_partial_nodes(sweep) -> None:
    rc, out, s = sweep
    rows = s["rows"]
    assert s["frontier"] == {"kind": "live", "costs": ["live_bytes", "stall_seconds"], "quality": "live_ppl_ratio"}

    def front(cost: str) -> list[bool]:
        pts = [(r[cost], r["live_ppl_ratio"]) for r in rows]
        return [not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts) for p in pts]
    assert [r["frontier_bytes"] for r in rows] == front("live_bytes")
    assert [r["frontier_time"] for r in rows] == front("stall_seconds")
    cheapest = min(rows, key=lambda r: (r["live_bytes"], r["live_ppl_ratio"]))
    assert cheapest["frontier_bytes"]
    md = (out / "sweep.md").read_text()
    assert "## The partial node of each point (live prefetching)" in md
    for r in rows:
        marks = " ".join(m for m, f in (("**B**", "frontier_bytes"), ("**T**", "frontier_time")) if r[f])
        line = next(line for line in md.splitlines() if line.startswith(f"| {r['point']} |") and "KB" not in line
                    and line.endswith(f" {marks} |" if marks else "|  |") and f"{r['hit_rate']:.3f}" in line)
        assert f"{r['live_ppl_ratio']:.4f}" in line
    for name in ("sweep_frontier.png", "sweep_by_prefetch.live_budgets.png", "sweep_by_prefetch.live_policies.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and name in s["plots"]


def test_compare_two_points_shows_their_partial_nodes(sweep, capsys) -> None:
    from sim.compare import main as compare_main

    _, out, s = sweep
    a, b = s["rows"][:2]  # substitute and remote at 4 experts per block
    assert compare_main([str(out / a["folder"]), str(out / b["folder"]), "--json"]) == 0
    got = {f["figure"]: f for f in json.loads(capsys.readouterr().out)["figures"]}
    assert got["partial node: hit rate"]["a"] == a["hit_rate"] and got["partial node: hit rate"]["b"] == b["hit_rate"]
    assert got["partial / full node ppl"]["b_over_a"] == pytest.approx(b["live_ppl_ratio"] / a["live_ppl_ratio"])
    assert got["partial node: expert weights + activations"]["b"] == pytest.approx(b["live_bytes"] / 1e6)
