"""Live prefetching (issue 16): partial nodes in the running federation, fed by the coordinator's planner.

A scenario with ``[prefetch] live = true`` adds, after the workload, one partial node per (miss policy,
budget) on an actor of its own (``LocalFederation.extra_nodes``): each holds at most the budget's experts
of the base bundle, installed from byte ranges as the real coordinator's planner
(``coordinator.prefetch_live.LivePlanner``, installed as ``Core.prefetch_planner``) sends plans through
heartbeats, and serves misses live under its policy (``node.partial``). The users' held-out requests (the
prefetch sweep's windows, ``sim.prefetch_sweep.setup_for``) are scored on every partial node in turn and
on a fully materialised base node; after each request the node reports its routing and beats
(``NodeHost.heartbeat_now``), so the next plan has learnt from it.

``report["prefetch_live"]`` holds one row per (policy, budget): bytes by kind (expert weights planned and
fetched on demand, activations), hit rate, virtual stall seconds (the network model turns each on-demand
fetch and remote call into time: ``sim.network`` link profiles through ``coordinator.prefetch``'s
``idle_links``), perplexity against the fully materialised node on the same requests, experts held over
time, and beside it the offline sweep's prediction for the same predictor, budget and policy. Modules:
``run`` (the live part) and ``report`` (markdown, the bytes-against-quality plot).
"""

from __future__ import annotations

from .report import markdown, write_plots
from .run import KEY, LIVE_PART, live_section, run_live, stall_seconds, wanted

__all__ = ["KEY", "LIVE_PART", "live_section", "markdown", "run_live", "stall_seconds", "wanted", "write_plots"]
