"""The run's report: report.json, report.md, events.jsonl and plots, all from one run's measurements.

Bytes are what the coordinator counted at its gRPC boundary with the nodes. Virtual seconds come
from the network model applied to those bytes; wall seconds are this machine's clock. The two
are always reported side by side and never added together.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from proto import federation_pb2 as pb
from proto.byte_counting import kind_name

from . import network
from .network import COORDINATOR, LinkProfile, TransferSimulator

MBIT = 1_000_000
DOWN_KINDS = ("BUNDLE", "ADAPTER")  # what is shipped to a node before it serves


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


def simulate_shipping(nodes: list[dict], links: dict[str, LinkProfile], egress_bps: float
                      ) -> tuple[dict[str, float], list[dict]]:
    """Virtual seconds for every node to receive its bundle and adapters, all nodes at once.

    ``nodes``: dicts with ``node`` and ``by_kind`` (as in :func:`stats_to_dict`). Each node's
    shipping is one stream from the coordinator (bundle, then adapters, chained); concurrent
    streams share the coordinator's egress. Query traffic then follows on the same links.
    Returns each node's shipping end time and the transfer events.
    """
    sim = TransferSimulator(links, egress_bps=egress_bps)
    tids: list[int] = []
    ends: dict[str, int] = {}
    for n in nodes:
        prev = None
        for kind in DOWN_KINDS:
            b = n["by_kind"].get(kind, {})
            nbytes = int(b.get("sent", 0) + b.get("received", 0))
            if nbytes:
                prev = sim.submit(kind=kind.lower(), src=COORDINATOR, dst=n["node"], nbytes=nbytes, at=0.0,
                                  after=prev)
                tids.append(prev)
        if prev is not None:
            ends[n["node"]] = prev
    sim.run()
    shipped = {node: sim.record(tid).end for node, tid in ends.items()}
    # query traffic follows shipping on the same links: requests down, replies up, one stream each way
    now = sim.clock.now
    for n in nodes:
        down = sum(v.get("sent", 0) for k, v in n["by_kind"].items() if k not in DOWN_KINDS)
        up = sum(v.get("received", 0) for k, v in n["by_kind"].items() if k not in DOWN_KINDS)
        if down:
            tids.append(sim.submit(kind="query-down", src=COORDINATOR, dst=n["node"], nbytes=int(down), at=now))
        if up:
            tids.append(sim.submit(kind="query-up", src=n["node"], dst=COORDINATOR, nbytes=int(up), at=now))
    sim.run()
    events = [sim.record(t).as_event() for t in tids]
    return shipped, events


def summarise_latencies(values: list[float]) -> dict:
    """p50, p99 and mean of wall latencies (seconds)."""
    if not values:
        return {"n": 0}
    v = sorted(values)
    def pick(q):
        return v[min(len(v) - 1, int(math.ceil(q * len(v))) - 1)]  # nearest-rank percentile
    return {"n": len(v), "p50_s": round(pick(0.5), 4), "p99_s": round(pick(0.99), 4),
            "mean_s": round(statistics.fmean(v), 4)}


def save_figure(fig, out: Path, name: str) -> str:
    """Lay out ``fig``, write it to ``out/name`` (PNG, 110 dpi), close it; returns ``name``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def write_plots(report: dict, out: Path) -> list[str]:
    """PNG plots beside the report: bytes per node by kind, own adapter vs base, mixture vs specialists."""
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
    if report.get("soup_of_experts"):
        from .soup import write_plots as soup_plots

        files += soup_plots(report["soup_of_experts"], out)
    if report.get("prefetch"):
        from .prefetch_sweep import write_plots as prefetch_plots

        files += prefetch_plots(report["prefetch"], out)
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


def to_markdown(r: dict) -> str:
    """report.md: the same figures as report.json, for people."""
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
    if r.get("soup_of_experts"):
        from .soup import markdown as soup_markdown

        lines += [""] + soup_markdown(r["soup_of_experts"])
    if r.get("prefetch"):
        from .prefetch_sweep import markdown as prefetch_markdown

        lines += [""] + prefetch_markdown(r["prefetch"])
    for extra in ("faults",):
        if extra in r and r[extra]:
            lines += ["", f"## {extra.capitalize()}", "", "```json", json.dumps(r[extra], indent=1)[:4000], "```"]
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


def write_report(report: dict, out: Path, events: list[dict]) -> None:
    """Write report.json, report.md, events.jsonl and the plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = write_plots(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    (out / "report.md").write_text(to_markdown(report))
    network.write_events(out / "events.jsonl", events)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
