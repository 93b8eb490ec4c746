"""`python -m sim.sweep`: a grid of federation runs and one report comparing them.

    python -m sim.sweep --scenario scenarios/sweep_codecs_links.toml --out runs/sweep
    python -m sim.sweep --scenario scenarios/sweep_prefetch.toml --out runs/sweep-prefetch   # live prefetching
    python -m sim.sweep --preset tiny --nodes 4 --grid model.expert_codec=fp16,int8,ternary
    python -m sim.sweep --scenario F.toml --grid network.default_link=4g,satellite --dry-run

The scenario file's [sweep] table names scenario keys and their values (see scenarios/sweep_codecs_links.toml):
[sweep.grid] runs the cross product, [[sweep.points]] a listed set (crossed with the grid when both are
given); --grid KEY=V1,V2,... adds or replaces a grid axis. sim.run's flags (--preset, --nodes, --seed,
--codec, ...) override every point; a flag that sets a key the sweep varies is refused.

Every point is a whole federation run (as sim.run) with its report in OUT/NN-key=value-.../; points that
cannot run are refused before anything starts, one line each (--skip-refused runs the others). A single
value of a list-valued key is a list of one; a live prefetch point ([prefetch] live) runs one partial node,
and the frontiers are then of that node's bytes and stall seconds against its ppl / the full node's.
Writes OUT/sweep.json, OUT/sweep.md (one row per point, the Pareto frontiers of bytes and of virtual
shipping time against perplexity marked) and PNG plots; what Ray and gRPC print goes to OUT/stderr.log.
Compare two runs with `python -m sim.compare OUT/01-... OUT/02-...`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from model.config import ConfigError
from model.corpora import CorpusError

from ..actors import RayStartError
from ..console import noise_to
from ..network import NetworkError
from ..run import add_scenario_arguments, flag_overrides
from ..scenario import ScenarioError
from .grid import Point, SweepError, build_points, expand, parse_grid_arg, parse_table, read_file
from .runner import run_sweep


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments: sim.run's flags (overriding every point) and the sweep's own."""
    ap = argparse.ArgumentParser(prog="python -m sim.sweep", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    add_scenario_arguments(ap, out="runs/sweep")
    ap.add_argument("--grid", action="append", metavar="KEY=V1,V2,...",
                    help="a grid axis: scenario key section.key and its values (repeatable; replaces the "
                         "file's axis of the same key)")
    ap.add_argument("--dry-run", action="store_true", help="list the points (and the refused ones), run nothing")
    ap.add_argument("--skip-refused", action="store_true",
                    help="run the points that can run when some are refused (default: refuse the sweep)")
    ap.add_argument("--no-share", action="store_true",
                    help="share nothing between points (each loads its models and starts its own Ray, as "
                         "separate sim.run commands would): to measure what sharing saves")
    return ap.parse_args(argv)


def plan(args: argparse.Namespace) -> tuple[str, list[Point], dict]:
    """The sweep's name, its points (checked) and its definition, from the file and the command line."""
    data, table = read_file(args.scenario)
    grid, listed = parse_table(table)
    for text in args.grid or []:
        key, values = parse_grid_arg(text)
        grid[key] = values
    if not grid and not listed:
        raise SweepError("nothing to sweep: give the scenario a [sweep] table or pass --grid KEY=V1,V2,...")
    flags = flag_overrides(args)
    points = build_points(data, expand(grid, listed), flags, corpus_dir=args.corpus)
    return str(data.get("name", "sweep")), points, {"grid": grid, "points": listed, "flags": flags}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m sim.sweep`."""
    started = time.perf_counter()
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        name, points, definition = plan(args)
    except (SweepError, ScenarioError, ConfigError, CorpusError, NetworkError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    refused = [p for p in points if p.error]
    for p in refused:
        print(f"refused: point {p.index} ({p.label()}): {p.error}", file=sys.stderr)
    runnable = [p for p in points if p.scenario is not None]
    if args.dry_run:
        for p in runnable:
            print(f"point {p.index} ({p.label()}): {Path(args.out) / p.folder}")
        return 2 if refused and not args.skip_refused else 0
    if not runnable or (refused and not args.skip_refused):
        print(f"error: {len(refused)} of {len(points)} points refused; fix them"
              + ("" if not runnable else " or pass --skip-refused to run the other points"), file=sys.stderr)
        return 2
    out = Path(args.out)
    command = "python -m sim.sweep " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        with noise_to(out / "stderr.log"):
            summary = asyncio.run(run_sweep(name, points, out, command=command, definition=definition,
                                            corpus_dir=args.corpus, progress=not args.quiet,
                                            share=not args.no_share, started=started))
    except RayStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    rows = summary["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    t = summary["timing"]
    whose = " (the partial nodes': bytes and stall against ppl / full)" if summary["frontier"]["kind"] == "live" else ""
    print(f"{len(ok)} of {len(rows)} points ran in {t['wall_seconds']:.1f} s (sweep overhead "
          f"{t['overhead_per_point_s'] or 0:.2f} s per point){whose}; on the bytes/ppl frontier: "
          f"{', '.join(str(r['point']) for r in ok if r.get('frontier_bytes')) or 'none'}; "
          f"on the time/ppl frontier: {', '.join(str(r['point']) for r in ok if r.get('frontier_time')) or 'none'}")
    print(f"report: {out / 'sweep.md'}")
    return 0 if len(ok) == len(runnable) else 1
