"""The prefetch sweep: every predictor against every expert budget, on the federation's own model and users.

A scenario switches it on with a non-empty ``[prefetch] budgets`` (see scenarios/prefetch_sweep.toml);
`sim.run` then calls :func:`run_sweep` after the workload, on the live federation. For each predictor and
budget (experts per block, out of the model's 16) it replays the users' held-out requests through
``coordinator.prefetch.evaluate_prefetch``:

* the model is the federation's base (``fed.suite.base()``), which gives each request's true routing
  (the oracle's), the prompt's hidden states (next-block) and the substitution perplexity;
* expert sizes are the payload bytes of the codec the bundles actually ship (``model.expert_codec``);
* requests are windows of each known user's held-out text, dealt round-robin over users and served at
  the node that holds the user; the predictors' history is windows of the same users' training text;
* each node's link is the scenario's (``sim.network.assign_links``), idle (no contention between
  requests), with a fibre peer answering remote expert calls;
* the LRU and LFU caches are one per node (:class:`PerNode`), every other predictor one per row;
* perplexity under substitution is measured batched over a row's requests (:class:`QualityMeter`).

The report gains ``report["prefetch"]`` (rows: predictor, budget, hit_rate, bytes_shipped, ppl_ratio,
recall@k per block, bytes per token, stall, TTFT, ...; and ``goal``: the issue's target at half the
experts), the served transfers are appended to the run's events.jsonl, and :func:`write_plots` draws the
bandwidth/quality frontier.

Besides the predictors of ``coordinator.prefetch`` the sweep has ``hybrid`` (:class:`Hybrid`): the
user's histogram shipped ahead of the request, the run-ahead router's difference at request time.

The sweep lives in modules by job: ``inputs`` (expert sizes, request windows, node links), ``quality``
(substitution perplexity, batched), ``hybrid`` (the sweep's own predictor), ``rows`` (one row per
predictor and budget, the goal), ``run`` (the live federation's setup, the report section,
:func:`run_sweep`) and ``report`` (plots and markdown).
"""

from __future__ import annotations

from .hybrid import Hybrid, hybrid_events
from .inputs import REMOTE_PEER, SweepError, build_requests, expert_sizes, interleave, node_links, windows
from .quality import TOKENS_PER_PASS, QualityMeter, covers, masked_nll
from .report import markdown, write_plots
from .rows import (
                   GOAL_HIT_RATE,
                   GOAL_PPL_RATIO,
                   NODE_CACHES,
                   SOURCE,
                   PerNode,
                   SweepSetup,
                   goal,
                   make_predictor,
                   run_rows,
                   sweep_row,
)
from .run import LIVE_PART, run_sweep, setup_for, sweep_section, wanted

__all__ = ["LIVE_PART", "GOAL_HIT_RATE", "GOAL_PPL_RATIO", "NODE_CACHES", "REMOTE_PEER", "SOURCE", "TOKENS_PER_PASS",
           "Hybrid", "PerNode", "QualityMeter", "SweepError", "SweepSetup", "build_requests", "covers",
           "expert_sizes", "goal", "hybrid_events", "interleave", "make_predictor", "markdown", "masked_nll",
           "node_links", "run_rows", "run_sweep", "setup_for", "sweep_row", "sweep_section", "wanted", "windows",
           "write_plots"]
