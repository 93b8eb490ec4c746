"""The plan's report: report.json, report.md and PNG plots (labelled axes, with units), as sim.run writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..sections import save_figure
from .planner import PlanResult


def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f} MB" if x < 1e9 else f"{x / 1e9:,.2f} GB"


def _dur(s: float) -> str:
    return f"{s:,.0f} s ({s / 60:,.1f} min)" if s >= 60 else f"{s:,.2f} s"


def write_plots(res: PlanResult, out: Path) -> list[str]:
    """Egress utilisation over time, rollout progress, latency at peak, bytes per school per day."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = res.report
    bin_s = r["scenario"]["network"]["bin_s"]
    egress_bps = r["scenario"]["network"]["egress_mbps"] * 1e6
    files = []
    fig, (week, zoom) = plt.subplots(2, 1, figsize=(10, 7))
    for mode, bins in res.egress_bins.items():
        hours = np.arange(len(bins)) * bin_s / 3600
        week.plot(hours, 100 * bins * 8 / (bin_s * egress_bps), label=f"{mode} rollouts + requests", lw=0.8)
    week.set_yscale("symlog", linthresh=0.01)
    week.set_xlabel("virtual time (hours from the start of day 0)")
    week.set_ylabel(f"egress used (% of {egress_bps / 1e6:g} Mbit/s,\n{bin_s:g} s bins, log above 0.01)")
    week.set_title("Coordinator egress utilisation over the plan")
    week.legend(fontsize=8)
    for mode, ro in res.rollouts.items():  # the rollout itself, exact (piecewise constant rates)
        t = [x for x, _ in ro.egress_series] + [ro.makespan_s]
        u = [100 * rate / egress_bps for _, rate in ro.egress_series]
        zoom.step(np.array(t) / 60, u + u[-1:], where="post", label=mode)
    zoom.set_xlabel("virtual minutes after a rollout starts")
    zoom.set_ylabel(f"egress used by the rollout\n(% of {egress_bps / 1e6:g} Mbit/s)")
    zoom.legend(fontsize=8)
    files.append(save_figure(fig, out, "egress_utilisation.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, ro in res.rollouts.items():
        done = np.sort(ro.done_s) / 60
        ax.step(done, 100 * np.arange(1, len(done) + 1) / len(done), where="post",
                label=f"{mode}: all after {ro.makespan_s / 60:,.1f} min")
    ax.set_xlabel("virtual minutes after the rollout starts")
    ax.set_ylabel("schools holding the new model and adapters (%)")
    ax.set_title("Rollout progress: star vs peer relay")
    ax.legend()
    files.append(save_figure(fig, out, "rollout_progress.png"))

    lat = res.peak_latency_s
    if len(lat):
        fig, ax = plt.subplots(figsize=(7, 4))
        x = np.sort(lat)
        ax.plot(x, 100 * np.arange(1, len(x) + 1) / len(x))
        ax.set_xscale("log")
        ax.set_xlabel("request latency at peak (virtual seconds, log scale)")
        ax.set_ylabel("requests at or under (%)")
        ax.set_title(f"Latency in the peak hour(s) {r['requests']['peak_hours']}: queueing + service + link")
        files.append(save_figure(fig, out, "latency_at_peak.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    top = max(float(per.max()) for per in res.school_day_bytes.values()) / 1e6
    edges = np.linspace(0, top * 1.01 + 1e-9, 81)  # the same bins for every mode
    for mode, per in res.school_day_bytes.items():
        ax.hist(per / 1e6, bins=edges.tolist(), histtype="step", label=mode)
    ax.set_yscale("log")
    ax.set_xlabel("bytes on a school's link per day (MB, both directions)")
    ax.set_ylabel("schools (log scale)")
    ax.set_title("Bytes per school per day")
    ax.legend()
    files.append(save_figure(fig, out, "bytes_per_school_day.png"))
    return files


def to_markdown(r: dict) -> str:
    """report.md: the plan's answers for people."""
    s, p, q = r["scenario"], r["population"], r["requests"]
    cal = r["calibration"]
    lines = [f"# Plan: {s['name']}", "", s["description"] or "", "",
             f"{p['schools']:,} schools, {p['users']:,} users ({p['users_with_adapter']:,} with an adapter), "
             f"{s['days']} virtual days, seed {s['seed']}; coordinator egress {s['network']['egress_mbps']:g} Mbit/s; "
             f"schools by link: " + ", ".join(f"{k} {v:,}" for k, v in p["schools_by_link"].items()) + ".", "",
             f"Calibrated on `{cal['source']}` (preset `{cal['preset']}`, experts `{cal['expert_codec']}`, "
             f"{cal['nodes']} nodes, workload concurrency {cal['concurrency']}): bundle "
             + ", ".join(f"{m} {_mb(b['per_item'])}" for m, b in cal["bundle_bytes"].items())
             + f"; adapters {cal['adapter_bytes_per_user']['per_item']:,.0f} B per user; service time "
             + ", ".join(f"{k} p50 {v['p50']:.3f} s (n={v['n']})" for k, v in cal["service_s"].items()) + ".", "",
             "Virtual seconds come from the network model's rules and the calibrated service times; bytes are "
             "calibrated quanta times simulated counts. Wall seconds are this machine's.", "",
             "## Rollouts", "",
             f"Scheduled at hours {r['rollouts_scheduled_h']} (model `{s['rollout']['model']}`).", "",
             "| mode | makespan | median school | p95 school | coordinator egress | via peers | schools fed by peers "
             "| mean egress use |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mode, m in r["modes"].items():
        ro = m["rollout"]
        lines.append(f"| {mode} | {_dur(ro['makespan_s'])} | {_dur(ro['median_school_s'])} | "
                     f"{_dur(ro['p95_school_s'])} | {_mb(ro['egress_bytes'])} | {_mb(ro['peer_bytes'])} | "
                     f"{ro['schools_from_peers']:,} | {100 * ro['mean_egress_utilisation']:.1f}% |")
    lines += ["", "## Bytes", "", "| mode | kind | bytes over the plan |", "| --- | --- | ---: |"]
    for mode, m in r["modes"].items():
        for k, v in m["bytes_by_kind"].items():
            lines.append(f"| {mode} | {k} | {_mb(v)} |")
        lines.append(f"| {mode} | **total at the coordinator** | **{_mb(m['bytes_total'])}** |")
        lines.append(f"| {mode} | school to school (relay) | {_mb(m['peer_bytes_total'])} |")
    st = r["adapter_storage"]
    lines += ["", f"Adapter storage: {_mb(st['per_school_bytes']['p50'])} per school (median; max "
              f"{_mb(st['per_school_bytes']['p100'])}), {_mb(st['at_coordinator_bytes'])} backed up at the "
              f"coordinator."]
    lines += ["", "Bytes on a school's link per day (both directions, rollouts averaged over the plan):", "",
              "| mode | mean | median | p95 | max | all schools |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for mode, m in r["modes"].items():
        b = m["school_bytes_per_day"]
        lines.append(f"| {mode} | {_mb(b['mean'])} | {_mb(b['p50'])} | {_mb(b['p95'])} | {_mb(b['p100'])} "
                     f"| {_mb(b['all_schools'])} |")
    lines += ["", "Coordinator egress utilisation: " + "; ".join(
        f"{mode} peak {100 * m['egress_utilisation']['peak']:.1f}% of a {m['egress_utilisation']['bin_s']:g} s bin, "
        f"mean {100 * m['egress_utilisation']['mean']:.2f}%" for mode, m in r["modes"].items()) + ".", "",
        "## Requests", "",
        f"{q['total']:,} requests ({q['per_active_day']:,} per active day): " +
        ", ".join(f"{k} {v:,}" for k, v in q["by_kind"].items() if v) + ".", ""]
    lp, wp, la = q["latency_peak_s"], q["wait_peak_s"], q["latency_all_s"]
    if lp:
        lines += [f"Latency at peak (hours {q['peak_hours']}, {q['at_peak']:,} requests): p50 {lp['p50']:.3f} s, "
                  f"p95 {lp['p95']:.3f} s, p99 {lp['p99']:.3f} s; {100 * q['queued_share_peak']:.2f}% of them queued "
                  f"over 1 ms (queueing p99 {wp['p99']:.3f} s, p99.9 {wp['p99.9']:.3f} s). All day: p50 "
                  f"{la['p50']:.3f} s, p99 {la['p99']:.3f} s.", ""]
    share = q["share_at_adapter"]
    lines += [f"Served on the node holding the user's adapter: "
              f"{'n/a' if share is None else f'{100 * share:.3f}%'} of the requests of users with an adapter; "
              f"{q['served_elsewhere']:,} routed to another school (node offline, or its queue over "
              f"serving.max_wait_s), "
              f"{q['of_users_without_adapter']:,} from users without an adapter.", "",
              f"Simulation: {r['events']:,} events in {r['wall_seconds']['total']:.1f} wall s "
              f"({r['events_per_second']:,} events/s).", "",
              "Plots: " + ", ".join(f"[{f}]({f})" for f in r.get("plots", [])), ""]
    return "\n".join(lines)


def write(res: PlanResult, out: Path) -> None:
    """report.json, report.md, events.jsonl (each school's rollout, per mode) and the plots, into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for old in [out / "report.json", out / "report.md", out / "events.jsonl", *out.glob("*.png")]:
        old.unlink(missing_ok=True)
    r = res.report
    r["plots"] = write_plots(res, out)
    bins = {mode: [round(float(b)) for b in v] for mode, v in res.egress_bins.items()}
    r["egress_bytes_per_bin"] = {"bin_s": r["scenario"]["network"]["bin_s"], **bins}
    (out / "report.json").write_text(json.dumps(r, indent=1))
    (out / "report.md").write_text(to_markdown(r))
    with open(out / "events.jsonl", "w", encoding="utf-8") as f:
        for mode, ro in res.rollouts.items():
            for i in range(len(ro.done_s)):
                f.write(json.dumps({"kind": "rollout", "mode": mode, "school": i, "source": int(ro.source[i]),
                                    "bundle_s": round(float(ro.bundle_s[i]), 4),
                                    "done_s": round(float(ro.done_s[i]), 4)}) + "\n")
