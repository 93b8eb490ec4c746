"""`python -m sim.bets.regimes DIR [DIR ...]`: the bets' verdicts side by side across regimes.

Each DIR is the output folder of one `python -m sim.bets --preset P --out DIR` run (its NN_name.json
records and regime.json). The table gives, per bet, the catalogue's verdict and each run's verdict
and key figures, with the run's expert reliance (the regime) on top: the simulator's own answer to
which catalogue results depend on the regime. Nothing here is tuned or judged again: verdicts are read
from the records exactly as each run wrote them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


class RegimeError(ValueError):
    """A folder is not the output of a `sim.bets` run."""


def load_run(folder: Path) -> dict:
    """One run's records (by bet number) and regime; RegimeError names what is missing."""
    if not folder.is_dir():
        raise RegimeError(f"{folder} is not a folder")
    records = {}
    for path in sorted(folder.glob("*.json")):
        if path.name == "regime.json":
            continue
        rec = json.loads(path.read_text())
        if "bet" in rec and "verdict" in rec:
            records[rec["bet"]] = rec
    if not records:
        raise RegimeError(f"{folder} holds no bet records (run python -m sim.bets --out {folder} first)")
    regime_path = folder / "regime.json"
    regime = json.loads(regime_path.read_text()) if regime_path.exists() else None
    presets = {r["preset"] for r in records.values()}
    return {"folder": str(folder), "preset": "/".join(sorted(presets)), "records": records, "regime": regime}


def _reliance_cell(regime: dict | None, key: str) -> str:
    if not regime:
        return "not recorded"
    values = [t[key] for t in regime["texts"].values()]
    return f"x{min(values):.2f}-{max(values):.2f} (median x{statistics.median(values):.2f})"


def regimes_markdown(runs: list[dict]) -> str:
    """The verdicts-by-regime table."""
    head = "| bet | catalogue | " + " | ".join(f"{r['preset']}: verdict, key figures" for r in runs) + " |"
    lines = ["# The catalogue's bets by regime", "",
             "| regime | " + " | ".join(r["preset"] for r in runs) + " |",
             "| --- | " + " | ".join("---" for _ in runs) + " |",
             "| all experts zeroed (ppl ratio over the pretraining texts) | "
             + " | ".join(_reliance_cell(r["regime"], "zeroed_ratio") for r in runs) + " |",
             "| each block's experts averaged | "
             + " | ".join(_reliance_cell(r["regime"], "averaged_ratio") for r in runs) + " |",
             "", head, "| --- | --- | " + " | ".join("---" for _ in runs) + " |"]
    bets = sorted({b for r in runs for b in r["records"]})
    for b in bets:
        any_rec = next(r["records"][b] for r in runs if b in r["records"])
        cells = []
        for r in runs:
            rec = r["records"].get(b)
            if rec is None:
                cells.append("not run")
            elif rec.get("error"):
                cells.append(f"error: {rec['error']}")
            else:
                agree = {True: "", False: " (**disagrees**)", None: ""}[rec["agrees"]]
                cells.append(f"**{rec['verdict']}**{agree}: {rec['key_figures']}")
        label = any_rec["name"] + ("" if any_rec["in_catalogue"] else " (ours)")
        row = [label, any_rec["catalogue_verdict"], *cells]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point: print (or write with --out) the table for the given run folders."""
    ap = argparse.ArgumentParser(prog="python -m sim.bets.regimes", description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, metavar="DIR", help="output folders of sim.bets runs")
    ap.add_argument("--out", type=Path, help="write the table to this markdown file instead of printing it")
    args = ap.parse_args(argv)
    try:
        runs = [load_run(f) for f in args.folders]
    except (RegimeError, json.JSONDecodeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = regimes_markdown(runs)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
