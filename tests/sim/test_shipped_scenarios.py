"""Every scenario file shipped in scenarios/ loads and validates (they are not run here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sim.scenario import load

SCENARIOS = sorted((Path(__file__).resolve().parents[2] / "scenarios").glob("*.toml"))


def test_scenarios_are_shipped():
    assert SCENARIOS, "scenarios/ holds no .toml file"


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_shipped_scenario_validates(path):
    scn = load(path)
    assert scn.name  # a file's stem when it names none


def test_a_prefetch_sweep_is_shipped():
    """Issue 5: a scenario whose name contains "prefetch" sweeps budgets up to all 16 experts per block."""
    sweeps = [load(p) for p in SCENARIOS if "prefetch" in p.name]
    assert sweeps
    assert any(s.prefetch.budgets and max(s.prefetch.budgets) == 16 and 8 in s.prefetch.budgets
               and "oracle" in s.prefetch.predictors for s in sweeps)
