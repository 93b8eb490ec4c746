"""A sweep's combined report: sweep.json, sweep.md and the plots (the frontiers, each quality figure
against each varied key), all from the rows of :mod:`sim.sweep.rows`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..sections import save_figure
from .rows import FLAGS, LIVE_FIGURES, frontier_of

MB = 1e6
LOG_SPAN = 20  # a cost axis spanning more than this factor is drawn on a log scale
KEY_ROWS = 40  # points listed beside the frontier plot (all of them in sweep.md)


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
    """sweep.md: what ran, one row per point with the frontier marked (a second table of the partial nodes'
    figures when the points have them), the refused points, the timing."""
    rows, keys = s["rows"], s["keys"]
    ok = [r for r in rows if r["status"] == "ok"]
    axes = frontier_of(rows)
    live = axes.kind == "live"
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
             "specialist. " + ("Frontier: see the partial nodes' table below." if live else
                               "Frontier: no other point costs less (bytes, CONTROL aside: heartbeats grow with wall "
                               "time; virtual shipping time) at no higher ppl (**B**: bytes, **T**: time)."), ""]
    head = ["#", *keys, "bytes MB", *(f"{k} MB" for k in kinds), "ship makespan s", "ship median s", "own/base",
            "mix/best", "ppl", "codec/fp32", "failed", "wall s", *([] if live else ["frontier"])]
    lines += _table_head(head, len(keys), text_last=not live)
    for r in ok:
        cells = [str(r["point"]), *(f"`{r['values'].get(k)}`" for k in keys), f"{r['bytes_total'] / MB:.2f}",
                 *(f"{r['bytes_by_kind'].get(k, 0) / MB:.3f}" for k in kinds),
                 f"{r['shipping_makespan_s']:.2f}", f"{r['shipping_median_s']:.2f}", _num(r["own_over_base"], ".3f"),
                 _num(r["mixture_over_best"], ".3f"), _num(r["ppl"], ".3f"), _num(r["codec_over_uncompressed"], ".4f"),
                 f"{r['requests_failed']}/{r['requests_total']}", f"{r['wall_seconds']:.1f}",
                 *([] if live else [_marks(r)])]
        lines.append("| " + " | ".join(cells) + " |")
    if live:
        lines += ["", *live_table(ok, keys)]
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


def _table_head(head: list[str], keys: int, *, text_last: bool) -> list[str]:
    align = ["---"] * (1 + keys) + ["---:"] * (len(head) - 1 - keys - text_last) + ["---"] * text_last
    return ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]


def _marks(r: dict) -> str:
    return " ".join(m for m, f in (("**B**", FLAGS[0]), ("**T**", FLAGS[1])) if r.get(f))


def live_table(ok: list[dict], keys: list[str]) -> list[str]:
    """The partial nodes' table of a live prefetch sweep: one row per point, its frontier marks."""
    lines = ["## The partial node of each point (live prefetching)", "",
             "Each point's partial node (its report's `prefetch_live` row): expert weights planned ahead and fetched "
             "on demand, activations of remote calls (sent and received), KB per scored token (weights and "
             "activations), hit rate (expert uses the node held), virtual stall seconds (on-demand fetches and "
             "remote calls on the node's link, plus plans that did not ship within the gap between requests), and "
             "its perplexity against the fully materialised node on the same requests. Frontier: no other point "
             "ships fewer bytes (weights and activations; **B**) or stalls less (**T**) at no higher ppl / full.", ""]
    head = ["#", *keys, "expert KB planned", "expert KB on demand", "activation KB", "KB/token", "hit rate",
            "stall s", "ppl", "ppl / full", "frontier"]
    lines += _table_head(head, len(keys), text_last=True)
    for r in ok:
        if "live_bytes" not in r:
            continue
        b = r["live_bytes_by_kind"]
        cells = [str(r["point"]), *(f"`{r['values'].get(k)}`" for k in keys), f"{b['expert_planned'] / 1e3:,.1f}",
                 f"{b['expert_on_demand'] / 1e3:,.1f}", f"{b['activations'] / 1e3:,.1f}",
                 f"{r['live_bytes_per_token'] / 1e3:.2f}", f"{r['hit_rate']:.3f}", f"{r['stall_seconds']:.1f}",
                 f"{r['live_ppl']:.3f}", f"{r['live_ppl_ratio']:.4f}", _marks(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


MERGE_PT = 3.0  # points (1/72 inch): markers closer than this look like one point
LABEL_OFFSETS = ((5, 3), (5, -11), (-5, 3), (-5, -11), (0, 8), (0, -18), (11, -4), (-11, -4), (14, 12), (-14, 12),
                 (14, -22), (-14, -22), (0, 20), (0, -30))  # points, tried in turn: the first free one is taken


def place_labels(ax, items: list[tuple[float, float, str]], fontsize: float = 8) -> None:
    """Annotate each (x, y, text) beside its point where it overlaps no marker, no label placed before it
    and stays inside the axes: the first of :data:`LABEL_OFFSETS` that does, else the least overlapping.
    Points closer than :data:`MERGE_PT` (their markers overlap) share one label, their texts joined by commas."""
    fig = ax.figure
    fig.canvas.draw()  # the final limits, so that data -> pixel transforms hold
    px_per_pt = fig.dpi / 72
    frame = ax.get_window_extent()
    r = 4 * px_per_pt
    merged: list[list] = []  # [x, y, text, pixel]: points whose markers touch share one label
    for x, y, text in items:
        xy = ax.transData.transform((x, y))
        near = next((m for m in merged if abs(m[3][0] - xy[0]) < MERGE_PT * px_per_pt
                     and abs(m[3][1] - xy[1]) < MERGE_PT * px_per_pt), None)
        if near is None:
            merged.append([x, y, text, xy])
        else:
            near[2] += "," + text
    items = [(x, y, text) for x, y, text, _ in merged]
    pix = [m[3] for m in merged]
    taken = [(px - r, py - r, px + r, py + r) for px, py in pix]

    def overlap(a: tuple, b: tuple) -> float:
        w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    for (x, y, text), (px, py) in zip(items, pix):
        w, h = 0.62 * fontsize * px_per_pt * len(text), fontsize * px_per_pt * 1.2
        best: tuple | None = None
        for dx, dy in LABEL_OFFSETS:
            x0 = px + dx * px_per_pt - (w if dx < 0 else w / 2 if dx == 0 else 0)
            box = (x0, py + dy * px_per_pt, x0 + w, py + dy * px_per_pt + h)
            within = frame.x0 <= box[0] and box[2] <= frame.x1 and frame.y0 <= box[1] and box[3] <= frame.y1
            outside = 0.0 if within else w * h - overlap(box, (frame.x0, frame.y0, frame.x1, frame.y1))
            cost = sum(overlap(box, t) for t in taken) + 10 * outside
            if best is None or cost < best[0]:
                best = (cost, dx, dy, box)
            if cost == 0:
                break
        assert best is not None
        _, dx, dy, box = best
        taken.append(box)
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                    ha="right" if dx < 0 else "center" if dx == 0 else "left", va="bottom",
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "grey"} if abs(dx) + abs(dy) > 16 else None)


def write_plots(out: Path, rows: list[dict], keys: list[str]) -> list[str]:
    """sweep_frontier.png (each cost against quality, the frontier joined; points numbered as in sweep.md,
    the numbers keyed beside the panels) and one sweep_by_<key>.png per varied key (each figure against the
    key's values, one line per setting of the other keys). The axes are :func:`sim.sweep.rows.frontier_of`'s."""
    axes_of = frontier_of(rows)
    qkey, qlabel = axes_of.quality
    ok = [r for r in rows if r["status"] == "ok" and r.get(qkey) is not None]
    if not ok:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    n = len(axes_of.costs)
    labels = []
    fig, axes = plt.subplots(1, n + 1, figsize=(6 * n + 3.4, 5.2), gridspec_kw={"width_ratios": [1] * n + [0.55]})
    for ax, (cost, xlabel), flag in zip(axes, axes_of.costs, FLAGS):
        scale = MB if "(MB)" in xlabel else 1.0
        pts = [r for r in ok if r.get(cost) is not None]
        on = sorted((r for r in pts if r.get(flag)), key=lambda r: (r[cost], r[qkey]))
        off = [r for r in pts if not r.get(flag)]
        ax.scatter([r[cost] / scale for r in off], [r[qkey] for r in off], c="grey", s=18, label="dominated")
        ax.plot([r[cost] / scale for r in on], [r[qkey] for r in on], "o-", c="C3", ms=5, drawstyle="steps-post",
                label="Pareto frontier")
        ax.ticklabel_format(axis="y", useOffset=False)
        xs = [r[cost] for r in pts]
        if min(xs) > 0 and max(xs) > LOG_SPAN * min(xs):  # costs over decades: equal ratios, equal distances
            ax.set_xscale("log")
            xlabel += ", log scale"
        ax.set_xlabel(xlabel)
        ax.set_ylabel(qlabel)
        ax.set_title(f"{xlabel.split(' (')[0]}\nagainst {qlabel.split(' (')[0].split(',')[0]}", fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
        ax.margins(0.12)
        # points at (or near) the same place share one label: place_labels merges them, in this order
        labels.append((ax, [(r[cost] / scale, r[qkey], str(r["point"]))
                            for r in sorted(pts, key=lambda r: (r[cost], r[qkey]))]))
    key_ax = axes[-1]
    key_ax.axis("off")
    shown = ok[:KEY_ROWS]
    text = [" / ".join(keys) or "point"] + [
        f"{r['point']:>3}  {short(r['values'], keys) or 'the scenario'}  {_marks(r).replace('*', '')}" for r in shown]
    if len(ok) > len(shown):
        text.append(f"... {len(ok) - len(shown)} more in sweep.md")
    key_ax.text(0, 1, "\n".join(text), va="top", ha="left", family="monospace", fontsize=8,
                transform=key_ax.transAxes)
    key_ax.set_title("points (B, T: on the frontier)", fontsize=9, loc="left")
    fig.tight_layout()
    for ax, items in labels:  # once the layout is final: placed in pixels
        place_labels(ax, items)
    files.append(save_figure(fig, out, "sweep_frontier.png"))
    for key in keys:
        files.append(_by_key(plt, out, ok, key, [k for k in keys if k != key], axes_of.figures))
    return files


def _order(values: list[Any]) -> list[Any]:
    """Distinct values, sorted when they are all numbers, else in the order they came."""
    distinct = list({repr(v): v for v in values}.values())
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
        return sorted(distinct)
    return distinct


def _by_key(plt, out: Path, rows: list[dict], key: str, others: list[str],
            figures: tuple[tuple[str, str, float | None], ...]) -> str:
    """One PNG: a panel per figure against ``key``'s values, a line per setting of ``others``."""
    xs = _order([r["values"].get(key) for r in rows])
    pos = {repr(v): i for i, v in enumerate(xs)}
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(short(r["values"], others) or "all points", []).append(r)
    fig, axes = plt.subplots(1, len(figures), figsize=(5.5 * len(figures), 4.5))
    for ax, (fig_key, label, ref) in zip(axes, figures):
        for name, rs in series.items():
            pts = sorted((pos[repr(r["values"].get(key))], r[fig_key]) for r in rs if r.get(fig_key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        ax.set_xticks(range(len(xs)), [str(v) for v in xs], rotation=20, fontsize=8)
        ax.set_xlabel(key)
        ax.set_ylabel(label)
        if ref is not None:
            ax.axhline(ref, c="grey", lw=0.8, ls=":")
        ax.ticklabel_format(axis="y", useOffset=False)
        if len(series) > 1:
            ax.legend(fontsize=7, title=" / ".join(others), title_fontsize=7)
    fig.suptitle(f"{'Live prefetch figures' if figures is LIVE_FIGURES else 'Quality'} against {key}")
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
    return save_figure(fig, out, f"sweep_by_{safe}.png")
