"""A sweep's combined report: sweep.json, sweep.md and the plots (the frontiers, each quality figure
against each varied key), all from the rows of :mod:`sim.sweep.rows`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..sections import save_figure
from .rows import COSTS, FRONTIER_KEYS, QUALITY, QUALITY_FIGURES

MB = 1e6


def _num(x: Any, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def short(values: dict[str, Any], keys: list[str]) -> str:
    """The point's values of ``keys``, joined: its label on plots."""
    return " / ".join(str(values.get(k)) for k in keys)


def write(out: Path, summary: dict, *, plots: bool = True) -> list[str]:
    """Write sweep.json, sweep.md and (unless ``plots`` is False) the plots into ``out``; returns the
    plots' file names."""
    out.mkdir(parents=True, exist_ok=True)
    if plots or "plots" not in summary:
        summary["plots"] = write_plots(out, summary["rows"], summary["keys"])
    (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "sweep.md").write_text(to_markdown(summary))
    return summary["plots"]


def kinds_of(rows: list[dict]) -> list[str]:
    """Byte kinds measured in any row, largest total first."""
    totals: dict[str, int] = {}
    for r in rows:
        for k, v in r.get("bytes_by_kind", {}).items():
            totals[k] = totals.get(k, 0) + v
    return sorted(totals, key=lambda k: -totals[k])


def to_markdown(s: dict) -> str:
    """sweep.md: what ran, one row per point with the frontier marked, the refused points, the timing."""
    rows, keys = s["rows"], s["keys"]
    ok = [r for r in rows if r["status"] == "ok"]
    kinds = kinds_of(ok)
    t = s["timing"]
    lines = [f"# Sweep: {s['name']}", "", f"`{s['command']}`", "",
             f"{len(rows)} points: {len(ok)} ran, {sum(r['status'] == 'refused' for r in rows)} refused, "
             f"{sum(r['status'] == 'failed' for r in rows)} failed. Each point is a whole federation run with its "
             "own report in its folder. Bytes are counted at the coordinator's gRPC boundary; virtual seconds come "
             "from the network model; wall seconds are this machine's.", "",
             "ppl: the served base's perplexity (geometric mean over the workload's held-out texts, the codecs "
             "included); codec/fp32: the same over the uncompressed base's on the same texts; own/base: median "
             "over users; mix/best: median over texts of the posterior mixture (uniform if none) over the best "
             "specialist. Frontier: no other point costs less (bytes, CONTROL aside: heartbeats grow with wall time; "
             "virtual shipping time) at no higher ppl (**B**: bytes, **T**: time).", ""]
    head = ["#", *keys, "bytes MB", *(f"{k} MB" for k in kinds), "ship makespan s", "ship median s", "own/base",
            "mix/best", "ppl", "codec/fp32", "failed", "wall s", "frontier"]
    align = ["---"] * (1 + len(keys)) + ["---:"] * (len(head) - 2 - len(keys)) + ["---"]
    lines += ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    for r in ok:
        front = " ".join(m for m, f in (("**B**", "frontier_bytes"), ("**T**", "frontier_time")) if r.get(f))
        cells = [str(r["point"]), *(f"`{r['values'].get(k)}`" for k in keys), f"{r['bytes_total'] / MB:.2f}",
                 *(f"{r['bytes_by_kind'].get(k, 0) / MB:.3f}" for k in kinds),
                 f"{r['shipping_makespan_s']:.2f}", f"{r['shipping_median_s']:.2f}", _num(r["own_over_base"], ".3f"),
                 _num(r["mixture_over_best"], ".3f"), _num(r["ppl"], ".3f"), _num(r["codec_over_uncompressed"], ".4f"),
                 f"{r['requests_failed']}/{r['requests_total']}", f"{r['wall_seconds']:.1f}", front]
        lines.append("| " + " | ".join(cells) + " |")
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        lines += ["", "Points that did not run:", ""]
        lines += [f"- point {r['point']} ({r['status']}): {r['error']}" for r in bad]
    lines += ["", f"Wall: {t['wall_seconds']:.1f} s in all; models trained or loaded once per model set: "
                  f"{t['models_seconds']:.1f} s; the points' own runs (each a sim.run, report and plots included) "
                  f"{t['points_seconds']:.1f} s; the sweep's "
                  f"overhead beyond them {t['overhead_seconds']:.1f} s "
                  f"({_num(t['overhead_per_point_s'], '.2f')} s per point). Shared between points: "
                  f"{', '.join(s['shared']) or 'nothing'}.", "",
              "Plots: " + ", ".join(f"[{p}]({p})" for p in s.get("plots", [])), ""]
    return "\n".join(lines)


def write_plots(out: Path, rows: list[dict], keys: list[str]) -> list[str]:
    """sweep_frontier.png (each cost against ppl, the frontier joined) and one sweep_by_<key>.png per
    varied key (each quality figure against the key's values, one line per setting of the other keys)."""
    ok = [r for r in rows if r["status"] == "ok" and r.get(QUALITY[0]) is not None]
    if not ok:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, len(COSTS), figsize=(6.5 * len(COSTS), 5))
    for ax, (cost, xlabel) in zip(axes, COSTS):
        scale = MB if cost.startswith("bytes") else 1.0
        on = sorted((r for r in ok if r.get(FRONTIER_KEYS[cost])), key=lambda r: (r[cost], r[QUALITY[0]]))
        off = [r for r in ok if not r.get(FRONTIER_KEYS[cost])]
        ax.scatter([r[cost] / scale for r in off], [r[QUALITY[0]] for r in off], c="grey", label="dominated")
        ax.plot([r[cost] / scale for r in on], [r[QUALITY[0]] for r in on], "o-", c="C3", drawstyle="steps-post",
                label="Pareto frontier")
        at: dict[tuple[float, float], list[str]] = {}  # points at the same place share one label
        for r in ok:
            at.setdefault((r[cost] / scale, r[QUALITY[0]]), []).append(short(r["values"], keys))
        for xy, labels in at.items():
            ax.annotate("; ".join(labels), xy, fontsize=7, alpha=0.8, xytext=(3, 3), textcoords="offset points")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(QUALITY[1])
        ax.set_title(f"{xlabel.split(' (')[0].split(',')[0].replace(' across the coordinator boundary', '')} "
                     "against perplexity")
        ax.legend(fontsize=8)
    files.append(save_figure(fig, out, "sweep_frontier.png"))
    for key in keys:
        files.append(_by_key(plt, out, ok, key, [k for k in keys if k != key]))
    return files


def _order(values: list[Any]) -> list[Any]:
    """Distinct values, sorted when they are all numbers, else in the order they came."""
    distinct = list({repr(v): v for v in values}.values())
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
        return sorted(distinct)
    return distinct


def _by_key(plt, out: Path, rows: list[dict], key: str, others: list[str]) -> str:
    """One PNG: a panel per quality figure against ``key``'s values, a line per setting of ``others``."""
    xs = _order([r["values"].get(key) for r in rows])
    pos = {repr(v): i for i, v in enumerate(xs)}
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(short(r["values"], others) or "all points", []).append(r)
    fig, axes = plt.subplots(1, len(QUALITY_FIGURES), figsize=(5.5 * len(QUALITY_FIGURES), 4.5))
    for ax, (fig_key, label) in zip(axes, QUALITY_FIGURES):
        for name, rs in series.items():
            pts = sorted((pos[repr(r["values"].get(key))], r[fig_key]) for r in rs if r.get(fig_key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        ax.set_xticks(range(len(xs)), [str(v) for v in xs], rotation=20, fontsize=8)
        ax.set_xlabel(key)
        ax.set_ylabel(f"{label} (ratio)")
        ax.axhline(1.0, c="grey", lw=0.8, ls=":")
        ax.ticklabel_format(axis="y", useOffset=False)
        if len(series) > 1:
            ax.legend(fontsize=7, title=" / ".join(others), title_fontsize=7)
    fig.suptitle(f"Quality against {key}")
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
    return save_figure(fig, out, f"sweep_by_{safe}.png")
