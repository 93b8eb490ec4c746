"""sim.plan on a real calibration: a tiny federation run (sim.run's Python API) predicted by the planner
(bytes exactly, shipping times within 5%), then plans from it: determinism per seed, conservation of
bytes, the report and its plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sim.plan import calibration, cli, planner, validate
from sim.plan.config import PlanError, from_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def calibration_run(tiny_suite, tmp_path_factory):
    """A 3-node tiny federation run with the calibration scenario (requests one at a time)."""
    out = tmp_path_factory.mktemp("calibration")
    calibration.calibrate(out, preset="tiny", nodes=3, suite=tiny_suite)
    return out


def small_plan(**extra) -> dict:
    data = {"name": "t", "preset": "tiny", "days": 3, "population": {"schools": 40, "users": 600,
            "links": {"school-adsl": 0.7, "4g": 0.2, "fibre": 0.1}},
            "rollout": {"every_days": 2, "relay_seeds": 3}, "workload": {"active_days": [0, 1, 2]}}
    data.update(extra)
    return data


def test_planner_predicts_the_real_run(calibration_run):
    result = validate.predict(calibration_run)
    measured = json.loads((calibration_run / "report.json").read_text())
    # the workload's request counts come from its configuration, and agree with what it sent
    assert result["requests_predicted"] == {k: v["n"] for k, v in measured["requests"]["by_kind"].items()} | {
        k: 0 for k in ("score", "generate", "mixture") if k not in measured["requests"]["by_kind"]}
    nonzero = {k: v for k, v in measured["bytes_by_kind"].items() if v}
    assert result["bytes_predicted"] == nonzero == result["bytes_measured"]
    assert result["bytes_exact"]
    assert result["shipping_max_rel_error"] <= 0.05
    assert result["makespan_predicted_s"] == pytest.approx(measured["virtual"]["shipping_makespan_s"], rel=0.05)
    validate.check(result)


def test_calibration_is_measured(calibration_run):
    cal = calibration.from_run(calibration_run)
    r = json.loads((calibration_run / "report.json").read_text())
    assert cal.concurrency == 1
    assert cal.service_s["score"] == sorted(r["requests"]["samples_s"]["score"])
    assert sum(q.total for q in cal.bundle.values()) == r["bytes_by_kind"]["BUNDLE"]
    with pytest.raises(PlanError, match="preset"):
        cal.check(preset="small", expert_codec="int8", model="base", kinds={"score"})
    with pytest.raises(PlanError, match="rollout.model"):
        cal.check(preset="tiny", expert_codec="int8", model="chef", kinds={"score"})


def test_plan_is_deterministic_per_seed(calibration_run):
    cal = calibration.from_run(calibration_run)
    scn = from_dict(small_plan())
    a, b = planner.plan(scn, cal).report, planner.plan(scn, cal).report
    c = planner.plan(from_dict(small_plan(seed=7)), cal).report
    for r in (a, b, c):
        r.pop("wall_seconds"), r.pop("events_per_second")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert a["requests"] != c["requests"]


def test_plan_conserves_bytes(calibration_run):
    cal = calibration.from_run(calibration_run)
    scn = from_dict(small_plan())
    res = planner.plan(scn, cal)
    r = res.report
    n_ro = len(r["rollouts_scheduled_h"])
    assert n_ro == 2 and r["adapter_syncs"] == 3
    sent = sum(r["requests"]["by_kind"][k] * float(cal.request_sent[k].per_item) for k in cal.request_sent)
    for mode, m in r["modes"].items():
        assert sum(m["bytes_by_kind"].values()) == pytest.approx(m["bytes_total"], abs=len(m["bytes_by_kind"]))
        # what crossed the egress, bin by bin, is the rollouts' bytes and the requests' bytes down
        assert res.egress_bins[mode].sum() == pytest.approx(n_ro * m["rollout"]["egress_bytes"] + sent, rel=1e-9)
        # every byte on a school's link is counted at the coordinator once, a relayed bundle at both schools
        on_links = res.school_day_bytes[mode].sum() * scn.days
        assert on_links == pytest.approx(m["bytes_total"] + 2 * m["peer_bytes_total"], abs=2)  # totals are rounded
        # every school gets one bundle per rollout, from the coordinator or a peer
        bundle = float(cal.bundle["base"].per_item)
        assert m["bytes_by_kind"]["BUNDLE"] + m["peer_bytes_total"] == pytest.approx(n_ro * 40 * bundle, abs=2)
    assert r["modes"]["star"]["peer_bytes_total"] == 0
    assert r["requests"]["share_at_adapter"] == pytest.approx(1.0)


def test_cli_writes_the_report(calibration_run, tmp_path, capsys):
    f = tmp_path / "plan.toml"
    f.write_text('preset = "tiny"\ndays = 2\n[population]\nschools = 30\nusers = 300\n')
    assert cli.main(["--scenario", str(f), "--calibration", str(calibration_run), "--out", str(tmp_path / "o"),
                     "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "star: rollout makespan" in out and "relay: rollout makespan" in out
    r = json.loads((tmp_path / "o" / "report.json").read_text())
    assert set(r["modes"]) == {"star", "relay"}
    for png in ("egress_utilisation.png", "rollout_progress.png", "latency_at_peak.png", "bytes_per_school_day.png"):
        assert (tmp_path / "o" / png).stat().st_size > 1000
    assert "## Rollouts" in (tmp_path / "o" / "report.md").read_text()
    assert len((tmp_path / "o" / "events.jsonl").read_text().splitlines()) == 2 * 30
    assert cli.main(["validate", str(calibration_run)]) == 0
    assert np.isfinite(r["requests"]["latency_peak_s"]["p99"])


def test_offline_nodes_and_long_queues_send_requests_elsewhere(calibration_run):
    cal = calibration.from_run(calibration_run)
    base = planner.plan(from_dict(small_plan()), cal).report["requests"]
    outage = planner.plan(from_dict(small_plan(serving={"outage_share": 0.3, "outage_h": 6.0})), cal).report["requests"]
    assert base["served_elsewhere"] == 0 and outage["served_elsewhere"] > 0
    assert outage["share_at_adapter"] < 1.0
    # nodes 300 times slower than measured: queues pass max_wait_s, the coordinator routes elsewhere
    slow = planner.plan(from_dict(small_plan(serving={"compute_scale": 300.0, "max_wait_s": 5.0})), cal).report
    q = slow["requests"]
    assert q["served_elsewhere"] > 0 and q["share_at_adapter"] < 1.0
    assert q["wait_peak_s"]["p99"] > 0.1
