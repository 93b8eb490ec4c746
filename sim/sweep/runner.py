"""Running a sweep's points, one real federation run each, sharing what can be shared safely.

Each point is ``sim.run.run_federation`` on its own scenario, into its own folder: its own coordinator
(registry, store, tokens), its own node actors and bundles, its own workload and report. Shared between
points (``share=True``), because sharing cannot change what a point measures:

* the trained models: one ``model.pipeline.Suite`` per set of models (preset, seed, users, corpus), trained
  or loaded once and held in memory (its weights are read, never written, by a run), and the uncompressed
  perplexities of the codec-cost section, which depend only on the models and the texts;
* the bundles: a model encoded with the same codecs (and a soup bank with the same soup settings) is
  written once, by the first point that ships it; each point's coordinator copies it into its own store;
* Ray: started once (or connected once, for points that all name the same ``federation.address``); each
  point's node actors are its own processes, started and killed by the point, as in ``sim.run``.

``share=False`` gives every point a fresh Suite loaded from the disk cache and a Ray of its own, as
separate ``sim.run`` commands would (``python -m sim.bench sweep`` compares the two).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from model.pipeline import Suite

from ..actors import init_ray
from ..run import build_suite, live_parts, run_federation, suite_key
from .grid import Point, varied_keys
from .rows import failed_row, mark_frontiers, row_of

SWEEP_FILES = ("sweep.json", "sweep.md")


def clear_sweep(out: Path) -> None:
    """Remove a previous sweep's combined report and plots from ``out`` (point folders are each
    cleared by their own run)."""
    for path in [*(out / n for n in SWEEP_FILES), *out.glob("sweep_*.png")]:
        path.unlink(missing_ok=True)


def shared_suites(points: list[Point], corpus_dir: str | None, progress: bool) -> dict[tuple, Suite]:
    """One Suite per set of models, with every model any of its points needs trained or loaded."""
    suites: dict[tuple, Suite] = {}
    for p in points:
        assert p.scenario is not None  # runnable points only
        key = suite_key(p.scenario)
        suites[key] = build_suite(p.scenario, corpus_dir=corpus_dir, progress=progress, suite=suites.get(key))
    return suites


async def run_points(points: list[Point], out: Path, *, corpus_dir: str | None = None, progress: bool = True,
                     share: bool = True, say: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    """Run every point that has a scenario, in order, each into ``out/<its folder>``; returns the rows of
    all points (refused and failed ones too) in point order, and where the wall time went."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    runnable = [p for p in points if p.scenario is not None]
    timing: dict[str, Any] = {"models_seconds": 0.0, "ray_seconds": 0.0, "points": []}
    shared: list[str] = []
    suites: dict[tuple, Suite] = {}
    bundles: dict[tuple, dict] = {}  # per model set: the bundles written so far, by model and codecs
    ray_here = False
    if share and runnable:
        t = time.perf_counter()
        suites = shared_suites(runnable, corpus_dir, progress)
        timing["models_seconds"] = time.perf_counter() - t
        shared.append(f"models ({len(suites)} model set{'s' * (len(suites) != 1)})")
        shared.append("bundles (one per model and codecs)")
        addresses = {p.scenario.federation.address for p in runnable if p.scenario is not None}
        if len(addresses) == 1:
            t = time.perf_counter()
            ray_here = init_ray(addresses.pop())
            timing["ray_seconds"] = time.perf_counter() - t
            shared.append("Ray")
    rows: list[dict] = []
    try:
        for p in points:
            common: dict[str, Any] = {"point": p.index, "folder": p.folder, "values": p.values}
            if p.scenario is None:
                rows.append(failed_row(**common, status="refused", error=p.error or "refused"))
                continue
            scn = p.scenario
            t = time.perf_counter()
            run_s = 0.0
            try:
                suite = build_suite(scn, corpus_dir=corpus_dir, progress=progress, suite=suites[suite_key(scn)]) \
                    if share else None
                t_run = time.perf_counter()
                try:
                    await run_federation(scn, out / p.folder, suite=suite, progress=progress, corpus_dir=corpus_dir,
                                         extra=live_parts(scn),
                                         bundle_cache=bundles.setdefault(suite_key(scn), {}) if share else None)
                finally:
                    run_s = time.perf_counter() - t_run  # the point's own run, its report and plots included
                report = json.loads((out / p.folder / "report.json").read_text())  # the row is what was written
                rows.append(row_of(report, **common))
            except Exception as exc:  # noqa: BLE001 - whatever stops one point is that point's row; the rest run
                rows.append(failed_row(**common, status="failed",
                                       error=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"))
            seconds = time.perf_counter() - t
            timing["points"].append({"point": p.index, "run_seconds": round(run_s, 3), "seconds": round(seconds, 3)})
            say(progress_line(rows[-1], len(points), seconds))
    finally:
        if ray_here:
            ray.shutdown()
    timing["frontier"] = mark_frontiers(rows).to_dict()
    timing["shared"] = shared
    return rows, timing


def progress_line(row: dict, total: int, seconds: float) -> str:
    """One console line per finished point."""
    head = f"[{row['point']}/{total}] {', '.join(f'{k}={v}' for k, v in row['values'].items()) or 'the scenario'}"
    if row["status"] != "ok":
        return f"{head}: {row['status']}: {row['error']}"
    ppl = "—" if row["ppl"] is None else f"{row['ppl']:.3f}"
    live = "" if "live_bytes" not in row else (
        f"; partial node {row['live_bytes'] / 1e6:.2f} MB, hit rate {row['hit_rate']:.3f}, stall "
        f"{row['stall_seconds']:.1f} s virtual, ppl x{row['live_ppl_ratio']:.4f} of the full node")
    return (f"{head}: {row['bytes_total'] / 1e6:.2f} MB, shipping {row['shipping_makespan_s']:.1f} s virtual, "
            f"ppl {ppl}, {row['requests_failed']} failed{live}, {seconds:.1f} s wall")


async def run_sweep(name: str, points: list[Point], out: Path, *, command: str, definition: dict,
                    corpus_dir: str | None = None, progress: bool = True, share: bool = True,
                    started: float | None = None, say: Callable[[str], None] | None = None) -> dict:
    """Run the points and write sweep.json, sweep.md and the plots into ``out``; returns sweep.json's data.

    ``started`` (a ``time.perf_counter()``) is when the sweep began (before its points were checked), so
    that the overhead counts the checks too; ``definition`` is what the sweep was asked (grid, points, flags).
    """
    from .report import write

    started = time.perf_counter() if started is None else started
    out.mkdir(parents=True, exist_ok=True)
    clear_sweep(out)
    rows, timing = await run_points(points, out, corpus_dir=corpus_dir, progress=progress, share=share, say=say)
    points_seconds = sum(p["run_seconds"] for p in timing["points"])
    models_seconds = timing["models_seconds"]
    summary: dict[str, Any] = {"name": name, "command": command, "definition": definition,
                               "keys": varied_keys(points), "shared": timing.pop("shared"),
                               "frontier": timing.pop("frontier"), "rows": rows, "timing": timing}

    def account() -> None:
        wall = time.perf_counter() - started
        overhead = wall - models_seconds - points_seconds
        timing.update(wall_seconds=round(wall, 2), points_seconds=round(points_seconds, 2),
                      models_seconds=round(models_seconds, 2), ray_seconds=round(timing["ray_seconds"], 2),
                      overhead_seconds=round(overhead, 2),
                      overhead_per_point_s=round(overhead / len(timing["points"]), 3) if timing["points"] else None)
    account()
    write(out, summary)  # the plots are overhead too: timed, then the figures written again with them counted
    account()
    write(out, summary, plots=False)
    return summary
