"""sim.sections and the report renderer: a section the renderer has never heard of is drawn in report.json,
report.md and the plots list, in the order sections were added; the optional parts run only when their
scenario asks for them."""

from __future__ import annotations

import ast
import asyncio
import json
from pathlib import Path

from sim import faults, prefetch_live, prefetch_sweep
from sim.report import write_report
from sim.run import LIVE_PARTS, live_parts
from sim.scenario import Scenario, override
from sim.sections import SECTIONS, LivePart, Section, add_section, chain_parts, json_markdown, pop_sections

ROOT = Path(__file__).resolve().parents[2]


def bare_report() -> dict:
    """The core of a report with no nodes, users or requests: the renderer draws no core plot for it."""
    return {
        "scenario": Scenario().validate().to_dict(), "nodes": 0, "actors": 0, "bytes_total": 0, "bytes_by_kind": {},
        "bundles": [], "per_node": [], "virtual": {"shipping_makespan_s": 0.0, "shipping_median_s": 0.0},
        "quality": {"users": [], "unknown": [], "mixtures": [],
                    "summary": {"users": 0, "own_beats_base": 0, "median_own_over_base": 0.0}},
        "requests": {"total": 0, "failed": 0, "by_kind": {}}, "wall_phases": {}, "wall_seconds": 0.0,
    }


def weather_markdown(data: dict) -> list[str]:
    return ["## Weather", "", f"It rained {data['mm']} mm."]


def weather_plots(data: dict, out: Path) -> list[str]:
    (out / "weather.png").write_bytes(b"not really a png")
    return ["weather.png"]


def test_renderer_draws_a_section_it_does_not_know_by_name(tmp_path):
    report = bare_report()
    add_section(report, Section("weather", {"mm": 3}, weather_markdown, weather_plots))
    add_section(report, Section("quiet", {}, weather_markdown, weather_plots))  # empty data: drawn nowhere
    add_section(report, Section("log", {"lines": ["a", "b"]}, json_markdown("Log")))
    write_report(report, tmp_path, [], pop_sections(report))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["weather"] == {"mm": 3} and on_disk["quiet"] == {} and on_disk["log"] == {"lines": ["a", "b"]}
    assert SECTIONS not in on_disk and on_disk["plots"] == ["weather.png"]
    md = (tmp_path / "report.md").read_text()
    assert "## Weather\n\nIt rained 3 mm.\n" in md
    assert md.index("## Requests (wall)") < md.index("## Weather") < md.index("## Log") < md.index("Plots: ")
    assert md.count("## Weather") == 1
    assert '## Log\n\n```json\n{\n "lines": [\n  "a",\n  "b"\n ]\n}\n```' in md
    assert "[weather.png](weather.png)" in md


def relative_imports(rel: str) -> set[str]:
    """The modules of ours that the file ``rel`` (under the repository root) imports relatively, resolved."""
    package = rel.removesuffix(".py").split("/")[:-1]
    found = set()
    for n in ast.walk(ast.parse((ROOT / rel).read_text())):
        if isinstance(n, ast.ImportFrom) and n.level:
            base = package[:len(package) - n.level + 1]
            found |= {".".join(base + [n.module])} if n.module else {".".join(base + [a.name]) for a in n.names}
    return found


def test_the_renderer_names_no_optional_part():
    # sim.report draws whatever sections it is given: it imports none of the modules that produce them
    assert relative_imports("sim/report.py") <= {"sim.sections", "sim.network"}
    for part in ("sim/soup.py", "sim/prefetch_sweep/run.py", "sim/faults/run.py"):
        assert "sim.report" not in relative_imports(part), part


def test_live_parts_run_only_when_the_scenario_asks_and_in_order():
    scn = Scenario().validate()
    assert live_parts(scn) is None
    assert [p.name for p in LIVE_PARTS] == ["prefetch", "prefetch_live", "faults"]
    assert prefetch_sweep.wanted(override(scn, "prefetch", predictors=["oracle"], budgets=[8]))
    assert not prefetch_sweep.wanted(scn)
    assert prefetch_live.wanted(override(scn, "prefetch", live=True)) and not prefetch_live.wanted(scn)
    for key, value in (("kill_nodes", 1), ("cut_stream_at", 0.5), ("corrupt_chunks", 1), ("restart_coordinator", True)):
        assert faults.wanted(override(scn, "faults", **{key: value})), key
    assert not faults.wanted(scn)

    ran: list[str] = []

    def part(name: str, want: bool) -> LivePart:
        async def run(fed, report):
            ran.append(name)
            add_section(report, Section(name, {"fed": fed}, weather_markdown))
        return LivePart(name, lambda s: want, run)

    chained = chain_parts([part("b", True), part("skipped", False), part("a", True)], scn)
    report: dict = {}
    asyncio.run(chained("FED", report))
    assert ran == ["b", "a"] and [k for k in report if k != SECTIONS] == ["b", "a"]
    assert [s.key for s in pop_sections(report)] == ["b", "a"] and SECTIONS not in report
    assert chain_parts([part("x", False)], scn) is None
