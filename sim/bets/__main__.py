"""python -m sim.bets [ID ...] [--preset P] [--seed S] [--out DIR] [--list [--json]]"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model.config import ConfigError, get_preset

from . import all_bets, get_bet
from .base import BetError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m sim.bets",
                                description="Re-run the catalogue's bets with their pre-registered criteria, "
                                            "side by side with the catalogue's results.")
    p.add_argument("ids", nargs="*", metavar="ID",
                   help="bets to run, by number (31) or name (31_model_soup); all when none")
    p.add_argument("--preset", default="small", help="model preset: tiny, small or 30m (default small)")
    p.add_argument("--seed", type=int, default=0, help="seed of every model and every random choice (default 0)")
    p.add_argument("--out", type=Path, default=Path("runs/bets"), help="folder for NN_name.json and summary.md")
    p.add_argument("--list", action="store_true", help="list the bets instead of running them")
    p.add_argument("--json", action="store_true", help="with --list: JSON, each bet's number under 'bet'")
    p.add_argument("--no-cache", action="store_true", help="retrain every model instead of loading the cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (default: torch's choice); 1 is fastest on a busy machine")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen bets and write their JSON and the summary; 1 when a bet failed to measure."""
    args = parse_args(argv)
    try:
        bets = [get_bet(i) for i in args.ids] if args.ids else list(all_bets().values())
        if args.json and not args.list:
            raise BetError("--json goes with --list")
        if args.list:
            if args.json:
                print(json.dumps([b.listing() for b in bets], indent=2))
            else:
                for b in bets:
                    print(f"{b.name:34s} {b.catalogue.verdict:12s} {b.question}")
            return 0
        preset = get_preset(args.preset)
        if args.threads < 0:
            raise BetError(f"--threads must be >= 0, got {args.threads}")
    except (BetError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    from model.pipeline import Suite

    from .context import SuiteContext
    from .runner import run_bet, write_record, write_summary

    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = SuiteContext(Suite(preset, seed=args.seed, use_cache=not args.no_cache, progress=not args.quiet))
    records, failed = [], 0
    for bet in bets:
        rec = run_bet(bet, ctx)
        write_record(rec, args.out)
        records.append(rec)
        if rec.get("error"):
            failed += 1
            print(f"{bet.name}: error: {rec['error']}", file=sys.stderr)
        else:
            agree = {True: "agrees", False: "DISAGREES", None: "open"}[rec["agrees"]]
            print(f"{bet.name}: {rec['verdict']} (catalogue {rec['catalogue_verdict']}, {agree}) in {rec['seconds']}s: "
                  f"{rec['key_figures']}", flush=True)
    path = write_summary(records, args.out, reliance=ctx.suite.reliance())
    print(f"summary: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
