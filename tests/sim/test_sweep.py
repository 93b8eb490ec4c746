"""sim.sweep without a federation: the grid and its points, refusals before anything starts, the Pareto
frontier on constructed rows, and sim.compare's refusals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sim.compare import main as compare_main
from sim.sweep.cli import main
from sim.sweep.grid import (
    SweepError,
    as_field,
    build_points,
    expand,
    folder_name,
    literal,
    parse_grid_arg,
    parse_table,
    varied_keys,
)
from sim.sweep.rows import live_figures, mark_frontiers, pareto_front

TINY = {"name": "t", "federation": {"preset": "tiny", "nodes": 4}}


# ---- the frontier ------------------------------------------------------------------------------

def test_pareto_front_on_constructed_pairs() -> None:
    pairs = [(10, 5.0), (20, 4.0), (15, 6.0), (30, 4.0), (10, 5.0), (None, 3.0), (5, 9.0)]
    # (15, 6) is beaten by (10, 5) in both; (30, 4) costs more than (20, 4) for the same ppl; two equal
    # points do not dominate each other; a pair with a missing figure is never on the front
    assert pareto_front(pairs) == [True, True, False, False, True, False, True]
    assert pareto_front([]) == []


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=30))
def test_front_is_mutually_undominated_and_dominates_the_rest(pairs) -> None:
    front = pareto_front(pairs)

    def dominates(a, b):
        return a[0] <= b[0] and a[1] <= b[1] and a != b
    on = [p for p, f in zip(pairs, front) if f]
    assert on, "a non-empty set has a non-empty front"
    assert not any(dominates(a, b) for a in on for b in on)
    for p, f in zip(pairs, front):
        if not f:
            assert any(dominates(q, p) for q in on)


def test_mark_frontiers_by_bytes_and_by_time_on_constructed_rows() -> None:
    def row(point, mb, seconds, ppl, status="ok"):
        return {"point": point, "status": status, "bytes_shipped": mb * 1_000_000, "shipping_makespan_s": seconds,
                "ppl": ppl}
    rows = [row(1, 10, 50.0, 20.0),   # fp16 on a slow link: most bytes, best ppl
            row(2, 5, 5.0, 20.5),     # int8 on a fast link
            row(3, 5, 25.0, 20.5),    # int8 on a slow link: same bytes and ppl as 2, slower
            row(4, 2, 10.0, 23.0),    # ternary: fewest bytes, worst ppl
            {"point": 5, "status": "refused", "error": "x"}]
    mark_frontiers(rows)
    assert [r["frontier_bytes"] for r in rows] == [True, True, True, True, False]
    assert [r["frontier_time"] for r in rows] == [True, True, False, False, False]


def test_live_rows_put_the_frontier_on_the_partial_nodes() -> None:
    """Rows with a partial node's figures: the frontiers are of its bytes and stall seconds against its ppl
    ratio; the federation's figures (the same base nodes at every point) do not enter them."""
    def row(point, kb, stall, ratio):
        return {"point": point, "status": "ok", "bytes_shipped": 9e6, "shipping_makespan_s": 5.0, "ppl": 30.0,
                "live_bytes": kb * 1000, "stall_seconds": stall, "live_ppl_ratio": ratio}
    rows = [row(1, 10_000, 0.0, 1.42),    # substitute at 4 experts: fewest bytes, no stall, worst ppl
            row(2, 246_000, 182.0, 1.0),  # wait at 4: exact, most bytes, longest stall
            row(3, 16_100, 53.0, 1.0),    # remote at 4: exact, few bytes
            row(4, 13_000, 0.0, 1.04),    # substitute at 12: dominates 1 on stall
            row(5, 16_100, 17.5, 1.0),    # auto at 12: same bytes as 3, less stall
            {"point": 6, "status": "failed", "error": "x"}]
    axes = mark_frontiers(rows)
    assert axes.kind == "live" and axes.to_dict()["costs"] == ["live_bytes", "stall_seconds"]
    assert [r["frontier_bytes"] for r in rows] == [True, False, True, True, True, False]
    assert [r["frontier_time"] for r in rows] == [False, False, False, True, True, False]
    plain = [{k: v for k, v in r.items() if not k.startswith(("live", "stall"))} for r in rows[:3]]
    assert mark_frontiers(plain).kind == "federation"


def test_live_figures_of_a_report() -> None:
    one = {"node": "pf-wait-8e", "policy": "wait", "budget": 8, "budget_unit": "experts per block", "prior_beta": 0.0,
           "bytes": {"expert_weights": 700, "expert_planned": 500, "expert_on_demand": 200, "activations": 0,
                     "control": 90}, "bytes_per_token": 2.5, "requests": 3, "tokens": 280, "hit_rate": 0.75,
           "stall_seconds": 4.5, "ppl": 20.0, "ppl_full": 20.0, "ppl_ratio": 1.0}
    got = live_figures({"prefetch_live": {"rows": [one]}})
    assert got["live_bytes"] == 700 and got["live_bytes_by_kind"]["control"] == 90  # control stays out of bytes
    assert (got["hit_rate"], got["stall_seconds"], got["live_ppl_ratio"]) == (0.75, 4.5, 1.0)
    assert live_figures({"prefetch_live": {"rows": [one, one]}}) == {}  # no one partial node: no figures
    assert live_figures({}) == {}


def test_frontier_labels_do_not_overlap(tmp_path) -> None:
    """Twelve points, six of them within a few pixels of one another: every number is placed clear of the
    others (its drawn extent checked here), and points whose markers touch share one label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from sim.sweep.report import place_labels
    fig, ax = plt.subplots(figsize=(6, 4))
    xy = [(10, 1.42), (246, 1.0), (16.1, 1.0), (22, 1.0), (12, 1.12), (211, 1.0), (16.8, 1.0), (17.0, 1.0),
          (13, 1.04), (110, 1.0), (17.4, 1.0), (18.0, 1.0)]
    ax.scatter(*zip(*xy))
    ax.set_xscale("log")
    place_labels(ax, [(x, y, str(i)) for i, (x, y) in enumerate(xy, 1)])
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, r) for t in ax.texts]  # the text's own extent, not its leader line
    texts = [t.get_text() for t in ax.texts]
    assert sorted(int(n) for t in texts for n in t.split(",")) == list(range(1, 13))  # every point, once
    assert "7,8" in texts and "11" in texts  # 16.8 and 17.0 share a label; 17.4 is apart
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    frame = ax.get_window_extent(r)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    plt.close(fig)


# ---- the grid and its points ---------------------------------------------------------------------

def test_command_line_values_are_read_as_toml_else_strings() -> None:
    assert literal("4") == 4 and literal("2.5") == 2.5 and literal("true") is True
    assert literal("[8, 16]") == [8, 16]
    assert literal("int8") == "int8" and literal("prune50+ternary-ec") == "prune50+ternary-ec" and literal("4g") == "4g"
    assert parse_grid_arg("federation.nodes=4,8") == ("federation.nodes", [4, 8])
    assert parse_grid_arg("network.profiles.village.rtt_ms=100,300")[1] == [100, 300]


@pytest.mark.parametrize("text, message", [
    ("model.expert_codec", "expected KEY=V1,V2"),
    ("model=int8", "not a scenario key"),
    ("nosuch.key=1", "not a scenario key"),
    ("model.codec=int8", "unknown key of \\[model\\]"),
    ("model.expert_codec.x=1", "is not a table"),
    ("model.expert_codec=int8,int8", "duplicate values"),
])
def test_bad_grid_axes_are_refused_naming_the_key(text, message) -> None:
    with pytest.raises(SweepError, match=message):
        parse_grid_arg(text)


def test_grid_and_listed_points_expand_in_order() -> None:
    grid, points = parse_table({"grid": {"model": {"expert_codec": ["fp16", "int8"]}},  # unquoted dotted key
                                "points": [{"federation.nodes": 4}, {"federation.nodes": 6}]})
    assert grid == {"model.expert_codec": ["fp16", "int8"]}
    got = expand(grid, points)
    assert got == [{"federation.nodes": 4, "model.expert_codec": "fp16"},
                   {"federation.nodes": 4, "model.expert_codec": "int8"},
                   {"federation.nodes": 6, "model.expert_codec": "fp16"},
                   {"federation.nodes": 6, "model.expert_codec": "int8"}]
    both = expand({"a.b": [1, 2], "c.d": ["x", "y", "z"]}, [])
    assert len(both) == 6 and both[0] == {"a.b": 1, "c.d": "x"} and both[1] == {"a.b": 1, "c.d": "y"}
    with pytest.raises(SweepError, match="grid also varies"):
        expand(grid, [{"model.expert_codec": "ternary"}])
    with pytest.raises(SweepError, match="unknown key"):
        parse_table({"grids": {}})
    with pytest.raises(SweepError, match="more than"):
        expand({"a.b": list(range(20)), "c.d": list(range(20))}, [])


def test_points_that_cannot_run_carry_one_line_each() -> None:
    values = [{"model.expert_codec": "int8", "network.default_link": "4g"},
              {"model.expert_codec": "bogus", "network.default_link": "4g"},
              {"model.expert_codec": "int8", "network.default_link": "dialup"},
              {"model.expert_codec": "int8", "network.default_link": "4g", "soup.nodes": 4},
              {"model.expert_codec": "int8", "network.default_link": "4g", "model.specialists": ["chef"]}]
    points = build_points(TINY, values, {})
    assert points[0].scenario is not None and points[0].error is None
    assert points[0].scenario.model.expert_codec == "int8" and points[0].scenario.federation.preset == "tiny"
    errors = [p.error for p in points[1:]]
    assert all(p.scenario is None for p in points[1:])
    assert errors[0].startswith("model.expert_codec: unknown codec 'bogus'")
    assert errors[1].startswith("network: unknown link preset 'dialup'")
    assert errors[2].startswith("soup.nodes:")
    assert errors[3].startswith("model.specialists: 'chef' is not a training persona")
    assert all("\n" not in e for e in errors)


def test_live_points_run_one_partial_node_each() -> None:
    """A single value of a list-valued key is a list of one; a live point with more than one partial node is
    refused (its row would have no one set of live figures), one line naming the fix."""
    assert as_field("prefetch.live_budgets", 8) == [8] and as_field("prefetch.live_budgets", [4, 8]) == [4, 8]
    assert as_field("model.expert_codec", "int8") == "int8" and as_field("network.profiles.x.rtt_ms", 3) == 3
    live = {**TINY, "prefetch": {"live": True}}
    points = build_points(live, [{"prefetch.live_budgets": 4, "prefetch.live_policies": "wait"},
                                 {"prefetch.live_budgets": 8},  # every default policy: 4 partial nodes
                                 {"prefetch.live_budgets": [4, 8], "prefetch.live_policies": "auto"}], {})
    assert points[0].error is None and points[0].scenario is not None
    assert (points[0].scenario.prefetch.live_budgets, points[0].scenario.prefetch.live_policies) == ([4], ["wait"])
    assert points[1].error == ("prefetch.live: a sweep point runs one partial node, this one would run 4 (1 budgets "
                               "x 4 policies x 1 prior betas): make prefetch.live_budgets and prefetch.live_policies "
                               "axes of the sweep")
    assert points[2].error is not None and "would run 2 (2 budgets" in points[2].error
    off = build_points(TINY, [{"prefetch.live_budgets": 8}], {})  # live off: the partial nodes are not run
    assert off[0].error is None


def test_a_repeated_point_and_a_flag_against_an_axis_are_refused() -> None:
    points = build_points(TINY, [{"federation.seed": 0}, {"federation.seed": 1}, {"federation.seed": 0}], {})
    assert [p.error for p in points] == [None, None, "the same scenario as point 1"]
    with pytest.raises(SweepError, match="federation.nodes"):
        build_points(TINY, [{"federation.nodes": 4}, {"federation.nodes": 5}], {"federation.nodes": 6})
    flagged = build_points(TINY, [{"model.expert_codec": "int8"}], {"federation.seed": 3})
    assert flagged[0].scenario is not None and flagged[0].scenario.federation.seed == 3


def test_folder_names_and_varied_keys() -> None:
    assert folder_name(3, {"model.expert_codec": "prune50+ternary-ec", "network.default_link": "4g"}) == \
        "03-expert_codec=prune50+ternary-ec-default_link=4g"
    assert folder_name(1, {"federation.nodes": 4, "soup.nodes": 0}) == "01-federation.nodes=4-soup.nodes=0"
    points = build_points(TINY, [{"model.expert_codec": c, "federation.seed": 0} for c in ("int8", "fp16")], {})
    assert varied_keys(points) == ["model.expert_codec"]


# ---- the command line ------------------------------------------------------------------------------

def test_cli_refuses_bad_points_before_anything_starts(tmp_path, capsys) -> None:
    out = tmp_path / "sweep"
    rc = main(["--preset", "tiny", "--nodes", "4", "--grid", "model.expert_codec=int8,bogus,ternary",
               "--grid", "network.default_link=4g,dialup", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2
    refused = [line for line in err if line.startswith("refused: ")]
    assert len(refused) == 4  # (bogus x 2 links) + (int8, ternary) x dialup
    assert "refused: point 2 (model.expert_codec=int8, network.default_link=dialup): network: unknown link" in err[0]
    assert err[-1].startswith("error: 4 of 6 points refused")
    assert not out.exists()  # nothing ran, nothing written


def test_cli_one_line_errors(tmp_path, capsys) -> None:
    assert main(["--preset", "tiny", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: nothing to sweep")
    assert main(["--grid", "model.nosuch=1,2", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    bad = tmp_path / "bad.toml"
    bad.write_text("[sweep]\npoint = []\n")
    assert main(["--scenario", str(bad)]) == 2
    assert capsys.readouterr().err == "error: sweep.point: unknown key; known: grid, points\n"
    assert main(["--preset", "tiny", "--nodes", "4", "--grid", "federation.seed=1,2", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("point ") == 2


def test_sim_run_points_a_sweep_file_at_sim_sweep(tmp_path, capsys) -> None:
    from sim.run import main as run_main

    f = tmp_path / "s.toml"
    f.write_text('[sweep.grid]\n"federation.seed" = [1, 2]\n')
    assert run_main(["--scenario", str(f), "--out", str(tmp_path / "o")]) == 2
    assert "run it with python -m sim.sweep" in capsys.readouterr().err


def test_compare_refuses_what_is_not_a_run(tmp_path, capsys) -> None:
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'a'}: no report.json there")
    (tmp_path / "report.json").write_text("{}")
    assert compare_main([str(tmp_path), str(tmp_path)]) == 2
    assert "not a sim.run report" in capsys.readouterr().err


def test_help_of_both_commands(capsys) -> None:
    for entry in (main, compare_main):
        with pytest.raises(SystemExit) as exc:
            entry(["--help"])
        assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--grid KEY=V1,V2,..." in text and "--skip-refused" in text and "[sweep]" in text
    assert "RUN_A" in text and "B / A" in text


def test_bench_sweep_needs_two_codecs() -> None:
    from sim.bench.core import BenchConfig, BenchError
    from sim.bench.runner import registry

    assert not registry()["sweep"].default  # runs only when named: it is the sweep's points, twice
    with pytest.raises(BenchError, match="^sweep_codecs:"):
        BenchConfig(sweep_codecs=("int8",))
