"""Plan scenarios: defaults, one-line errors naming the key, and the command line refusing bad input
before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sim.plan.config import PlanError, PlanScenario, from_dict, load

ROOT = Path(__file__).resolve().parents[2]


def test_empty_scenario_is_the_defaults():
    assert from_dict({}) == PlanScenario().validate()


@pytest.mark.parametrize("data, key", [
    ({"population": {"schools": 0}}, "population.schools"),
    ({"population": {"schools": 10, "users": 5}}, "population.users"),
    ({"population": {"links": {"dial-up": 1.0}}}, "population.links.dial-up"),
    ({"population": {"links": {"fibre": -1.0}}}, "population.links.fibre"),
    ({"population": {"colour": 1}}, "population.colour"),
    ({"rollout": {"modes": ["carrier-pigeon"]}}, "rollout.modes"),
    ({"rollout": {"relay_fanout": 0}}, "rollout.relay_fanout"),
    ({"workload": {"hourly": [1.0] * 23}}, "workload.hourly"),
    ({"workload": {"active_days": [7]}}, "workload.active_days"),
    ({"personas": {"student": {"kinds": {"dance": 1.0}}}}, "personas.student.kinds.dance"),
    ({"personas": {"student": {"requests_per_day": "many"}}}, "personas.student.requests_per_day"),
    ({"network": {"egress_mbps": 0}}, "network.egress_mbps"),
    ({"days": 0}, "days"),
    ({"oceans": 3}, "oceans"),
])
def test_bad_values_name_their_key(data, key):
    with pytest.raises(PlanError) as e:
        from_dict(data)
    assert str(e.value).startswith(f"{key}:"), str(e.value)


def test_custom_link_profile():
    scn = from_dict({"population": {"links": {"village": 1.0},
                                    "profiles": {"village": {"down_mbps": 2, "up_mbps": 0.5, "rtt_ms": 300}}}})
    assert scn.population.links == {"village": 1.0}


def test_calibration_path_is_relative_to_the_file(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('calibration = "runs/cal"\n')
    assert load(f).calibration == str((tmp_path / "runs/cal").resolve())
    assert load(f).name == "p"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sim.plan", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("content, calibration, needle", [
    ("[population]\nschools = -3\n", None, "population.schools:"),
    ("[population\n", None, "not valid TOML"),
    ("", None, "calibration:"),  # no calibration named
    ("", "/nonexistent/run", "report.json not found"),
])
def test_cli_bad_input_is_one_line(tmp_path, content, calibration, needle):
    f = tmp_path / "plan.toml"
    f.write_text(content)
    args = ["--scenario", str(f), "--out", str(tmp_path / "out")]
    if calibration:
        args += ["--calibration", calibration]
    p = run_cli(*args)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and needle in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()  # refused before any work


def test_cli_help():
    p = run_cli("--help")
    assert p.returncode == 0 and "--calibration" in p.stdout and "calibrate" in p.stdout
    for sub in ("calibrate", "validate"):
        assert run_cli(sub, "--help").returncode == 0


def test_overrides_set_keys_and_are_validated(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text("[rollout]\nrelay_fanout = 2\n")
    scn = load(f, ["rollout.relay_fanout=4", "network.egress_mbps=100", 'population.links={"fibre" = 1.0}'])
    assert scn.rollout.relay_fanout == 4 and scn.network.egress_mbps == 100.0
    assert scn.population.links == {"fibre": 1.0}
    with pytest.raises(PlanError, match="^rollout.relay_fanout:"):
        load(f, ["rollout.relay_fanout=0"])
    with pytest.raises(PlanError, match="expected KEY=VALUE"):
        load(f, ["rollout.relay_fanout"])
