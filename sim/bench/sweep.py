"""The sweep benchmark of `sim.bench`: what a sweep costs per point beyond the points' own runs, and
what sharing models and Ray between points saves.

The same sweep (``BenchConfig.sweep_codecs`` as the points, ``nodes`` nodes of ``preset``) runs twice
through :func:`sim.sweep.runner.run_sweep`: sharing (one Suite and one Ray for every point, as
`python -m sim.sweep` does) and sharing nothing (each point loads its models from the disk cache and
starts its own Ray, as separate `sim.run` commands in one process would; a separate command also pays
the interpreter and its imports, measured once and reported beside). The models are trained into the
disk cache first, untimed, so neither side pays for training.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from ..run import build_suite
from ..sweep.grid import build_points, expand
from ..sweep.runner import run_sweep
from .core import BenchResult
from .federation import BenchContext


def import_seconds() -> float:
    """Wall seconds of a fresh interpreter importing sim.run (what every separate command pays first)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import sim.run"], check=True, capture_output=True)
    return time.perf_counter() - t


async def sweep(ctx: BenchContext) -> list[BenchResult]:
    """Per-point wall seconds of a sharing sweep against one sharing nothing, and the sweep's own overhead."""
    cfg = ctx.config
    await ctx.close()  # no federation or Ray of other benchmarks left running: the unshared points start their own
    data = {"name": "bench-sweep", "federation": {"nodes": cfg.nodes, "preset": cfg.preset, "seed": cfg.seed},
            "soup": {"nodes": 0}}
    points = build_points(data, expand({"model.expert_codec": list(cfg.sweep_codecs)}, []), {})
    for p in points:
        if p.scenario is None:
            raise ValueError(f"sweep point {p.index} refused: {p.error}")
        build_suite(p.scenario, progress=False)  # into the disk cache, untimed
    runs = {}
    for share in (True, False):
        t = time.perf_counter()
        runs[share] = await run_sweep("bench-sweep", points, ctx.tmpdir(f"sweep-share{int(share)}"),
                                      command="sim.bench sweep", definition={}, progress=False, share=share,
                                      started=t, say=lambda line: None)
    n = len(points)
    shared, alone = runs[True]["timing"], runs[False]["timing"]
    failed = [r for s in runs.values() for r in s["rows"] if r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"sweep point {failed[0]['point']} failed: {failed[0].get('error')}")
    own = statistics.median(p["run_seconds"] for p in shared["points"])
    detail = {"points": n, "codecs": list(cfg.sweep_codecs), "nodes": cfg.nodes, "preset": cfg.preset,
              "shared": shared, "unshared": alone, "interpreter_and_imports_s": round(import_seconds(), 2),
              "shared_what": runs[True]["shared"]}
    return [
        BenchResult(name="sweep_point", value=shared["wall_seconds"] / n, baseline=alone["wall_seconds"] / n,
                    unit="s", better="lower",
                    description=f"wall seconds per sweep point ({n} points, {cfg.nodes} nodes, {cfg.preset}): models "
                                "and Ray shared vs nothing shared (each point loads its models, starts its Ray)",
                    detail=detail),
        BenchResult(name="sweep_overhead", value=shared["overhead_per_point_s"], baseline=own, unit="s",
                    better="lower",
                    description="the sweep's own wall seconds per point (checks, Ray once, rows, sweep.json/md, "
                                "plots; models excluded) vs a point's own run (median; its report and plots included)",
                    detail={"overhead_seconds": shared["overhead_seconds"], "ray_seconds": shared["ray_seconds"],
                            "models_seconds": shared["models_seconds"]}),
    ]
