"""report.md lines and the bytes-against-quality plot of the live prefetch section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..sections import save_figure


def _f(x: Any, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(section: dict[str, Any]) -> list[str]:
    """The live table (policy x budget) with the sweep's prediction beside it."""
    s = section["setup"]
    lines = ["## Live prefetching (partial nodes)", "",
             f"{s['requests']} requests of {s['tokens_per_request']} tokens from {s['users']} users, predictor "
             f"`{s['predictor']}`, experts of `{s['source_bundle']}` on `{s['link']}` (remote peer "
             f"`{s['remote_peer']}`), {s['experts'][0]}x{s['experts'][1]} experts, "
             f"{s['expert_bytes_total']:,} expert bytes in all. {s['note']}.", "",
             "| policy | budget | prior beta | expert KB | activation KB | KB/token | hit rate | stall s | ppl "
             "| ppl / full | ppl / full with prior | sweep hit rate | sweep ppl / full | sweep stall s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in section["rows"]:
        sw = r.get("sweep") or {}
        unit = "/block" if r["budget_unit"].startswith("experts") else " B"
        lines.append(f"| {r['policy']} | {r['budget']}{unit} | {r.get('prior_beta', 0):g} | "
                     f"{r['bytes']['expert_weights'] / 1e3:,.1f} | "
                     f"{r['bytes']['activations'] / 1e3:,.1f} | {r['bytes_per_token'] / 1e3:.2f} | "
                     f"{r['hit_rate']:.3f} | {r['stall_seconds']:.2f} | {r['ppl']:.3f} | {_f(r['ppl_ratio'], '.4f')} "
                     f"| {_f(r.get('ppl_ratio_vs_full_with_prior'), '.4f')} "
                     f"| {_f(sw.get('hit_rate'))} | {_f(sw.get('ppl_ratio'), '.4f')} | "
                     f"{_f(sw.get('stall_seconds'), '.2f')} |")
    lines += ["", "Expert KB: bundle payload the node fetched (plans and on-demand); activation KB: RunExpert "
              "messages both ways; stall: virtual seconds of on-demand fetches and remote calls on the node's "
              "idle link, plus plans that did not fit the gap between requests. Prior beta > 0: the node adds "
              "beta * log(the planner's usage for it) to its router; ppl / full is against the fully materialised "
              "model without the prior, ppl / full with prior against it with the same prior. Plot: "
              "`prefetch_live_bytes_quality.png`.", ""]
    return lines


def write_plots(section: dict[str, Any], out: Path) -> list[str]:
    """prefetch_live_bytes_quality.png: KB per token (weights + activations) against ppl / full, per policy."""
    rows = section.get("rows") or []
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    panels = ((axes[0], lambda r: r["ppl_ratio"] or 1.0, "perplexity / fully materialised"),
              (axes[1], lambda r: r["stall_seconds"] / max(r["requests"], 1), "stall per request (virtual s)"))
    for ax, y, label in panels:
        for i, (policy, beta) in enumerate(dict.fromkeys((r["policy"], r.get("prior_beta", 0)) for r in rows)):
            pts = sorted((r["bytes_per_token"] / 1e3, y(r), r["budget"]) for r in rows
                         if (r["policy"], r.get("prior_beta", 0)) == (policy, beta)
                         and r["budget_unit"].startswith("experts"))
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^D"[i % 4], alpha=0.8,
                    label=policy + (f", prior {beta:g}" if beta else ""), linestyle="--" if beta else "-")
            for x, v, k in pts:
                ax.annotate(f"{k}", (x, v), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xlabel("KB per token (expert weights + activations)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Live prefetching per miss policy (labels: experts per block)")
    return [save_figure(fig, out, "prefetch_live_bytes_quality.png")]
