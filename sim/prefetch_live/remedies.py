"""Routing that prefetching can predict (issue 16 item 5): per-user router priors, measured.

    python -m sim.prefetch_live.remedies [--preset small] [--seed 0] [--budget 8] [--betas 0,0.5,1,2,4]
                                         [--requests 32] [--history 8] [--json]

A user's router prior adds ``beta * log p_u`` to every block's router logits, where p_u (L, E) is the
user's expert usage on their own training text smoothed toward everyone's (the ``user`` predictor's
histogram, alpha 64 tokens). beta = 0 is the unmodified model; as beta grows the user's tokens keep to
the experts the user uses most, which a plan of the user's top ``budget`` experts per block then covers.
No training: the prior is an inference-time change (``model.staged.staged_forward(router_bias=...)``).

For each beta, over held-out windows of every known user's text (the sweep's requests): the hit rate of
the top-``budget`` plan (uses whose expert the plan holds), distinct experts per block per request,
perplexity with every expert available against the unmodified model (the prior's own cost), and
perplexity when only the plan's experts are installed and misses substitute (what a partial node at that
budget serves), against the unmodified fully materialised model. The issue's goal: hit rate >= 0.95 at
half the experts with perplexity within 2% of the fully materialised model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import numpy as np
import torch

from coordinator.prefetch import RoutingTrace, UserHistogram, route_counts
from model.config import ConfigError
from model.fractal_moe import FractalMoE
from model.merges import average_experts
from model.pipeline import Suite
from model.reliance import text_reliance, usage_shares, zeroed_experts
from model.staged import Answer, Miss, router_prior, staged_forward

from ..prefetch_sweep import interleave, windows

ALPHA = 64.0  # the user predictor's prior weight, in tokens


def _run(model: FractalMoE, ids: np.ndarray, available: torch.Tensor, bias: torch.Tensor | None
         ) -> tuple[float, np.ndarray]:
    """Summed NLL of ``ids`` (T,) and the routes (L, T-1) chosen, misses substituted within ``available``."""
    x = torch.as_tensor(ids, dtype=torch.long)
    with torch.no_grad():
        gen = staged_forward(model, x[:-1], available, router_bias=bias)
        try:
            step = next(gen)
            while isinstance(step, Miss):
                step = gen.send(Answer(available=available[step.block]))
        except StopIteration as stop:
            logits, wanted, served = stop.value
    lp = torch.log_softmax(logits.double(), -1).gather(1, x[1:, None])[:, 0]  # (T-1,)
    return -float(lp.sum()), wanted.numpy()


def user_usage(suite: Suite, model: FractalMoE, history: int) -> dict[str, torch.Tensor]:
    """Each known user's expert usage (L, E): the ``user`` predictor's histogram of the full model's routes
    over ``history`` windows of the user's training text, smoothed toward everyone's (alpha 64 tokens)."""
    cfg = model.cfg
    L, E = cfg.n_layers, cfg.n_experts
    full = torch.ones(L, E, dtype=torch.bool)
    hist = UserHistogram(n_layers=L, n_experts=E, alpha=ALPHA)
    for u in suite.known_users:
        for w in windows(suite.ids(u, "train"), cfg.context + 1, history):
            hist.observe(RoutingTrace(user=u, routes=_run(model, w, full, None)[1]))
    return {u: torch.as_tensor(hist.user_distribution(u), dtype=torch.float32) for u in suite.known_users}


def reliance(suite: Suite, *, betas: list[float], tokens: int, history: int) -> list[dict[str, Any]]:
    """Expert reliance (``model.reliance.text_reliance``) under each user's prior: per beta, the mean over
    known users of their first ``tokens`` held-out tokens, with ``beta * log usage`` added to every router
    (of the model and of its zeroed and averaged copies) by forward hooks."""
    model = suite.base().eval()
    sd = model.state_dict()
    zeroed, averaged = FractalMoE(model.cfg), FractalMoE(model.cfg)
    zeroed.load_state_dict(zeroed_experts(sd))
    averaged.load_state_dict(average_experts(sd))
    usage = user_usage(suite, model, history)
    rows = []
    for beta in betas:
        per_user = []
        for u, p in usage.items():
            bias = router_prior(p, beta)  # (L, E)
            hooks = [blk.moe.router.register_forward_hook(  # type: ignore[union-attr]
                lambda _m, _i, out, row=bias[b]: out + row)
                     for m in (model, zeroed.eval(), averaged.eval()) for b, blk in enumerate(m.blocks)]
            ids = torch.as_tensor(np.asarray(suite.ids(u, "eval")[:tokens]), dtype=torch.long)
            try:
                per_user.append(text_reliance(model, zeroed, averaged, ids, usage_shares(model, ids),
                                              drop_one_tokens=tokens))
            finally:
                for h in hooks:
                    h.remove()
        mean = {k: float(np.mean([r[k] for r in per_user])) for k in ("ppl", "zeroed_ratio", "averaged_ratio")}
        rows.append({"beta": beta, **mean, "users": len(per_user), "tokens": tokens,
                     "drop_one_median": float(np.mean([r["drop_one"]["median_ratio"] for r in per_user])),
                     "drop_one_max": float(np.mean([r["drop_one"]["max_ratio"] for r in per_user])),
                     "routing_entropy_bits": float(np.mean([np.mean(r["routing_entropy_bits"]) for r in per_user]))})
    return rows


def measure(suite: Suite, *, budget: int, betas: list[float], requests: int, history: int) -> dict[str, Any]:
    """The table: one row per beta (see the module docstring)."""
    model = suite.base().eval()
    cfg = model.cfg
    L, E = cfg.n_layers, cfg.n_experts
    T = cfg.context + 1
    users = list(suite.known_users)
    full = torch.ones(L, E, dtype=torch.bool)
    prior = {u: torch.log(p) for u, p in user_usage(suite, model, history).items()}  # (L, E)
    plan = {}
    for u in users:
        mask = torch.zeros(L, E, dtype=torch.bool)
        mask.scatter_(1, prior[u].argsort(dim=1, descending=True, stable=True)[:, :budget], True)
        plan[u] = mask
    per_user = {u: windows(suite.ids(u, "eval"), T, math.ceil(requests / len(users))) for u in users}
    pairs = interleave(per_user, requests)
    base_nll = sum(_run(model, w, full, None)[0] for _, w in pairs)
    tokens = sum(len(w) - 1 for _, w in pairs)
    rows = []
    for beta in betas:
        nll_all = nll_sub = 0.0
        hits = uses = 0
        distinct = []
        for u, w in pairs:
            bias = beta * prior[u] if beta else None
            nll, routes = _run(model, w, full, bias)
            nll_all += nll
            hits += int(plan[u].gather(1, torch.as_tensor(routes)).sum())
            uses += routes.size
            distinct.append(float((route_counts(routes, E) > 0).sum(axis=1).mean()))
            nll_sub += _run(model, w, plan[u], bias)[0]
        rows.append({"beta": beta, "hit_rate": hits / uses, "distinct_experts_per_block": float(np.mean(distinct)),
                     "ppl_ratio_all_experts": math.exp((nll_all - base_nll) / tokens),
                     "ppl_ratio_plan_substitute": math.exp((nll_sub - base_nll) / tokens)})
    return {"preset": suite.preset.name, "seed": suite.seed, "budget": budget, "experts": [L, E],
            "requests": len(pairs), "tokens": tokens, "users": len(users), "history_windows": history,
            "ppl_full": math.exp(base_nll / tokens), "gate": cfg.gate, "rows": rows,
            "goal": {"hit_rate": 0.95, "ppl_ratio": 1.02,
                     "met_by": [r["beta"] for r in rows if r["hit_rate"] >= 0.95
                                and r["ppl_ratio_plan_substitute"] <= 1.02]}}


def markdown(result: dict[str, Any]) -> str:
    """The table as markdown."""
    lines = [f"Per-user router priors at `{result['preset']}` (seed {result['seed']}, gate {result['gate']}): "
             f"{result['requests']} held-out requests ({result['tokens']} tokens) of {result['users']} users, plan = "
             f"the user's top {result['budget']} of {result['experts'][1]} experts per block; ppl of the "
             f"unmodified full model {result['ppl_full']:.3f}.", "",
             "| beta | hit rate | distinct experts / block / request | ppl / full, all experts | "
             "ppl / full, plan only (substitute) |", "| ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['beta']:g} | {r['hit_rate']:.3f} | {r['distinct_experts_per_block']:.1f} | "
                     f"{r['ppl_ratio_all_experts']:.4f} | {r['ppl_ratio_plan_substitute']:.4f} |")
    met = result["goal"]["met_by"]
    verdict = "met at beta " + ", ".join(map(str, met)) if met else "not met"
    lines += ["", f"Goal (hit rate >= 0.95, ppl within 2%): {verdict}."]
    if result.get("reliance"):
        lines += ["", "Expert reliance under the prior (mean over users; model.reliance):", "",
                  "| beta | ppl | zeroed experts | averaged experts | drop-one median | drop-one max | "
                  "routing entropy bits |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['beta']:g} | {r['ppl']:.2f} | x{r['zeroed_ratio']:.1f} | x{r['averaged_ratio']:.1f} | "
                  f"x{r['drop_one_median']:.4f} | x{r['drop_one_max']:.2f} | {r['routing_entropy_bits']:.2f} |"
                  for r in result["reliance"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m sim.prefetch_live.remedies", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=int, default=8, help="experts per block in the plan (default 8 of 16)")
    ap.add_argument("--betas", default="0,0.5,1,2,4", help="prior strengths, comma-separated")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--history", type=int, default=8, help="training windows per user the prior is counted on")
    ap.add_argument("--reliance-tokens", type=int, default=0,
                    help="also measure expert reliance under each beta on this many held-out tokens per user "
                         "(model.reliance; 0: off)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = ap.parse_args(argv)
    try:
        betas = [float(b) for b in args.betas.split(",")]
    except ValueError:
        print(f"--betas: not a comma-separated list of numbers: {args.betas!r}", file=sys.stderr)
        return 2
    if not 1 <= args.budget <= 16 or args.requests < 1 or args.history < 1 or any(b < 0 for b in betas) \
            or not 0 <= args.reliance_tokens <= 100_000 or args.reliance_tokens == 1:
        print("--budget must be 1..16, --requests and --history >= 1, betas >= 0, --reliance-tokens 0 or "
              "2..100000", file=sys.stderr)
        return 2
    try:
        suite = Suite(args.preset, args.seed, progress=False)
    except ConfigError as exc:
        print(f"--preset: {exc}", file=sys.stderr)
        return 2
    result = measure(suite, budget=args.budget, betas=betas, requests=args.requests, history=args.history)
    if args.reliance_tokens:
        result["reliance"] = reliance(suite, betas=betas, tokens=args.reliance_tokens, history=args.history)
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
