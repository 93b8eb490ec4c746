"""sim.bench: every benchmark runs at small sizes (a smoke test, no timing assertions), the result
arithmetic and CLI behave, and the packing helpers of sim.federation keep every node exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sim.actors import AUTO, ONE_ACTOR_PER_NODE_MAX, actor_groups, packing, process_memory
from sim.bench.core import BenchConfig, BenchError, BenchResult
from sim.bench.runner import main, run_benchmarks
from sim.federation import NodePlan
from sim.scenario import Scenario

KEYS = {"name", "value", "baseline", "ratio", "unit"}


# ---- result arithmetic ----------------------------------------------------------------------

def test_ratio_and_targets_follow_the_direction_of_better() -> None:
    def ship(value: float) -> BenchResult:
        return BenchResult(name="ship", value=value, baseline=100.0, unit="MB/s", better="higher", description="",
                           target=0.8)
    assert ship(80.0).ratio == pytest.approx(0.8) and ship(80.0).met() is True
    slow = ship(70.0)
    assert slow.met() is False
    start = BenchResult(name="startup", value=16.0, baseline=40.0, unit="s", better="lower", description="",
                        target=15.0, target_on="value")
    assert start.ratio == pytest.approx(0.4) and start.met() is False  # the target is on the value, not the ratio
    free = BenchResult(name="x", value=1.0, baseline=0.0, unit="s", better="lower", description="")
    assert math.isnan(free.ratio) and free.met() is None
    d = ship(80.0).as_dict()
    assert set(d) >= KEYS and d["ratio"] == pytest.approx(0.8) and d["target_met"] is True
    json.dumps(d)


@pytest.mark.parametrize("change, key", [
    ({"nodes": 3}, "nodes"), ({"preset": "huge"}, "preset"), ({"repeats": 0}, "repeats"),
    ({"chunk_size": 100}, "chunk_size"), ({"decode_codecs": ()}, "decode_codecs"),
    ({"score_chars": 10}, "score_chars"), ({"nodes_per_actor": 0}, "nodes_per_actor"),
    ({"packings": (4, 0)}, "packings"), ({"packing_rounds": 0}, "packing_rounds"),
])
def test_config_refuses_bad_sizes_naming_the_field(change, key) -> None:
    with pytest.raises(BenchError, match=f"^{key}:"):
        BenchConfig(**change)


def test_cli_refuses_unknown_names_and_bad_sizes_in_one_line(capsys) -> None:
    assert main(["nosuch", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown benchmark 'nosuch'") and err.count("\n") == 1
    assert main(["ship", "--quick", "--nodes", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: nodes:")
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


# ---- packing helpers ------------------------------------------------------------------------

@given(n=st.integers(1, 300), per=st.integers(1, 80))
def test_actor_groups_deal_every_node_once_within_the_packing(n: int, per: int) -> None:
    plans = [NodePlan(node_id=f"node-{i:04d}", index=i, model="base", bundle="b") for i in range(n)]
    groups = actor_groups(plans, per)
    assert len(groups) == math.ceil(n / per)
    assert all(1 <= len(g) <= per for g in groups)
    assert sorted(p.index for g in groups for p in g) == list(range(n))
    # dealt round-robin: the first len(groups) plans (the specialists) sit on distinct actors
    assert [g[0].index for g in groups] == list(range(len(groups)))


def test_packing_keeps_what_is_asked_and_packs_only_what_would_not_fit() -> None:
    assert packing(32, 1, cpus=2) == 1  # one actor per node, where it fits
    assert packing(ONE_ACTOR_PER_NODE_MAX, 1, cpus=2) == 1
    assert packing(1024, 1, cpus=2) == 256  # four actors at least: the specialists on four of them
    assert packing(1024, 1, cpus=16) == 64  # one actor per core
    assert packing(1024, 64, cpus=2) == 64  # an explicit packing is kept
    assert packing(10, 3, cpus=2) == 3


def test_the_default_packing_is_automatic_and_packs_by_cpus() -> None:
    assert Scenario().validate().federation.nodes_per_actor == AUTO
    assert packing(32, AUTO, cpus=2) == 8  # 4 actors: the packing measured fastest here (README)
    assert packing(32, AUTO, cpus=16) == 2  # one actor per core
    assert packing(3, AUTO, cpus=2) == 1
    assert packing(1024, AUTO, cpus=2) == packing(1024, 1, cpus=2) == 256


def test_process_memory_reads_this_process() -> None:
    mem = process_memory(os.getpid())
    assert mem["rss_bytes"] > 10 * 2 ** 20  # python + torch imported by the suite
    assert 0 < mem["pss_bytes"] <= mem["rss_bytes"] and 0 < mem["uss_bytes"] <= mem["pss_bytes"]
    assert process_memory(2 ** 30)["rss_bytes"] == 0  # no such process


# ---- smoke runs -----------------------------------------------------------------------------

def test_wire_benchmarks_run_and_print_json(capsys) -> None:
    assert main(["decode", "ship", "fetch_verified", "--quick", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["decode_int8", "ship", "fetch_verified"]
    for r in rows:
        assert set(r) >= KEYS
        assert r["value"] > 0 and r["baseline"] > 0 and r["ratio"] == pytest.approx(r["value"] / r["baseline"])
        assert r["unit"] == "MB/s"
    ship = rows[1]
    assert ship["detail"]["bytes"] > 0 and ship["target"] == 0.85  # issue 17's targets
    assert rows[2]["target"] == 0.5 and rows[0]["target"] == 0.25
    fetched = rows[2]["detail"]  # the same fetch of the bundle written as format 1, in the same rounds
    assert fetched["format1_node_s"] > 0 and fetched["format1_ratio"] == pytest.approx(
        fetched["bare_s"] / fetched["format1_node_s"])


@pytest.mark.slow
def test_federation_benchmarks_on_a_tiny_federation(tiny_suite) -> None:
    cfg = BenchConfig.quick()
    results = asyncio.run(run_benchmarks(["startup", "memory", "score", "mixture"], cfg, suite=tiny_suite))
    by = {r.name: r for r in results}
    assert set(by) == {"startup", "memory", "score", "mixture_k2"}
    for r in results:
        assert r.value > 0 and r.baseline > 0 and math.isfinite(r.ratio)
    start = by["startup"].detail
    assert start["packed"]["nodes"] == start["baseline"]["nodes"] == cfg.nodes
    assert start["packed"]["actors"] == math.ceil(cfg.nodes / cfg.nodes_per_actor)
    assert start["baseline"]["actors"] == math.ceil(cfg.nodes / cfg.baseline_nodes_per_actor)
    # the federation's scores are the in-process model's (same bundle bytes, same adapter blob)
    score = by["score"].detail
    assert score["tokens"] > 0 and score["max_abs_logp_diff"] < 1e-4
    assert score["concurrent_users"] == len(tiny_suite.known_users) and score["concurrent_tokens_per_s"] > 0
    mem = by["memory"].detail
    assert mem["actors"] == 2 and mem["weight_store"]["bundles"] >= 1
    assert mem["actor_pss_bytes"] <= mem["actor_rss_bytes"]
    # two specialist nodes, dealt to two different actors
    assert by["mixture_k2"].detail["k"] == 2 and by["mixture_k2"].detail["specialist_actors"] == 2


@pytest.mark.slow
def test_the_packing_sweep_starts_each_packing_and_compares_the_automatic_one(tiny_suite) -> None:
    cfg = BenchConfig.quick()
    [r] = asyncio.run(run_benchmarks(["packing"], cfg, suite=tiny_suite))
    d = r.detail
    assert r.name == "packing" and set(d["seconds"]) == {"1", str(d["auto_nodes_per_actor"]), "2"}
    assert all(len(v) == cfg.packing_rounds and min(v) > 0 for v in d["seconds"].values())
    assert r.value == d["median_s"][str(d["auto_nodes_per_actor"])] and r.baseline == d["median_s"]["1"]


def test_rounds_are_summed_up_by_their_median_not_their_best() -> None:
    from sim.bench.core import amedian_of, median_of
    a, b = iter([5.0, 1.0, 3.0]), iter([2.0, 9.0, 4.0])
    assert median_of(3, lambda: next(a), lambda: next(b)) == [3.0, 4.0]
    c = iter([1.0, 7.0, 2.0, 8.0])

    async def timed() -> float:
        return next(c)
    assert asyncio.run(amedian_of(4, timed)) == [4.5]


def test_what_ray_and_grpc_print_goes_to_the_log_and_the_rows_to_the_console(tmp_path) -> None:
    """Descriptors 1 and 2 (where the raylet's warnings and gRPC's C core write) go to the log;
    what is printed to the console stream stays on stdout."""
    log = tmp_path / "bench.log"
    code = ("import os, sys\nfrom sim.console import console_stdout, noise_to\n"
            f"with console_stdout() as c, noise_to(__import__('pathlib').Path({str(log)!r})):\n"
            "    os.write(1, b'raylet noise\\n'); os.write(2, b'grpc noise\\n'); print('row', file=c)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert run.returncode == 0, run.stderr
    assert run.stdout == "row\n" and run.stderr == ""
    assert log.read_text().splitlines() == ["raylet noise", "grpc noise"]


# ---- the scaling sweep's parts --------------------------------------------------------------

def test_process_tree_finds_a_grandchild_and_its_memory() -> None:
    from sim.actors import process_memory
    from sim.bench.scaling import process_tree
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
            "print(p.pid, flush=True); time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        tree = process_tree(child.pid)
        assert tree[0] == child.pid and grandchild in tree and os.getpid() not in tree
        assert process_memory(grandchild)["pss_bytes"] > 0
    finally:
        child.kill()
        child.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, 9)


def _row(preset: str, nodes: int, wall: float, pss_gib: float, stopped: str = "") -> dict:
    gib = 1024 ** 3
    return {"preset": preset, "nodes": nodes, "wall_s": wall, "peak_pss_bytes": pss_gib * gib,
            "peak_rss_bytes": 2 * pss_gib * gib, "phases": {"nodes_up_and_loaded": wall / 2}, "stopped": stopped}


def test_scaling_results_compare_each_size_with_the_smallest_and_keep_what_was_not_measured(tmp_path) -> None:
    from sim.bench.scaling import plot, results
    rows = [_row("tiny", 32, 10.0, 1.0), _row("tiny", 128, 25.0, 1.5),
            _row("small", 32, 40.0, 3.0), {"preset": "small", "nodes": 128, "stopped": "available memory fell"}]
    got = {r.name: r for r in results(rows)}
    assert set(got) == {"scaling_tiny_32_wall", "scaling_tiny_32_memory", "scaling_tiny_128_wall",
                        "scaling_tiny_128_memory", "scaling_small_32_wall", "scaling_small_32_memory"}
    assert got["scaling_tiny_128_wall"].ratio == pytest.approx(2.5)
    assert got["scaling_tiny_128_memory"].value == pytest.approx(1.5) and got["scaling_tiny_32_wall"].ratio == 1.0
    assert [m["nodes"] for m in got["scaling_small_32_wall"].detail["not_measured"]] == [128]
    plot(rows, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scaling_sizes_are_checked() -> None:
    with pytest.raises(BenchError, match="^scaling_nodes:"):
        BenchConfig(scaling_nodes=(2,))
    with pytest.raises(BenchError, match="^scaling_presets:"):
        BenchConfig(scaling_presets=("huge",))


def test_saved_sweeps_give_back_their_runs_as_a_table_and_a_figure(tmp_path) -> None:
    from sim.bench.scaling import main as scaling_main
    from sim.bench.scaling import results
    rows = [_row("tiny", 32, 10.0, 1.0), _row("tiny", 128, 25.0, 1.5),
            {"preset": "tiny", "nodes": 512, "stopped": "available memory fell below 3 GiB"}]
    for r in rows[:2]:
        r.update(actors=4, bytes_total=2e8, phases={"nodes_up_and_loaded": 5.0, "workload": 1.0})
    saved = tmp_path / "s.json"
    saved.write_text(json.dumps([r.as_dict() for r in results(rows)]))
    out = subprocess.run([sys.executable, "-m", "sim.bench.scaling", str(saved), "--plot", str(tmp_path / "f.png")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 + 3 and "| tiny | 128 | 4 | 25.0 s | 5.0 s |" in lines[3]
    assert "available memory fell below 3 GiB" in lines[4] and (tmp_path / "f.png").exists()
    assert scaling_main([str(tmp_path / "missing.json")]) == 2


def test_a_sweeps_rows_file_reads_back_as_its_runs(tmp_path) -> None:
    from sim.bench.scaling import rows_from_saved
    rows = [_row("tiny", 32, 10.0, 1.0), {"preset": "small", "nodes": 32, "stopped": "sim.run exited with 1"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rows_from_saved([str(tmp_path / "rows.jsonl")]) == rows
