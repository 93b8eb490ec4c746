"""The planner: a population's week (or ``days``) in virtual time, from a calibration; returns the report.

Order of work: validate the scenario against the calibration (before anything is drawn), draw the
population, simulate each rollout mode once (:mod:`sim.plan.rollout`; every rollout of the plan starts
at its scheduled time and runs as that one did), serve each active day's requests
(:mod:`sim.plan.serving`), then account for bytes (per kind, per school and day, at the coordinator's
egress over time). Rollouts and requests do not slow each other down: request bytes are small next to a
bundle and use the links when rollouts are rare (at night, by default).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import population, rollout, serving
from .calibration import BYTE_KIND_OF, Calibration
from .config import REQUEST_KINDS, PlanScenario

DAY_S = serving.DAY_S


@dataclass(kw_only=True)
class PlanResult:
    """The report (plain data) and the arrays its plots draw."""

    report: dict
    rollouts: dict[str, rollout.Rollout]
    egress_bins: dict[str, np.ndarray]  # mode -> bytes the coordinator sent per bin
    school_day_bytes: dict[str, np.ndarray]  # mode -> (S,) bytes on each school's link per day
    peak_latency_s: np.ndarray
    extra: dict = field(default_factory=dict)


def schedule(first_s: float, every_s: float, end_s: float) -> list[float]:
    """Start times ``first_s + k * every_s`` before ``end_s``."""
    if every_s <= 0:
        return []
    return [first_s + k * every_s for k in range(int(math.ceil((end_s - first_s) / every_s)))
            if first_s + k * every_s < end_s]


def percentiles(x: np.ndarray, qs: tuple[float, ...] = (50, 95, 99)) -> dict[str, float]:
    """``{"p50": ..., ...}`` of ``x`` (empty dict for no values)."""
    if len(x) == 0:
        return {}
    return {f"p{q:g}": round(float(v), 4) for q, v in zip(qs, np.percentile(x, qs))}


def plan(scn: PlanScenario, cal: Calibration, *, progress: Callable[[str], None] | None = None) -> PlanResult:
    """Simulate ``scn`` with the bytes and service times of ``cal``; PlanError before any work if they disagree."""
    kinds = {k for p in scn.personas.values() if p.requests_per_day > 0 for k, w in p.kinds.items() if w > 0}
    cal.check(preset=scn.preset, expert_codec=scn.expert_codec, model=scn.rollout.model, kinds=kinds)
    say = progress or (lambda _msg: None)
    t_wall = time.perf_counter()
    rng = np.random.default_rng(scn.seed)
    pop = population.build(scn, rng)
    S, horizon = pop.schools, scn.days * DAY_S
    known_per_school = pop.users_per_school(known_only=True)
    bundle = float(cal.bundle[scn.rollout.model].per_item)
    bundle_bytes = np.full(S, bundle)
    adapter_bytes = known_per_school * float(cal.adapter.per_item)
    egress_bps = scn.network.egress_mbps * 1e6
    ro = scn.rollout
    rollouts: dict[str, rollout.Rollout] = {}
    wall: dict[str, float] = {}
    for mode in ro.modes:
        t0 = time.perf_counter()
        if mode == "star":
            rollouts[mode] = rollout.star(pop, bundle_bytes, adapter_bytes, egress_bps=egress_bps,
                                          streams=ro.star_streams)
        else:
            rollouts[mode] = rollout.relay(pop, bundle_bytes, adapter_bytes, egress_bps=egress_bps,
                                           seeds=ro.relay_seeds, fanout=ro.relay_fanout,
                                           min_up_bps=ro.relay_min_up_mbps * 1e6)
        wall[f"rollout_{mode}"] = time.perf_counter() - t0
        say(f"{mode} rollout: every school done after {rollouts[mode].makespan_s:,.0f} virtual s")
    starts = schedule(ro.first_at_h * 3600, ro.every_days * DAY_S, horizon)
    syncs = schedule(scn.adapters.sync_at_h * 3600, scn.adapters.sync_every_days * DAY_S, horizon)

    # requests, day by day
    t0 = time.perf_counter()
    nbins = int(math.ceil(horizon / scn.network.bin_s))
    req_egress = np.zeros(nbins)
    school_req = np.zeros(S)
    by_kind = dict.fromkeys(REQUEST_KINDS, 0)
    bytes_kind = dict.fromkeys(REQUEST_KINDS, 0.0)
    peak_hours = set(scn.workload.peak())
    lat_all, lat_peak, wait_peak = [], [], []
    n_req = n_known = n_at_adapter = n_moved = 0
    free_at = np.zeros(S)
    for day in range(scn.days):
        if day % 7 not in scn.workload.active_days:
            continue
        d = serving.serve_day(pop, scn, cal, day, rng, free_at)
        n_req += len(d.t)
        n_known += int(d.known.sum())
        n_at_adapter += int(d.at_adapter.sum())
        n_moved += int((d.school != d.home).sum())
        np.add.at(req_egress, np.minimum((d.t / scn.network.bin_s).astype(np.int64), nbins - 1), d.sent)
        school_req += np.bincount(d.school, weights=d.sent + d.received, minlength=S)
        for k, name in enumerate(REQUEST_KINDS):
            mask = d.kind == k
            by_kind[name] += int(mask.sum())
            bytes_kind[name] += float(d.sent[mask].sum() + d.received[mask].sum())
        peak = np.isin(((d.t % DAY_S) // 3600).astype(int), list(peak_hours))
        lat_all.append(d.latency_s.astype(np.float32))
        lat_peak.append(d.latency_s[peak])
        wait_peak.append(d.wait_s[peak])
        say(f"day {day}: {len(d.t):,} requests served")
    wall["requests"] = time.perf_counter() - t0
    lat_all_a = np.concatenate(lat_all) if lat_all else np.zeros(0)
    peak_lat = np.concatenate(lat_peak) if lat_peak else np.zeros(0)
    peak_wait = np.concatenate(wait_peak) if wait_peak else np.zeros(0)

    # bytes: per kind at the coordinator, per school and day, and the egress over time, per mode
    n_ro, n_sync = len(starts), len(syncs)
    control = float(cal.control.per_item)
    sync_bytes = n_sync * adapter_bytes  # (S,) each user's refreshed adapter backed up, node -> coordinator
    egress_bins, school_day, modes_out = {}, {}, {}
    for mode, r in rollouts.items():
        bins = req_egress.copy()
        for s0 in starts:
            lo = int(s0 // scn.network.bin_s)
            hi = min(nbins, int((s0 + r.makespan_s) // scn.network.bin_s) + 1)
            for b in range(lo, hi):
                bins[b] += r.egress_bits_between(b * scn.network.bin_s - s0, (b + 1) * scn.network.bin_s - s0) / 8
        egress_bins[mode] = bins
        peer = float(bundle_bytes[r.source >= 0].sum())
        per_school = (n_ro * (bundle_bytes + adapter_bytes + control + r.up_bytes) + sync_bytes + school_req)
        school_day[mode] = per_school / scn.days
        kinds_out = {"BUNDLE": n_ro * float(bundle_bytes[r.source < 0].sum()),
                     "ADAPTER": n_ro * float(adapter_bytes.sum()) + float(sync_bytes.sum()),
                     "CONTROL": n_ro * S * control,
                     **{BYTE_KIND_OF[k]: bytes_kind[k] for k in REQUEST_KINDS if by_kind[k]}}
        util = bins * 8 / (scn.network.bin_s * egress_bps)
        modes_out[mode] = {
            "rollout": {"makespan_s": round(r.makespan_s, 3),
                        "median_school_s": round(float(np.median(r.done_s)), 3),
                        "p95_school_s": round(float(np.percentile(r.done_s, 95)), 3),
                        "egress_bytes": r.egress_bytes, "peer_bytes": peer,
                        "schools_from_peers": int((r.source >= 0).sum()),
                        "max_relay_uploads_bytes": float(r.up_bytes.max()), "events": r.events,
                        "mean_egress_utilisation": round(r.egress_bytes * 8 / max(r.makespan_s, 1e-9) / egress_bps, 4)},
            "bytes_by_kind": {k: round(v) for k, v in kinds_out.items()},
            "bytes_total": round(sum(kinds_out.values())),
            "peer_bytes_total": round(n_ro * peer),
            "school_bytes_per_day": {"mean": round(float(school_day[mode].mean())),
                                     **{k: round(v) for k, v in percentiles(school_day[mode], (50, 95, 100)).items()},
                                     "all_schools": round(float(school_day[mode].sum()))},
            "egress_utilisation": {"peak": round(float(util.max()), 4), "mean": round(float(util.mean()), 4),
                                   "bin_s": scn.network.bin_s},
        }
    wall["total"] = time.perf_counter() - t_wall
    events = sum(r.events for r in rollouts.values()) + 2 * n_req
    report = {
        "kind": "plan",
        "scenario": scn.to_dict(),
        "calibration": cal.as_dict(),
        "population": {"schools": S, "users": len(pop.user_school), "users_with_adapter": int(pop.user_known.sum()),
                       "schools_by_link": {n: int((pop.school_link == i).sum()) for i, n in enumerate(pop.link_names)},
                       "users_per_school": {"mean": round(len(pop.user_school) / S, 2),
                                            **percentiles(pop.users_per_school().astype(float), (50, 95, 100))}},
        "adapter_storage": {"per_school_bytes": {"mean": round(float(adapter_bytes.mean())),
                                                 **percentiles(adapter_bytes, (50, 95, 100))},
                            "at_coordinator_bytes": round(float(adapter_bytes.sum()))},
        "rollouts_scheduled_h": [round(s / 3600, 3) for s in starts],
        "adapter_syncs": n_sync,
        "modes": modes_out,
        "requests": {"total": n_req, "per_active_day": round(n_req / max(1, sum(
            1 for d in range(scn.days) if d % 7 in scn.workload.active_days))), "by_kind": by_kind,
            "peak_hours": sorted(peak_hours), "at_peak": int(len(peak_lat)),
            "latency_peak_s": percentiles(peak_lat), "wait_peak_s": percentiles(peak_wait, (50, 99, 99.9)),
            "queued_share_peak": round(float((peak_wait > 1e-3).mean()), 6) if len(peak_wait) else None,
            "latency_all_s": percentiles(lat_all_a),
            "share_at_adapter": round(n_at_adapter / n_known, 6) if n_known else None,
            "served_elsewhere": n_moved, "of_users_without_adapter": n_req - n_known},
        "events": events,
        "wall_seconds": {k: round(v, 3) for k, v in wall.items()},
        "events_per_second": round(events / max(wall["total"], 1e-9)),
        "note": "virtual seconds from the network model's rules and calibrated service times; bytes are "
                "calibrated quanta times simulated counts; wall seconds are this machine's",
    }
    return PlanResult(report=report, rollouts=rollouts, egress_bins=egress_bins, school_day_bytes=school_day,
                      peak_latency_s=peak_lat)

