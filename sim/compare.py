"""`python -m sim.compare RUN_A RUN_B`: the key figures of two runs side by side, with their ratios.

    python -m sim.compare runs/latest runs/ternary          # two sim.run output folders
    python -m sim.compare runs/sweep/01-expert_codec=fp16 runs/sweep/03-expert_codec=ternary
    python -m sim.compare A/report.json B/report.json --json

Each argument is a run's folder (holding its report.json, as sim.run and each sim.sweep point write it)
or the report.json itself. Prints the scenario keys that differ, then a table of figures (bytes by kind,
virtual shipping time, quality, the partial node's figures of a run with one, requests, wall time) with
B / A: what the change from A to B did. Bytes and virtual seconds are the network model's measurements;
wall seconds are the machine's and vary run to run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .sweep.rows import row_of

# (label, unit, how to read it from a run's row) of the figures compared, in order
FIGURES: list[tuple[str, str, Any]] = [
    ("nodes", "", lambda r: r["nodes"]),
    ("bytes, total", "MB", lambda r: r["bytes_total"] / 1e6),
    ("virtual shipping makespan", "s", lambda r: r["shipping_makespan_s"]),
    ("virtual shipping, median node", "s", lambda r: r["shipping_median_s"]),
    ("own adapter / base ppl, median", "", lambda r: r["own_over_base"]),
    ("mixture / best specialist ppl, posterior", "", lambda r: r["mixture_over_best_by_mode"].get("posterior")),
    ("mixture / best specialist ppl, uniform", "", lambda r: r["mixture_over_best_by_mode"].get("uniform")),
    ("served base ppl (geometric mean)", "", lambda r: r["ppl"]),
    ("uncompressed base ppl (same texts)", "", lambda r: r["ppl_uncompressed"]),
    ("served / uncompressed ppl", "", lambda r: r["codec_over_uncompressed"]),
    # a run with one partial node (live prefetching; a sim.sweep point of scenarios/sweep_prefetch.toml)
    ("partial node: expert weights + activations", "MB", lambda r: _mb(r.get("live_bytes"))),
    ("partial node: hit rate", "", lambda r: r.get("hit_rate")),
    ("partial node: stall, virtual", "s", lambda r: r.get("stall_seconds")),
    ("partial / full node ppl", "", lambda r: r.get("live_ppl_ratio")),
    ("requests", "", lambda r: r["requests_total"]),
    ("requests failed", "", lambda r: r["requests_failed"]),
    ("wall seconds, whole run", "s", lambda r: r["wall_seconds"]),
]


def _mb(x: float | None) -> float | None:
    return None if x is None else x / 1e6


class CompareError(ValueError):
    """A run folder that cannot be read; the message names it."""


def load_report(path: str | Path) -> tuple[Path, dict]:
    """A run's report.json (from its folder or the file itself) and where it was read."""
    p = Path(path)
    f = p / "report.json" if p.is_dir() else p
    if not f.exists():
        raise CompareError(f"{path}: no report.json there (give a sim.run output folder or its report.json)")
    try:
        data = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompareError(f"{f}: not a valid report.json ({exc})") from None
    if not isinstance(data, dict) or "bytes_total" not in data or "quality" not in data:
        raise CompareError(f"{f}: not a sim.run report (no bytes_total or quality)")
    return f, data


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``a.b.c`` keys."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def scenario_changes(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    """Scenario keys whose values differ between two reports: (key, A's value, B's value)."""
    fa, fb = flatten(a.get("scenario", {})), flatten(b.get("scenario", {}))
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if k != "name" and fa.get(k) != fb.get(k)]


def ratio(a: Any, b: Any) -> float | None:
    """b / a where both are numbers and a is not 0, else None."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a:
        return b / a
    return None


def compare(a: dict, b: dict) -> dict:
    """The figures of two reports with B / A, and their scenario differences."""
    ra, rb = (row_of(r, point=0, folder="", values={}) for r in (a, b))

    def entry(label: str, unit: str, x: Any, y: Any) -> dict:
        return {"figure": label, "unit": unit, "a": x, "b": y, "b_over_a": ratio(x, y)}
    figures = [entry(label, unit, fn(ra), fn(rb)) for label, unit, fn in FIGURES]
    kinds = sorted(set(ra["bytes_by_kind"]) | set(rb["bytes_by_kind"]),
                   key=lambda k: -(ra["bytes_by_kind"].get(k, 0) + rb["bytes_by_kind"].get(k, 0)))
    by_kind = [entry(f"bytes, {k}", "MB", ra["bytes_by_kind"].get(k, 0) / 1e6, rb["bytes_by_kind"].get(k, 0) / 1e6)
               for k in kinds]
    figures[2:2] = by_kind  # after the total
    return {"changes": [{"key": k, "a": x, "b": y} for k, x, y in scenario_changes(a, b)], "figures": figures}


def _cell(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.4f}" if abs(x) >= 1 else f"{x:.4g}"
    return str(x)


def to_markdown(result: dict, name_a: str, name_b: str) -> str:
    """The comparison as text: the scenario differences, then the figures' table."""
    lines = [f"A: {name_a}", f"B: {name_b}", ""]
    if result["changes"]:
        lines += ["Scenario keys that differ (A -> B):"]
        lines += [f"  {c['key']}: {c['a']} -> {c['b']}" for c in result["changes"]]
    else:
        lines += ["The two runs have the same scenario."]
    lines += ["", "| figure | unit | A | B | B / A |", "| --- | --- | ---: | ---: | ---: |"]
    for f in result["figures"]:
        r = "—" if f["b_over_a"] is None else f"{f['b_over_a']:.4f}"
        lines.append(f"| {f['figure']} | {f['unit']} | {_cell(f['a'])} | {_cell(f['b'])} | {r} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m sim.compare`."""
    ap = argparse.ArgumentParser(prog="python -m sim.compare", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("run_a", metavar="RUN_A", help="the first run: its folder or its report.json")
    ap.add_argument("run_b", metavar="RUN_B", help="the second run (ratios are B / A)")
    ap.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = ap.parse_args(argv)
    try:
        (fa, a), (fb, b) = load_report(args.run_a), load_report(args.run_b)
        result = compare(a, b)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"error: a report lacks {exc}; was it written by an older sim.run?", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"a": str(fa), "b": str(fb), **result}, indent=1))
    else:
        print(to_markdown(result, f"{fa.parent} ({a['scenario'].get('name', '')})",
                          f"{fb.parent} ({b['scenario'].get('name', '')})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
