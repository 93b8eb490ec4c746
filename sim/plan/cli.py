"""`python -m sim.plan`: plan a federation of thousands of schools in virtual time, from a calibration run.

    python -m sim.plan --scenario scenarios/target_215k.toml --out runs/plan-215k
    python -m sim.plan --scenario F.toml --calibration runs/calib-small      # another calibration run
    python -m sim.plan --scenario F.toml --set rollout.relay_fanout=4 --set network.egress_mbps=100   # what-ifs
    python -m sim.plan calibrate --preset small --out runs/calib-small       # make a calibration run (sim.run)
    python -m sim.plan validate runs/calib-small                             # predict a real run, compare

A plan writes DIR/report.json, report.md, events.jsonl (each school's rollout) and PNG plots. The scenario
and its calibration are checked before anything is simulated; bad input is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from model.config import ConfigError

from ..network import NetworkError
from ..scenario import ScenarioError
from . import calibration, config, planner, report, validate


def _parser() -> argparse.ArgumentParser:
    doc = (__doc__ or "").splitlines()
    ap = argparse.ArgumentParser(prog="python -m sim.plan", description=doc[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(doc[2:]))
    ap.add_argument("--scenario", metavar="F.toml", help="plan scenario (see scenarios/target_215k.toml)")
    ap.add_argument("--calibration", metavar="RUN_DIR",
                    help="a sim.run output folder to calibrate from (overrides the scenario's `calibration`)")
    ap.add_argument("--out", default="runs/plan", help="output folder (default runs/plan)")
    ap.add_argument("--seed", type=int, help="seed of every draw (overrides the scenario's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a scenario key, value in TOML (repeatable): --set rollout.relay_fanout=4")
    ap.add_argument("--quiet", action="store_true", help="the summary only")
    sub = ap.add_subparsers(dest="command", metavar="{calibrate,validate}")
    cal = sub.add_parser("calibrate", help="run the real federation (sim.run) to calibrate from",
                         description="Run sim.run with scenarios/calibration.toml (requests one at a time, so "
                                     "latencies are service times) into --out; plans then take --calibration OUT.")
    cal.add_argument("--preset", default="small", choices=["tiny", "small", "30m"], help="model preset (default small)")
    cal.add_argument("--nodes", type=int, default=32, help="federation nodes (default 32)")
    cal.add_argument("--codec", default="int8", help="expert codec on the wire (default int8)")
    cal.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    cal.add_argument("--out", default="runs/calibration", help="output folder (default runs/calibration)")
    val = sub.add_parser("validate", help="predict a real run's bytes and shipping times and compare",
                         description="Predict the run's bytes by kind (must match exactly) and each node's "
                                     "virtual shipping time (within --tolerance) from its configuration.")
    val.add_argument("run_dir", metavar="RUN_DIR", help="a sim.run output folder")
    val.add_argument("--tolerance", type=float, default=0.05, help="relative tolerance of shipping times (0.05)")
    val.add_argument("--json", action="store_true", help="print the comparison as JSON")
    return ap


def run_plan(args: argparse.Namespace) -> int:
    """Load, check, simulate, write; prints the answers."""
    if not args.scenario:
        raise config.PlanError("--scenario: a plan scenario file is required (or a command: calibrate, validate)")
    scn = config.load(args.scenario, args.set)
    if args.seed is not None:
        scn = dataclasses.replace(scn, seed=args.seed).validate()
    source = args.calibration or scn.calibration
    if not source:
        raise config.PlanError("calibration: the scenario names no calibration run; give --calibration RUN_DIR "
                               "(make one with `python -m sim.plan calibrate`)")
    cal = calibration.from_run(source)
    say = None if args.quiet else (lambda msg: print(msg, flush=True))
    res = planner.plan(scn, cal, progress=say)
    out = Path(args.out)
    report.write(res, out)
    r = res.report
    q = r["requests"]
    for mode, m in r["modes"].items():
        b = m["school_bytes_per_day"]
        print(f"{mode}: rollout makespan {m['rollout']['makespan_s']:,.0f} s, coordinator egress "
              f"{m['rollout']['egress_bytes'] / 1e9:,.2f} GB per rollout (peak utilisation "
              f"{100 * m['egress_utilisation']['peak']:.1f}%); per school per day median "
              f"{b['p50'] / 1e6:,.2f} MB, total {m['bytes_total'] / 1e9:,.1f} GB at the coordinator")
    lp = q["latency_peak_s"]
    print(f"{q['total']:,} requests; at peak p50 {lp.get('p50', float('nan')):.3f} s, p99 "
          f"{lp.get('p99', float('nan')):.3f} s; served where the adapter is: "
          f"{100 * (q['share_at_adapter'] or 0):.2f}%; {r['events']:,} events in {r['wall_seconds']['total']:.1f} s")
    print(f"report: {out / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m sim.plan`."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "calibrate":
            cal = calibration.calibrate(args.out, preset=args.preset, nodes=args.nodes, seed=args.seed,
                                        codec=args.codec, progress=True)
            print(f"calibration run in {args.out}: " + json.dumps(cal.as_dict()["bundle_bytes"]))
            return 0
        if args.command == "validate":
            result = validate.predict(args.run_dir)
            if args.json:
                print(json.dumps(result, indent=1))
            else:
                print(f"bytes exact: {result['bytes_exact']} ({result['bytes_predicted']}); shipping max relative "
                      f"error {100 * result['shipping_max_rel_error']:.4f}% (makespan predicted "
                      f"{result['makespan_predicted_s']:.4f} s, measured {result['makespan_measured_s']:.4f} s)")
            validate.check(result, args.tolerance)
            return 0
        return run_plan(args)
    except (config.PlanError, ScenarioError, ConfigError, NetworkError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
