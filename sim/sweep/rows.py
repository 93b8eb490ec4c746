"""A sweep's rows: one per point, read from the point's own report, and the Pareto frontiers over them.

Every figure of a row is read from the point's report.json (:func:`row_of`), so a row can always be
checked against the report it came from. The frontiers are of cost (bytes across the coordinator
boundary; virtual shipping makespan) against quality (the served base's perplexity, geometric mean over
the workload's texts: the codecs' cost included): a point is on a frontier when no other point is at most
as costly and at most as perplexed, and strictly better in one of the two. The bytes of a frontier leave
out CONTROL (registration and heartbeats): they grow with the run's wall time, not with the
configuration, and would split points that ship exactly the same bytes.

A point with live prefetching (``[prefetch] live``, one partial node per point: ``sim.sweep.grid.check_live``)
also carries its partial node's figures, read from its report's single ``prefetch_live`` row: the node's
bytes by kind (expert weights planned ahead and fetched on demand, activations of remote calls; its
control bytes aside), hit rate, virtual stall seconds, and its perplexity against the fully materialised
node on the same requests. A sweep whose points have them is about prefetching: the rest of each point's
federation is the same at every point, so its frontiers are of the partial node's bytes (expert weights
and activations) and of its stall seconds against its perplexity ratio (:data:`LIVE_FRONTIER`).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proto import federation_pb2 as pb
from proto.byte_counting import kind_name

from ..codec_quality import SECTION_KEY as CODEC_QUALITY

# (row key, label with its unit) of the cost axes of the frontiers, and the quality axis
COSTS = (("bytes_shipped", "bytes across the coordinator boundary, CONTROL aside (MB)"),
         ("shipping_makespan_s", "virtual shipping makespan (s)"))
QUALITY = ("ppl", "served base perplexity (geometric mean over texts)")
# (row key, label with its unit, a reference line or None) of the figures plotted against each varied key
QUALITY_FIGURES = (("own_over_base", "own adapter / base ppl, median over users (ratio)", 1.0),
                   ("mixture_over_best", "mixture / best specialist ppl, median (ratio)", 1.0),
                   ("codec_over_uncompressed", "served / uncompressed base ppl (ratio)", 1.0))
# the live prefetch frontier's axes (a sweep of partial nodes), and the figures plotted against each key
LIVE_COSTS = (("live_bytes", "partial node's bytes: expert weights + activations (MB)"),
              ("stall_seconds", "partial node's stall, virtual (s)"))
LIVE_QUALITY = ("live_ppl_ratio", "partial / full node perplexity, same requests (ratio)")
LIVE_FIGURES = (("hit_rate", "hit rate (share of expert uses held)", 1.0),
                ("live_ppl_ratio", "partial / full node ppl (ratio)", 1.0),
                ("stall_seconds", "partial node's stall, virtual (s)", None))
FLAGS = ("frontier_bytes", "frontier_time")  # a row's marks: on the frontier of the first cost, of the second


@dataclass(frozen=True)
class Frontier:
    """What a sweep's frontiers are drawn on: two costs (row key, label), one quality (row key, label), and
    the figures plotted against each varied key (row key, label, reference line or None)."""

    kind: str
    costs: tuple[tuple[str, str], ...]
    quality: tuple[str, str]
    figures: tuple[tuple[str, str, float | None], ...]

    def to_dict(self) -> dict[str, Any]:
        """For sweep.json: the kind and the row keys of the axes."""
        return {"kind": self.kind, "costs": [c for c, _ in self.costs], "quality": self.quality[0]}


FEDERATION_FRONTIER = Frontier("federation", COSTS, QUALITY, QUALITY_FIGURES)
LIVE_FRONTIER = Frontier("live", LIVE_COSTS, LIVE_QUALITY, LIVE_FIGURES)
CONTROL = kind_name(pb.BYTE_KIND_CONTROL)  # the report's name of the kind, as bytes_by_kind keys it


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
        **live_figures(report),
    }


def live_figures(report: dict) -> dict[str, Any]:
    """The partial node's figures of a report with one ``prefetch_live`` row (none otherwise: a run with
    several partial nodes has no one set of them)."""
    rows = report.get("prefetch_live", {}).get("rows", [])
    if len(rows) != 1:
        return {}
    (r,) = rows
    b = r["bytes"]
    return {
        "live_node": r["node"], "live_policy": r["policy"], "live_budget": r["budget"],
        "live_budget_unit": r["budget_unit"], "live_prior_beta": r.get("prior_beta", 0.0),
        "live_bytes_by_kind": {"expert_planned": b["expert_planned"], "expert_on_demand": b["expert_on_demand"],
                               "activations": b["activations"], "control": b["control"]},
        "live_bytes": b["expert_weights"] + b["activations"], "live_bytes_per_token": r["bytes_per_token"],
        "live_requests": r["requests"], "live_tokens": r["tokens"],
        "hit_rate": r["hit_rate"], "stall_seconds": r["stall_seconds"],
        "live_ppl": r["ppl"], "live_ppl_full": r["ppl_full"], "live_ppl_ratio": r["ppl_ratio"],
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


def frontier_of(rows: list[dict]) -> Frontier:
    """The frontier's axes for these rows: :data:`LIVE_FRONTIER` when any row that ran has a partial node's
    figures (rows without them are then never on it), else :data:`FEDERATION_FRONTIER`."""
    live = any(r["status"] == "ok" and "live_bytes" in r for r in rows)
    return LIVE_FRONTIER if live else FEDERATION_FRONTIER


def mark_frontiers(rows: list[dict]) -> Frontier:
    """Set each row's ``frontier_bytes`` and ``frontier_time`` (on the frontier of the first cost against
    quality, of the second; False for rows that did not run) on :func:`frontier_of`'s axes; returns them."""
    axes = frontier_of(rows)
    quality = axes.quality[0]
    for (cost, _), flag in zip(axes.costs, FLAGS):
        pairs = [(r.get(cost), r.get(quality)) if r["status"] == "ok" else (None, None) for r in rows]
        for r, on in zip(rows, pareto_front(pairs)):
            r[flag] = on
    return axes
