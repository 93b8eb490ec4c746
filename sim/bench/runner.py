"""`python -m sim.bench`: performance as ratios against baselines measured in the same run.

    python -m sim.bench                        # every benchmark, full sizes (minutes; trains `small` once)
    python -m sim.bench ship score --json      # some of them, as JSON
    python -m sim.bench --quick                # small sizes (the test suite's smoke test)

Each benchmark measures a value and its baseline back to back in the same process, so that the
load of a busy machine hits both alike; what counts is ``ratio = value / baseline``. Whether a
higher or a lower ratio is better is in ``better``, the issue's target (if any) in ``target``.
Value and baseline are the medians of their interleaved rounds. What Ray and gRPC print goes to
``--log`` (runs/bench/stderr.log), not to the console.

    decode          bundle verify + decode (node.assembly.decode_bundle) vs copying the decoded tensors
    ship            NodeControl.FetchBundle through the coordinator vs a bare grpc.aio stream, same bytes and chunks
    fetch_verified  the node's own fetch (node.fetch: verified while streaming) vs the same bare stream
    score           Federation.Score through coordinator and a node vs the same model scoring in-process
    startup         N nodes up and loaded, packed into few actors vs one actor per node
    packing         N nodes up and loaded at each packing, the automatic one vs one actor per node
                    (run only when named: one federation per packing and round, minutes)
    memory          memory per simulated node (actor RSS / nodes) vs one bare Ray actor importing torch
    mixture         Score over a K-node mixture vs a mixture of one node (latency)
    scaling         whole `sim.run`s at each size and preset: wall time and peak memory of the run's
                    processes vs the smallest size (run only when named: tens of minutes)
    sweep           wall seconds per sim.sweep point, models and Ray shared vs nothing shared, and the
                    sweep's own overhead per point (run only when named: the sweep's points, twice)
    des_loop        FIFO node queues: the planner's vectorised recursion vs a heapq event loop (and SimPy if installed)
    plan            sim.plan's week of scenarios/target_215k.toml (wall s) vs a heapq loop at its measured rate
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import ConfigError

from ..actors import RayStartError
from ..console import console_stdout, noise_to
from .core import BenchConfig, BenchError, BenchResult


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark: its name, one line of description, and the coroutine that runs it."""

    name: str
    summary: str
    run: Callable  # async (BenchContext) -> list[BenchResult]
    default: bool = True  # run when no names are given


def registry() -> dict[str, Benchmark]:
    """Every benchmark by name, in the order they run."""
    from . import federation, plan, scaling, sweep, wire

    items = [
        Benchmark("decode", "bundle verify+decode vs a plain copy of the decoded tensors", wire.decode),
        Benchmark("ship", "FetchBundle through the coordinator vs a bare grpc.aio stream", wire.ship),
        Benchmark("fetch_verified", "the node's verifying fetch vs a bare grpc.aio stream",
                  wire.fetch_verified),
        Benchmark("startup", "nodes up and loaded: packed actors vs one actor per node",
                  federation.startup),
        Benchmark("packing", "nodes up and loaded at each packing vs one actor per node (only when named)",
                  federation.packing_sweep, default=False),
        Benchmark("memory", "memory per simulated node vs one bare Ray actor importing torch",
                  federation.memory),
        Benchmark("scaling", "wall time and peak memory of whole sim.runs by size (only when named)",
                  scaling.scaling, default=False),
        Benchmark("score", "Federation.Score throughput vs the same model in-process",
                  federation.score),
        Benchmark("mixture", "latency of a K-node mixture vs one node", federation.mixture),
        Benchmark("sweep", "per sim.sweep point: shared models and Ray vs nothing shared; overhead (only when named)",
                  sweep.sweep, default=False),
        Benchmark("des_loop", "FIFO node queues: vectorised recursion vs heapq event loop (vs SimPy if installed)",
                  plan.des_loop),
        Benchmark("plan", "sim.plan: the target scenario's week, wall seconds", plan.plan),
    ]
    return {b.name: b for b in items}


async def run_benchmarks(names: list[str] | None = None, config: BenchConfig | None = None, *, suite=None,
                         progress: Callable[[str], None] | None = None) -> list[BenchResult]:
    """Run the named benchmarks (all when None) and return their results, in registry order.

    ``suite`` (a ``model.pipeline.Suite`` of ``config.preset``) is trained or loaded on first need
    when not given. Ray is started if needed and shut down again only if started here.
    """
    from .federation import BenchContext

    config = config or BenchConfig()
    reg = registry()
    unknown = [n for n in names or [] if n not in reg]
    if unknown:
        raise BenchError(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(reg)}")
    chosen = [b for b in reg.values() if (b.name in names if names else b.default)]
    ctx = BenchContext(config, suite=suite)
    results: list[BenchResult] = []
    try:
        for b in chosen:
            t0 = time.perf_counter()
            got = await b.run(ctx)
            for r in got:
                r.detail.setdefault("bench_seconds", round(time.perf_counter() - t0, 2))
            results += got
            if progress:
                for r in got:
                    progress(format_row(r))
    finally:
        await ctx.close()
    return results


def _fmt(x: float) -> str:
    if x != x:
        return "nan"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.1f}M"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def format_row(r: BenchResult) -> str:
    """One line of the text table."""
    met = {True: "yes", False: "NO", None: ""}[r.met()]
    tgt = "" if r.target is None else (">=" if r.better == "higher" else "<=") + f"{r.target:g}" + \
        ("" if r.target_on == "ratio" else f" {r.unit}")
    return f"{r.name:<16} {_fmt(r.value):>9} {_fmt(r.baseline):>9} {r.ratio:>7.3f}  {r.unit:<12} {tgt:<12} {met:<4}"


def format_table(results: list[BenchResult]) -> str:
    """A Markdown table of results (the README's Performance section uses it)."""
    lines = ["| benchmark | value | baseline | ratio | unit | better | target | met | what |",
             "| --- | ---: | ---: | ---: | --- | --- | --- | --- | --- |"]
    for r in results:
        met = {True: "yes", False: "**no**", None: ""}[r.met()]
        tgt = "" if r.target is None else (">= " if r.better == "higher" else "<= ") + f"{r.target:g}" + \
            ("" if r.target_on == "ratio" else f" {r.unit}")
        lines.append(f"| {r.name} | {_fmt(r.value)} | {_fmt(r.baseline)} | {r.ratio:.3f} | {r.unit} | {r.better} "
                     f"| {tgt} | {met} | {r.description} |")
    return "\n".join(lines)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The configuration: full sizes, or --quick, with any size flags on top."""
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    changes = {k: getattr(args, k) for k in ("preset", "nodes", "nodes_per_actor", "baseline_nodes_per_actor",
                                             "repeats", "decode_shape", "seed", "packing_rounds")
               if getattr(args, k) is not None}
    if args.packings:
        try:
            changes["packings"] = tuple(int(k) for k in args.packings.split(",") if k.strip())
        except ValueError:
            raise BenchError(f"packings: must be comma-separated integers, got {args.packings!r}") from None
    for key, conv in (("scaling_nodes", int), ("scaling_presets", str)):
        text = getattr(args, key)
        if text:
            try:
                changes[key] = tuple(conv(k.strip()) for k in text.split(",") if k.strip())
            except ValueError:
                raise BenchError(f"{key}: must be comma-separated, got {text!r}") from None
    if args.min_free_gib is not None:
        changes["scaling_min_free_gib"] = args.min_free_gib
    if args.plot:
        changes["scaling_plot"] = args.plot
    if args.lock:
        changes["scaling_lock"] = args.lock
    if args.no_warmup:
        changes["scaling_warmup"] = False
    if args.codecs:
        changes["decode_codecs"] = tuple(c.strip() for c in args.codecs.split(",") if c.strip())
    return dataclasses.replace(cfg, **changes)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m sim.bench`."""
    reg_names = list(registry())
    ap = argparse.ArgumentParser(prog="python -m sim.bench", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help=f"benchmarks to run (default all but packing): {', '.join(reg_names)}")
    ap.add_argument("--json", action="store_true",
                    help="print a JSON list of {name, value, baseline, ratio, unit, ...}")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--save", metavar="FILE.json", help="also write the JSON list to FILE.json")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--log", default="runs/bench/stderr.log", metavar="FILE",
                    help="where what Ray and gRPC print goes (default runs/bench/stderr.log)")
    ap.add_argument("--quick", action="store_true", help="small sizes (tiny preset, 4 nodes): a smoke test")
    ap.add_argument("--preset", help="trained preset of the federation benchmarks (default small; quick: tiny)")
    ap.add_argument("--nodes", type=int, help="federation size (default 32; quick: 4)")
    ap.add_argument("--nodes-per-actor", type=int, help="packing of the measured federation (default 8)")
    ap.add_argument("--baseline-nodes-per-actor", type=int, help="packing of the start-up baseline (default 1)")
    ap.add_argument("--repeats", type=int, help="interleaved rounds per measurement (default 5)")
    ap.add_argument("--packings", help="comma-separated nodes per actor of the packing sweep (default 1,4,8,16)")
    ap.add_argument("--packing-rounds", type=int, help="rounds of the packing sweep (default 2)")
    ap.add_argument("--decode-shape", help="model shape of the decode/ship bundles (default 30m; quick: tiny)")
    ap.add_argument("--codecs", help="comma-separated expert codecs of the decode benchmark (default int8,ternary)")
    ap.add_argument("--scaling-nodes", help="comma-separated sizes of the scaling sweep (default 32,128,512,1024)")
    ap.add_argument("--scaling-presets", help="comma-separated presets of the scaling sweep (default tiny,small)")
    ap.add_argument("--min-free-gib", type=float,
                    help="stop a scaling run when the machine has less memory available (default 3)")
    ap.add_argument("--plot", metavar="FILE.png", help="draw the scaling sweep's figure there")
    ap.add_argument("--no-warmup", action="store_true",
                    help="no unreported warm-up run per preset before the scaling sweep's runs")
    ap.add_argument("--lock", metavar="FILE",
                    help="each scaling run holds a flock on FILE while it runs (e.g. /tmp/heavy.lock)")
    ap.add_argument("--seed", type=int, help="seed of every random choice (default 0)")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads of this process (default 1)")
    args = ap.parse_args(argv)
    if args.list:
        for b in registry().values():
            print(f"{b.name:<16} {b.summary}")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # One intra-op thread, as every node process runs: with more threads than free cores, OpenMP's
    # spin-waiting makes torch calls 10-100x slower on a loaded machine (and the ratios noise).
    torch.set_num_threads(args.torch_threads)
    try:
        cfg = config_from_args(args)
        bad = [n for n in args.names if n not in reg_names]
        if bad:
            raise BenchError(f"unknown benchmark {bad[0]!r}; choose from {', '.join(reg_names)}")
        quiet = args.json or args.markdown
        # Ray's raylet warnings and gRPC's notices go to the log (stdout stays pure JSON with --json);
        # the table's rows go to the console as each benchmark ends
        with console_stdout() as console, noise_to(Path(args.log)):
            if not quiet:
                print(f"{'benchmark':<16} {'value':>9} {'baseline':>9} {'ratio':>7}  {'unit':<12} {'target':<12} met",
                      file=console)
            results = asyncio.run(run_benchmarks(
                args.names or None, cfg, progress=None if quiet else lambda line: print(line, file=console)))
    except (BenchError, ConfigError, RayStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    rows = [r.as_dict() for r in results]
    if args.save:
        Path(args.save).write_text(json.dumps(rows, indent=1) + "\n")
    if args.json:
        print(json.dumps(rows, indent=1))
    elif args.markdown:
        print(format_table(results))
    return 0

