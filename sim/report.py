"""The run's report: report.json, report.md, events.jsonl and plots, all from one run's measurements.

The renderer draws the core every run has (bytes, time, quality, requests), then the sections the run's
optional parts added (:mod:`sim.sections`), whatever they are.

Bytes are what the coordinator counted at its gRPC boundary with the nodes. Virtual seconds come
from the network model applied to those bytes; wall seconds are this machine's clock. The two
are always reported side by side and never added together.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proto import federation_pb2 as pb
from proto.byte_counting import kind_name

from . import network
from .sections import Section, save_figure


def _kinds(rows) -> dict:
    """KindBytes rows as {kind: {sent, received, payload, messages}}."""
    return {kind_name(k.kind): {"sent": k.sent, "received": k.received, "payload": k.payload,
                                "messages": k.messages} for k in rows}


def stats_to_dict(stats: pb.Stats) -> dict:
    """The coordinator's byte counters as plain data: totals, by kind, by node and kind."""
    return {"bytes_total": stats.bytes_total, "by_kind": _kinds(stats.by_kind),
            "by_node": {nb.node_id: _kinds(nb.by_kind) for nb in stats.by_node},
            "requests_ok": stats.requests_ok, "requests_failed": stats.requests_failed,
            "requests_shed": stats.requests_shed, "requests_failed_over": stats.requests_failed_over}


def summarise_latencies(values: list[float]) -> dict:
    """p50, p99 and mean of wall latencies (seconds)."""
    if not values:
        return {"n": 0}
    v = sorted(values)
    def pick(q):
        return v[min(len(v) - 1, int(math.ceil(q * len(v))) - 1)]  # nearest-rank percentile
    return {"n": len(v), "p50_s": round(pick(0.5), 4), "p99_s": round(pick(0.99), 4),
            "mean_s": round(statistics.fmean(v), 4)}


def write_plots(report: dict, out: Path, sections: Sequence[Section] = ()) -> list[str]:
    """PNG plots beside the report: bytes per node by kind, own adapter vs base, mixture vs specialists,
    then each section's own; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    nodes = report["per_node"]
    if nodes:
        kinds = sorted({k for n in nodes for k in n["bytes_by_kind"]})
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(nodes)), 4))
        bottom = [0.0] * len(nodes)
        for k in kinds:
            vals = [n["bytes_by_kind"].get(k, 0) / 1e6 for n in nodes]
            ax.bar(range(len(nodes)), vals, bottom=bottom, label=k)
            bottom = [a + b for a, b in zip(bottom, vals)]
        ax.set_xlabel("node")
        ax.set_ylabel("MB crossing the coordinator boundary")
        ax.set_title(f"Bytes per node by kind ({report['scenario']['model']['expert_codec']} experts)")
        ax.legend(fontsize=8)
        files.append(save_figure(fig, out, "bytes_per_node.png"))
    users = report["quality"]["users"]
    if users:
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(users)), 4))
        xs = range(len(users))
        ax.bar([x - 0.2 for x in xs], [u["base_ppl"] for u in users], width=0.4, label="base")
        ax.bar([x + 0.2 for x in xs], [u["own_ppl"] for u in users], width=0.4, label="own adapter")
        ax.set_xticks(list(xs), [u["user"] for u in users], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("held-out perplexity")
        ax.set_title("Each user's own adapter against the base (Bet 61)")
        ax.legend()
        files.append(save_figure(fig, out, "own_vs_base.png"))
    mixes = list(report["quality"]["mixtures"])
    if mixes:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(mixes)), 4))
        labels = [f"{m['text']}\n{m['mode']}" for m in mixes]
        ax.bar([i - 0.2 for i in range(len(mixes))], [m["best_ppl"] for m in mixes], width=0.4, label="best specialist")
        ax.bar([i + 0.2 for i in range(len(mixes))], [m["mixture_ppl"] for m in mixes], width=0.4, label="mixture")
        ax.set_xticks(range(len(mixes)), labels, fontsize=7)
        ax.set_ylabel("perplexity")
        ax.set_title("Output-space mixture of specialist nodes against the best one (Bet 04)")
        ax.legend()
        files.append(save_figure(fig, out, "mixture_vs_best.png"))
    for sec in sections:
        if sec.data:
            files += sec.plots(sec.data, out)
    return files


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def guarantee(m: dict) -> str:
    """The bound a mixture mode promises, and whether the measurement keeps it."""
    what = "per token >= best - log N" if m["mode"] == "uniform" else f"regret <= log N = {m['regret_bound_nats']:.2f}"
    return f"{what}: {'holds' if m['bound_holds'] else 'BROKEN'}"


def to_markdown(r: dict, sections: Sequence[Section] = ()) -> str:
    """report.md: the same figures as report.json, for people: the core, then each section's lines."""
    s = r["scenario"]
    lines = [f"# Federation run: {s['name']}", "",
             f"{r['nodes']} nodes ({r['actors']} Ray actors), preset `{s['federation']['preset']}`, seed "
             f"{s['federation']['seed']}, experts in `{s['model']['expert_codec']}`, other tensors in "
             f"`{s['model']['other_codec']}`, default link `{s['network']['default_link']}`, coordinator egress "
             f"{s['network']['egress_mbps']} Mbit/s.", "",
             "Bytes are measured at the coordinator's gRPC boundary; virtual seconds come from the network model "
             "applied to those bytes; wall seconds are this machine's. They are never mixed.", "",
             "## Bytes", "", "| kind | bytes | share |", "| --- | ---: | ---: |"]
    for k, v in sorted(r["bytes_by_kind"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {_fmt_bytes(v)} | {100 * v / max(1, r['bytes_total']):.1f}% |")
    lines.append(f"| **total** | **{_fmt_bytes(r['bytes_total'])}** | 100% |")
    lines += ["", "Bundles written (what each node downloads):", "", "| bundle | bytes | tensors |",
              "| --- | ---: | ---: |"]
    for b in r["bundles"]:
        lines.append(f"| {b['name']} | {_fmt_bytes(b['size'])} | {b['tensors']} |")
    v = r["virtual"]
    lines += ["", "## Time", "",
              f"- Shipping, virtual: every node loaded after **{v['shipping_makespan_s']:.1f} s** "
              f"(median node {v['shipping_median_s']:.1f} s) on the simulated links.",
              f"- Wall, this machine: {r['wall_seconds']:.1f} s for the whole run; phases: " +
              ", ".join(f"{k} {t:.1f} s" for k, t in r["wall_phases"].items()) + ".", "",
              "| node | model | link | bytes | virtual s (shipping) |", "| --- | --- | --- | ---: | ---: |"]
    shown = r["per_node"] if len(r["per_node"]) <= 40 else r["per_node"][:20] + r["per_node"][-5:]
    for n in shown:
        lines.append(f"| {n['node']} | {n['model']} | {n['link']} | {_fmt_bytes(n['bytes'])} "
                     f"| {n['virtual_seconds']:.2f} |")
    q = r["quality"]
    lines += ["", "## Quality", "", "Each user's own adapter against the base on the same held-out text (Bet 61):", "",
              "| user | node | own ppl | base ppl | own bpc | floor bpc |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for u in q["users"]:
        floor = "" if u["bpc_floor"] is None else f"{u['bpc_floor']:.3f}"
        lines.append(f"| {u['user']} | {u['node']} | {u['own_ppl']:.2f} | {u['base_ppl']:.2f} "
                     f"| {u['own_bpc']:.3f} | {floor} |")
    lines += corpus_text_lines(q["users"])
    s_ = q["summary"]
    lines += ["", f"Own adapter beats base for {s_['own_beats_base']} of {s_['users']} users "
                  f"(median ppl ratio own/base {s_['median_own_over_base']:.3f})."]
    if q["unknown"]:
        lines += ["", "Unknown users (no adapter) are served by the base (Bet 55):", "", "| user | ppl | bpc |",
                  "| --- | ---: | ---: |"]
        lines += [f"| {u['user']} | {u['ppl']:.2f} | {u['bpc']:.3f} |" for u in q["unknown"]]
    if q["mixtures"]:
        lines += ["", "Mixture of specialist nodes (Bet 04), against each specialist alone:", "",
                  "| text | mode | mixture ppl | best specialist | its ppl | mixture/best | its guarantee "
                  "| regret vs best (nats) |",
                  "| --- | --- | ---: | --- | ---: | ---: | --- | --- |"]
        for m in q["mixtures"]:
            lines.append(f"| {m['text']} | {m['mode']} | {m['mixture_ppl']:.2f} | {m['best']} | {m['best_ppl']:.2f} | "
                         f"{m['mixture_over_best']:.3f} | {guarantee(m)} | {m['regret_nats']:.2f} |")
    lat = r["requests"]
    lines += ["", "## Requests (wall)", "", f"{lat['total']} requests, {lat['failed']} failed. Latency by kind:", "",
              "| kind | n | p50 s | p99 s |", "| --- | ---: | ---: | ---: |"]
    for k, d in lat["by_kind"].items():
        if d["n"]:
            lines.append(f"| {k} | {d['n']} | {d['p50_s']:.3f} | {d['p99_s']:.3f} |")
    for sec in sections:
        if sec.data:
            lines += [""] + sec.markdown(sec.data)
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in r.get("plots", [])), ""]
    return "\n".join(lines)


def corpus_text_lines(users: list[dict]) -> list[str]:
    """One line per --corpus user: characters its adapter trained on, of how many, and scored."""
    lines = []
    seen = set()
    for u in users:
        if u.get("train_chars_available") is None or u["user"] in seen:
            continue
        seen.add(u["user"])
        lines.append(f"- {u['user']} (--corpus): adapter trained on {u['train_chars']:,} of "
                     f"{u['train_chars_available']:,} characters; {u['scored_chars']:,} scored per request "
                     "(raise federation.corpus_chars and workload.score_chars to use more)")
    return ["", *lines] if lines else []


def write_report(report: dict, out: Path, events: list[dict], sections: Sequence[Section] = ()) -> None:
    """Write report.json, report.md, events.jsonl and the plots into ``out``: the core of ``report``,
    then ``sections`` in order (their data is already in ``report``, under their keys)."""
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = write_plots(report, out, sections)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    (out / "report.md").write_text(to_markdown(report, sections))
    network.write_events(out / "events.jsonl", events)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
