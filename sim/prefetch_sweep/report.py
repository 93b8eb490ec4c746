"""The sweep in the run's report: the frontier plots and report.md's prefetch section."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .rows import GOAL_HIT_RATE, GOAL_PPL_RATIO


def write_plots(section: dict[str, Any], out: Path) -> list[str]:
    """prefetch_frontier.png (bytes shipped per token against ppl ratio, or stall seconds under an exact
    policy; one line per predictor) and prefetch_hit_rate.png (hit rate against budget); their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = section.get("rows") or []
    if not rows:
        return []
    names = list(dict.fromkeys(r["predictor"] for r in rows))
    by_name = {n: sorted((r for r in rows if r["predictor"] == n), key=lambda r: r["budget"]) for n in names}
    policy = rows[0]["policy"]
    g = section.get("goal", {})
    budgets = sorted({r["budget"] for r in rows})
    if policy == "substitute":
        def quality(r):
            return r["ppl_ratio"]
        ylabel, target = "perplexity / full model's (missed experts substituted)", ("ppl ratio", GOAL_PPL_RATIO)
    else:  # exact policies pay in time instead
        def quality(r):
            return r["stall_seconds"] / max(r["requests"], 1)
        ylabel, target = f"stall per request, virtual s ({policy} on a miss)", None
    _lines(plt, out / "prefetch_frontier.png", by_name, lambda r: r["bytes_shipped_per_token"] / 1000, quality,
           xlabel="KB shipped per token (prefetched + fetched on demand)", ylabel=ylabel, target=target,
           title=f"Bandwidth/quality frontier of expert prefetching (budgets {budgets[0]}..{budgets[-1]} experts "
                 f"per block; {g.get('budget')} labelled)", mark=g.get("budget"))
    _lines(plt, out / "prefetch_hit_rate.png", by_name, lambda r: r["budget"], lambda r: r["hit_rate"],
           xlabel="budget: experts per block materialised", target=("hit rate", GOAL_HIT_RATE),
           ylabel="hit rate (prefetched and arrived before its block ran)", title="Expert hit rate against budget",
           vline=g.get("budget"))
    return ["prefetch_frontier.png", "prefetch_hit_rate.png"]


def _lines(plt, path: Path, by_name: dict[str, list[dict]], x: Callable[[dict], float], y: Callable[[dict], float], *,
           xlabel: str, ylabel: str, title: str, target: tuple[str, float] | None, mark: int | None = None,
           vline: float | None = None) -> None:
    """One line per predictor (the oracle dashed), a dotted goal line, the ``mark`` budget's points labelled."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, rs in by_name.items():
        xs, ys = [x(r) for r in rs], [y(r) for r in rs]
        ax.plot(xs, ys, marker="o", ms=3, label=name, ls="--" if name == "oracle" else "-")
        for r, px, py in zip(rs, xs, ys):
            if r["budget"] == mark:
                ax.annotate(str(mark), (px, py), fontsize=6, alpha=0.7)
    if target is not None:
        ax.axhline(target[1], color="grey", lw=0.8, ls=":", label=f"goal: {target[0]} {target[1]}")
    if vline is not None:
        ax.axvline(vline, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(section: dict[str, Any]) -> list[str]:
    """report.md's prefetch section: the goal, then one table row per (predictor, budget)."""
    rows = section.get("rows") or []
    s = section.get("setup", {})
    g = section.get("goal", {})
    lines = ["## Prefetch", ""]
    if s:
        lines += [f"{s['requests']} held-out requests of {s['tokens_per_request']} tokens ({s['prompt_tokens']}-token "
                  f"prompt) from {s['users']} users, replayed per row on the base model after "
                  f"{s['history_requests']} history requests; miss policy `{s['policy']}`, "
                  f"{1000 * s['step_s']:.0f} ms per step, ahead predictors ship {s['lead_s']:.0f} s early. "
                  f"All experts: {s['expert_bytes_total'] / 1e6:.2f} MB ({s['expert_bytes_mean'] / 1e3:.1f} KB each). "
                  f"A request uses {s['distinct_experts_per_block']:.1f} distinct experts per block on average "
                  f"(of {s['experts'][1]}). "
                  f"{s['note'].capitalize()}.", ""]
    if g.get("evaluated"):
        verdict = "**met**" if g["met"] else "**not met**"
        lines.append(f"Goal at {g['budget']} of {g['of_experts']} experts per block (hit rate >= "
                     f"{g['hit_rate_target']}, ppl ratio <= {g['ppl_ratio_target']}): {verdict} by the best "
                     f"predictor, `{g['predictor']}`: hit rate {g['hit_rate']:.3f}, ppl ratio "
                     f"{_num(g['ppl_ratio'])}.")
        if "oracle" in g:
            o = g["oracle"]
            lines.append(f"The oracle (the routing actually taken) reaches hit rate {o['hit_rate']:.3f}, ppl ratio "
                         f"{_num(o['ppl_ratio'])} at that budget, the ceiling for every predictor" +
                         ("." if o["meets_goal"] else ": the goal is out of any predictor's reach at this budget, "
                          "because a request uses more experts per block than the budget holds."))
        first = {k: v for k, v in g["smallest_budget_meeting_goal"].items() if v is not None}
        lines.append("Smallest budget meeting both conditions: " +
                     (", ".join(f"{k} {v}" for k, v in first.items()) if first else "none swept") + ".")
    elif g:
        lines.append(f"Goal not evaluated: {g.get('reason', '')}.")
    lines += ["", "| predictor | budget | hit rate | ppl ratio | top-1 acc | top-4 acc | top-8 acc | "
                  "KB/token shipped | KB/token wasted | stall s | TTFT s |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        rec = {k: (f"{np.mean(v):.3f}" if v else "") for k, v in r["recall_at_k_tokens"].items()}
        lines.append(f"| {r['predictor']} | {r['budget']} | {r['hit_rate']:.3f} | {_num(r['ppl_ratio'])} | "
                     f"{rec.get('1', '')} | {rec.get('4', '')} | {rec.get('8', '')} | "
                     f"{r['bytes_shipped_per_token'] / 1e3:.2f} | {r['bytes_wasted_per_token'] / 1e3:.2f} | "
                     f"{r['stall_seconds']:.2f} | {r['ttft']:.3f} |")
    lines.append("")
    lines.append("top-k acc: share of (token, block) expert uses whose expert is among the predictor's top k of "
                 "its block (SiDA's top-k accuracy), mean over blocks. report.json has it per block "
                 "(`recall_at_k_tokens`) beside recall@k over distinct experts (`recall_at_k`).")
    return lines


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
