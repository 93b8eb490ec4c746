"""`python -m sim.bench scaling`: what a whole `sim.run` costs as the federation grows.

Each size is a real ``python -m sim.run --nodes N --preset P --quiet`` in a process of its own,
one at a time, so that a run's memory is its own: its wall time (the process, start to exit, and
the report's phases) and its peak memory, sampled every ``sample_s`` over the run's whole process
tree (the driver with the coordinator, Ray's GCS and raylet, the node actors). Memory is reported
as the sum of RSS and the sum of PSS (shared pages, torch's libraries in every actor, split among
the processes that map them: what the run adds to the machine).

A run is stopped when the machine's available memory falls below ``min_free_gib`` (what else runs
here needs it too); that size and the larger ones of its preset are reported as not measured, with
the reason. Each result compares a size with the smallest one of its preset (``ratio``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..actors import process_memory
from .core import BenchError, BenchResult

GIB = 1024 ** 3


def _children() -> dict[int, list[int]]:
    """{pid: child pids} of every process this user can see (Linux ``/proc``)."""
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # after "pid (comm) state"
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it."""
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def available_bytes() -> int:
    """MemAvailable of the machine (``/proc/meminfo``)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise BenchError("/proc/meminfo has no MemAvailable")


def run_once(preset: str, nodes: int, out: Path, *, seed: int = 0, sample_s: float = 0.5,
             min_free_gib: float = 3.0, timeout_s: float = 1800.0) -> dict:
    """One ``sim.run`` of ``nodes`` nodes at ``preset``: wall seconds, peak memory of its process tree,
    the report's phases. ``stopped`` says why a run was ended early ("" when it finished)."""
    cmd = [sys.executable, "-m", "sim.run", "--nodes", str(nodes), "--preset", preset, "--seed", str(seed),
           "--quiet", "--out", str(out)]
    peak_rss = peak_pss = peak_procs = 0
    least_free = available_bytes()
    stopped = ""
    load_start = os.getloadavg()[0]  # the machine is shared: say how busy it was
    t0 = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                tree = process_tree(proc.pid)
                mem = [process_memory(pid) for pid in tree]
                peak_rss = max(peak_rss, sum(m["rss_bytes"] for m in mem))
                peak_pss = max(peak_pss, sum(m["pss_bytes"] for m in mem))
                peak_procs = max(peak_procs, len(tree))
                least_free = min(least_free, available_bytes())
                if least_free < min_free_gib * GIB:
                    stopped = f"available memory fell below {min_free_gib:g} GiB"
                elif time.perf_counter() - t0 > timeout_s:
                    stopped = f"still running after {timeout_s:g} s"
                if stopped:
                    _stop(proc, tree)
                    break
                time.sleep(sample_s)
        finally:
            if proc.poll() is None:
                _stop(proc, process_tree(proc.pid))
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {"preset": preset, "nodes": nodes, "wall_s": round(wall, 2), "peak_rss_bytes": peak_rss,
           "peak_pss_bytes": peak_pss, "peak_processes": peak_procs, "least_available_bytes": least_free,
           "returncode": proc.returncode, "stopped": stopped,
           "load_average": [round(load_start, 1), round(os.getloadavg()[0], 1)]}
    report = out / "report.json"
    if not stopped and proc.returncode == 0 and report.exists():
        r = json.loads(report.read_text())
        row.update(run_wall_s=r["wall_seconds"], phases=r["wall_phases"], bytes_total=r["bytes_total"],
                   requests=r["requests"]["total"], failed=r["requests"]["failed"],
                   actors=len(r["memory"]["actors"]), actors_pss_bytes=r["memory"]["pss_bytes"])
    elif not stopped:
        row["stopped"] = f"sim.run exited with {proc.returncode} (log: {out.with_suffix('.log')})"
    return row


def _stop(proc: subprocess.Popen, tree: list[int]) -> None:
    """End a run: its process group (started here), then any of its descendants outside it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
            break
        except subprocess.TimeoutExpired:
            continue
    for pid in tree[1:]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def holding(lock: str):
    """Hold an exclusive ``flock`` on the file ``lock`` (created if need be) while the block runs;
    nothing when ``lock`` is "". The same lock as ``flock(1)``: heavy jobs of a shared machine queue on it."""
    if not lock:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sweep(presets: tuple[str, ...], sizes: tuple[int, ...], out: Path, *, seed: int = 0,
          min_free_gib: float = 3.0, warmup: bool = True, lock: str = "", progress=None) -> list[dict]:
    """Every preset at every size, smallest first, one run at a time; a preset stops at its first failure.

    ``warmup``: a run of each preset at the smallest size first, not reported, so that no measured
    run trains the preset's models (a Soup-of-Experts bank is built only from 16 nodes on) or reads
    them from a cold disk. ``lock``: a file each run holds a ``flock`` on
    (and only while it runs), so that other heavy jobs on the machine never overlap a measured run.
    Each run's row is appended to ``out/rows.jsonl`` as soon as it ends.
    """
    rows: list[dict[str, Any]] = []
    out.mkdir(parents=True, exist_ok=True)

    def once(preset: str, n: int, name: str) -> dict[str, Any]:
        with holding(lock):
            return run_once(preset, n, out / name, seed=seed, min_free_gib=min_free_gib)

    for preset in presets:
        failed = ""
        if warmup:
            warm = once(preset, min(sizes), f"{preset}-warmup")
            failed = warm["stopped"] and f"the warm-up run failed ({warm['stopped']})"
        for n in sorted(sizes):
            if failed:
                rows.append({"preset": preset, "nodes": n, "stopped": f"not run: {failed} before it"})
            else:
                rows.append(once(preset, n, f"{preset}-{n}"))
                failed = rows[-1]["stopped"]
            with open(out / "rows.jsonl", "a") as f:  # kept as it goes: a sweep cut short keeps its runs
                f.write(json.dumps(rows[-1]) + "\n")
            if progress:
                progress(rows[-1])
    return rows


def results(rows: list[dict]) -> list[BenchResult]:
    """Wall time and peak PSS of each measured size against the smallest measured size of its preset;
    the sizes not measured (and why) in the detail of the preset's last wall-time result."""
    out: list[BenchResult] = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        done = [r for r in rows if r["preset"] == preset and not r["stopped"]]
        if not done:
            continue
        base = done[0]
        for r in done:
            n, n0 = r["nodes"], base["nodes"]
            out.append(BenchResult(
                name=f"scaling_{preset}_{n}_wall", value=r["wall_s"], baseline=base["wall_s"], unit="s",
                better="lower", description=f"whole sim.run of {n} {preset} nodes vs {n0} nodes (process wall time)",
                detail=dict(r)))
            out.append(BenchResult(
                name=f"scaling_{preset}_{n}_memory", value=r["peak_pss_bytes"] / GIB,
                baseline=base["peak_pss_bytes"] / GIB, unit="GiB", better="lower",
                description=f"peak PSS of the run's process tree, {n} {preset} nodes vs {n0} nodes",
                detail={"peak_rss_gib": r["peak_rss_bytes"] / GIB}))
        out[-2].detail["not_measured"] = [r for r in rows if r["preset"] == preset and r["stopped"]]
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Wall time and peak memory against nodes, one line per preset (log-scaled node axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for preset in dict.fromkeys(r["preset"] for r in rows):
        done = [r for r in rows if r["preset"] == preset and not r["stopped"]]
        if not done:
            continue
        n = [r["nodes"] for r in done]
        ax_t.plot(n, [r["wall_s"] for r in done], "o-", label=f"{preset}: whole run")
        ax_t.plot(n, [r["phases"]["nodes_up_and_loaded"] for r in done], "s--", label=f"{preset}: nodes up and loaded")
        ax_m.plot(n, [r["peak_pss_bytes"] / GIB for r in done], "o-", label=f"{preset}: PSS")
        ax_m.plot(n, [r["peak_rss_bytes"] / GIB for r in done], "x:", label=f"{preset}: RSS")
    for ax, ylabel in ((ax_t, "wall time (s)"), (ax_m, "peak memory of the run's processes (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("federation nodes")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_title("sim.run wall time")
    ax_m.set_title("sim.run peak memory")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_row(row: dict) -> None:
    """One line on the console (sys.stderr stays there while the noise goes to the log) per run."""
    what = row["stopped"] or (f"{row['wall_s']:.1f} s, peak PSS {row['peak_pss_bytes'] / GIB:.2f} GiB, "
                              f"RSS {row['peak_rss_bytes'] / GIB:.2f} GiB")
    print(f"scaling {row['preset']} {row['nodes']} nodes: {what}", file=sys.stderr, flush=True)


async def scaling(ctx) -> list[BenchResult]:
    """The `scaling` benchmark: the sweep of ``ctx.config`` (its plot, when ``scaling_plot`` is set)."""
    import asyncio

    cfg = ctx.config
    out = ctx.tmpdir("scaling")
    rows = await asyncio.get_running_loop().run_in_executor(None, lambda: sweep(
        cfg.scaling_presets, cfg.scaling_nodes, out, seed=cfg.seed, min_free_gib=cfg.scaling_min_free_gib,
        lock=cfg.scaling_lock, warmup=cfg.scaling_warmup, progress=_print_row))
    if cfg.scaling_plot:
        plot(rows, Path(cfg.scaling_plot))
    got = results(rows)
    if not got:
        raise BenchError("scaling: no size could be measured: " + "; ".join(r["stopped"] for r in rows))
    return got


def rows_from_saved(paths: list[str]) -> list[dict]:
    """The runs kept in `sim.bench scaling --save` files (measured ones and those not measured), or in
    a sweep's ``rows.jsonl`` (one run a line, as each ended: what a sweep cut short leaves)."""
    rows: list[dict] = []
    for path in paths:
        try:
            text = Path(path).read_text()
            if path.endswith(".jsonl"):
                rows += [json.loads(line) for line in text.splitlines() if line.strip()]
                continue
            saved = json.loads(text)
        except (OSError, ValueError) as exc:
            raise BenchError(f"{path}: not a saved benchmark list ({exc})") from None
        for r in saved:
            if r.get("name", "").startswith("scaling_") and r["name"].endswith("_wall"):
                rows.append({k: v for k, v in r["detail"].items() if k != "not_measured"})
                rows += r["detail"].get("not_measured", [])
    return rows


def table(rows: list[dict]) -> str:
    """A Markdown table of the runs (docs/performance.md)."""
    lines = ["| preset | nodes | actors | whole run | nodes up and loaded | workload | peak PSS | peak RSS "
             "| bundle bytes |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["stopped"]:
            lines.append(f"| {r['preset']} | {r['nodes']} | | {r['stopped']} | | | | | |")
            continue
        p = r["phases"]
        lines.append(f"| {r['preset']} | {r['nodes']} | {r['actors']} | {r['wall_s']:.1f} s "
                     f"| {p['nodes_up_and_loaded']:.1f} s | {p['workload']:.1f} s "
                     f"| {r['peak_pss_bytes'] / GIB:.2f} GiB | {r['peak_rss_bytes'] / GIB:.2f} GiB "
                     f"| {r['bytes_total'] / 1e9:.2f} GB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m sim.bench.scaling SAVED.json|rows.jsonl ... [--plot FILE.png]`: the table (and figure)
    of saved sweeps."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sim.bench.scaling",
                                 description="The table and the figure of scaling sweeps saved by "
                                             "`python -m sim.bench scaling --save FILE.json`.")
    ap.add_argument("saved", nargs="+", metavar="SAVED.json|rows.jsonl")
    ap.add_argument("--plot", metavar="FILE.png", help="draw the figure there")
    args = ap.parse_args(argv)
    try:
        rows = rows_from_saved(args.saved)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.plot:
        plot(rows, Path(args.plot))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
