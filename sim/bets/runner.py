"""Running bets and writing what they found: one JSON per bet and a summary table."""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import Bet
from .context import BetContext

SIGNIFICANT = 8  # digits kept of every measured float: the JSON is judged exactly as written


def to_json(x: Any) -> Any:
    """``x`` with tensors, numpy values and tuples made JSON-able, floats rounded to 8 significant
    digits, and non-finite floats written as the strings "inf", "-inf", "nan"."""
    if isinstance(x, dict):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    if isinstance(x, torch.Tensor):
        return to_json(x.tolist())
    if isinstance(x, np.ndarray):
        return to_json(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        v = float(x)
        if not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return float(f"{v:.{SIGNIFICANT}g}")
    return x


def record(bet: Bet, measurements: dict, *, preset: str, seed: int, seconds: float | None = None) -> dict:
    """The JSON record of a bet: measurements rounded as written, then judged."""
    m = to_json(measurements)
    verdict = bet.verdict(m)
    return {
        "bet": bet.number, "name": bet.name, "title": bet.title, "in_catalogue": bet.in_catalogue,
        "question": bet.question, "setup": bet.setup, "criteria": bet.criteria.as_dict(),
        "measurements": m, "verdict": verdict,
        "catalogue_verdict": bet.catalogue.verdict, "catalogue_result": bet.catalogue.quote,
        "catalogue_figures": to_json(dict(bet.catalogue.figures)), "agrees": bet.catalogue.agrees(verdict),
        "key_figures": bet.key_figures(m), "notes": list(bet.notes),
        "preset": preset, "seed": seed, "seconds": None if seconds is None else round(seconds, 2),
    }


def error_record(bet: Bet, exc: BaseException, *, preset: str, seed: int) -> dict:
    """The record of a bet whose measurement failed: no verdict, the error said plainly."""
    return {
        "bet": bet.number, "name": bet.name, "title": bet.title, "in_catalogue": bet.in_catalogue,
        "question": bet.question, "setup": bet.setup, "criteria": bet.criteria.as_dict(),
        "measurements": None, "verdict": None, "catalogue_verdict": bet.catalogue.verdict,
        "catalogue_result": bet.catalogue.quote, "catalogue_figures": to_json(dict(bet.catalogue.figures)),
        "agrees": None, "key_figures": None, "notes": list(bet.notes), "preset": preset, "seed": seed,
        "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8),
    }


def run_bet(bet: Bet, ctx: BetContext) -> dict:
    """Measure ``bet`` in ``ctx`` and judge it; a failed measurement gives an error record."""
    t0 = time.perf_counter()
    try:
        measurements = bet.measure(ctx)
        return record(bet, measurements, preset=ctx.preset, seed=ctx.seed, seconds=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - one bet's failure is reported, the others still run
        return error_record(bet, exc, preset=ctx.preset, seed=ctx.seed)


def write_record(rec: dict, out: Path) -> Path:
    """DIR/NN_name.json."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{rec['name']}.json"
    path.write_text(json.dumps(rec, indent=2, allow_nan=False) + "\n")
    return path


def _agree_cell(rec: dict) -> str:
    if rec.get("error"):
        return "error"
    return {True: "yes", False: "**no**", None: "n/a (open)"}[rec["agrees"]]


def _cell(text: object) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_markdown(records: Iterable[dict]) -> str:
    """A table of every bet run: catalogue verdict, simulator verdict, agreement, key figures; then notes."""
    recs = sorted(records, key=lambda r: r["bet"])
    if not recs:
        return "# Bets\n\nNo bet was run.\n"
    presets = sorted({f"{r['preset']} (seed {r['seed']})" for r in recs})
    lines = ["# Bets: the catalogue re-run\n", f"Preset: {', '.join(presets)}. Every verdict is computed from "
             "the measurements by the bet's pre-registered criteria (see each JSON).\n",
             "| bet | question | catalogue | simulator | agrees | key figures |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in recs:
        label = r["name"] if r["in_catalogue"] else f"{r['name']} (ours)"
        figures = r["error"] if r.get("error") else r["key_figures"]
        cells = [label, r["question"], f"{r['catalogue_verdict']}: {r['catalogue_result']}", r["verdict"] or "-",
                 _agree_cell(r), figures]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    notes = [(r["name"], n) for r in recs for n in r["notes"]]
    if notes:
        lines += ["", "## Where the catalogue and the simulator differ in setup or reasoning", ""]
        lines += [f"- **{name}**: {n}" for name, n in notes]
    return "\n".join(lines) + "\n"


def regime_markdown(reliance: dict) -> str:
    """The regime the bets ran in: the base's expert reliance on each pretraining text, as a table."""
    lines = ["## The regime these bets ran in: expert reliance of the base", "",
             "ppl ratio on each held-out text when every expert is zeroed, when each block's experts are "
             "averaged (Bet 38's operation), and when one expert at a time is removed (median / max over the 64).",
             "", "| text | base ppl | zeroed | averaged | drop one (median / max) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in reliance["texts"].items():
        lines.append(f"| {name} | {r['ppl']:.2f} | x{r['zeroed_ratio']:.2f} | x{r['averaged_ratio']:.2f} | "
                     f"x{r['drop_one']['median_ratio']:.3f} / x{r['drop_one']['max_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def write_summary(records: Iterable[dict], out: Path, *, reliance: dict | None = None) -> Path:
    """DIR/summary.md, and with ``reliance`` (the suite's `Suite.reliance()`) DIR/regime.json and a
    regime section in the summary."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.md"
    text = summary_markdown(records)
    if reliance is not None:
        (out / "regime.json").write_text(json.dumps(reliance, indent=2) + "\n")
        text += "\n" + regime_markdown(reliance)
    path.write_text(text)
    return path
