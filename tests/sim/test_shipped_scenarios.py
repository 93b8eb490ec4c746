"""Every scenario file shipped in scenarios/ loads and validates (they are not run here): sim.run's, and
sim.plan's (those with a [population] table)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from sim.plan import config as plan_config
from sim.scenario import load
from sim.sweep.grid import build_points, expand, parse_table, read_file

SCENARIOS = sorted((Path(__file__).resolve().parents[2] / "scenarios").glob("*.toml"))


def is_sweep(path: Path) -> bool:
    return bool(read_file(path)[1])


def test_scenarios_are_shipped():
    assert SCENARIOS, "scenarios/ holds no .toml file"


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_shipped_scenario_validates(path):
    if is_sweep(path):  # a sweep file: every one of its points is a valid scenario
        data, table = read_file(path)
        points = build_points(data, expand(*parse_table(table)), {})
        assert len(points) >= 2 and all(p.scenario is not None for p in points), [p.error for p in points]
        return
    is_plan = "population" in tomllib.loads(path.read_text())
    scn = plan_config.load(path) if is_plan else load(path)
    assert scn.name  # a file's stem when it names none


def test_the_codecs_links_sweep_is_shipped():
    """Issue 19: fp16, int8, ternary and prune50+ternary-ec on school ADSL, 4G and satellite links at small."""
    data, table = read_file(Path(SCENARIOS[0]).parent / "sweep_codecs_links.toml")
    points = build_points(data, expand(*parse_table(table)), {})
    got = {(p.scenario.model.expert_codec, p.scenario.network.default_link) for p in points if p.scenario}
    assert got == {(c, link) for c in ("fp16", "int8", "ternary", "prune50+ternary-ec")
                   for link in ("school-adsl", "4g", "satellite")}
    assert {p.scenario.federation.preset for p in points if p.scenario} == {"small"}


def test_a_prefetch_sweep_is_shipped():
    """Issue 5: a scenario whose name contains "prefetch" sweeps budgets up to all 16 experts per block."""
    sweeps = [load(p) for p in SCENARIOS if "prefetch" in p.name and not is_sweep(p)]
    assert sweeps
    assert any(s.prefetch.budgets and max(s.prefetch.budgets) == 16 and 8 in s.prefetch.budgets
               and "oracle" in s.prefetch.predictors for s in sweeps)


def test_a_live_prefetch_is_shipped():
    """Issue 16: scenarios/prefetch_live.toml runs partial nodes for every miss policy at half the experts."""
    scn = load(Path(__file__).resolve().parents[2] / "scenarios" / "prefetch_live.toml")
    assert scn.prefetch.live and 8 in scn.prefetch.live_budgets
    assert set(scn.prefetch.live_policies) == {"wait", "substitute", "remote", "auto"}
