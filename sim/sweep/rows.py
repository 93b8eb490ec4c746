"""A sweep's rows: one per point, read from the point's own report, and the Pareto frontiers over them.

Every figure of a row is read from the point's report.json (:func:`row_of`), so a row can always be
checked against the report it came from. The frontiers are of cost (bytes across the coordinator
boundary; virtual shipping makespan) against quality (the served base's perplexity, geometric mean over
the workload's texts: the codecs' cost included): a point is on a frontier when no other point is at most
as costly and at most as perplexed, and strictly better in one of the two. The bytes of a frontier leave
out CONTROL (registration and heartbeats): they grow with the run's wall time, not with the
configuration, and would split points that ship exactly the same bytes.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from ..codec_quality import SECTION_KEY as CODEC_QUALITY

# (row key, label with its unit) of the cost axes of the frontiers, and the quality axis
COSTS = (("bytes_shipped", "bytes across the coordinator boundary, CONTROL aside (MB)"),
         ("shipping_makespan_s", "virtual shipping makespan (s)"))
QUALITY = ("ppl", "served base perplexity (geometric mean over texts)")
# (row key, label) of the quality figures plotted against each varied key: ratios, lower is better
QUALITY_FIGURES = (("own_over_base", "own adapter / base ppl (median over users)"),
                   ("mixture_over_best", "mixture / best specialist ppl (median)"),
                   ("codec_over_uncompressed", "served / uncompressed base ppl"))
FRONTIER_KEYS = {"bytes_shipped": "frontier_bytes", "shipping_makespan_s": "frontier_time"}
CONTROL = "CONTROL"


def mixture_over_best(mixtures: list[dict]) -> dict[str, float]:
    """Median mixture / best-specialist perplexity ratio per mixture mode."""
    modes = dict.fromkeys(m["mode"] for m in mixtures)
    return {mode: statistics.median(m["mixture_over_best"] for m in mixtures if m["mode"] == mode) for mode in modes}


def headline_mixture(by_mode: dict[str, float]) -> float | None:
    """The one mixture figure of a row: posterior if measured (the federation's default), else uniform."""
    return by_mode.get("posterior", by_mode.get("uniform"))


def row_of(report: dict, *, point: int, folder: str, values: dict[str, Any]) -> dict:
    """A point's row from its report (report.json as written)."""
    q, v, req = report["quality"], report["virtual"], report["requests"]
    codec = report.get(CODEC_QUALITY, {}).get("summary", {})
    mix = mixture_over_best(q["mixtures"])
    return {
        "point": point, "folder": folder, "values": values, "status": "ok",
        "nodes": report["nodes"],
        "bytes_total": report["bytes_total"], "bytes_by_kind": report["bytes_by_kind"],
        "bytes_shipped": report["bytes_total"] - report["bytes_by_kind"].get(CONTROL, 0),
        "shipping_makespan_s": v["shipping_makespan_s"], "shipping_median_s": v["shipping_median_s"],
        "own_over_base": q["summary"]["median_own_over_base"],
        "own_beats_base": f"{q['summary']['own_beats_base']}/{q['summary']['users']}",
        "mixture_over_best_by_mode": mix, "mixture_over_best": headline_mixture(mix),
        "ppl": codec.get("served_ppl"), "ppl_uncompressed": codec.get("uncompressed_ppl"),
        "codec_over_uncompressed": codec.get("codec_over_uncompressed"),
        "requests_total": req["total"], "requests_failed": req["failed"],
        "wall_seconds": report["wall_seconds"],
    }


def failed_row(*, point: int, folder: str, values: dict[str, Any], status: str, error: str) -> dict:
    """The row of a point that did not run (``refused``) or did not finish (``failed``)."""
    return {"point": point, "folder": folder, "values": values, "status": status, "error": error}


def pareto_front(pairs: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """Which (cost, ppl) pairs no other pair dominates (lower is better in both; a pair with a None is
    never on the front). Equal pairs do not dominate each other."""
    ok = [i for i, (x, y) in enumerate(pairs) if x is not None and y is not None]
    front = [False] * len(pairs)
    for i in ok:
        xi, yi = pairs[i]
        assert xi is not None and yi is not None  # ok holds only complete pairs
        dominated = False
        for j in ok:
            xj, yj = pairs[j]
            assert xj is not None and yj is not None
            if xj <= xi and yj <= yi and (xj < xi or yj < yi):
                dominated = True
                break
        front[i] = not dominated
    return front


def mark_frontiers(rows: list[dict]) -> None:
    """Set each row's ``frontier_bytes`` and ``frontier_time`` (False for rows that did not run)."""
    for cost, flag in FRONTIER_KEYS.items():
        pairs = [(r.get(cost), r.get(QUALITY[0])) if r["status"] == "ok" else (None, None) for r in rows]
        for r, on in zip(rows, pareto_front(pairs)):
            r[flag] = on
