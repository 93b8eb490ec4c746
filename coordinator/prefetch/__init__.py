"""Routing-aware expert prefetching: which experts a node should materialise first, and what a miss costs.

The wire format always describes all 16 experts of every block; the planner only chooses which to ship
first. The pieces, one module each:

    predictors   score experts for a request (global, user, run-ahead, keyword, next-block, random, LRU,
                 LFU, oracle) behind one ``Predictor`` interface; only routing statistics leave a node
    selection    the byte-budget knapsack: predicted use against real compressed sizes
    policies     serving a request with part of the experts: wait, substitute, remote, auto
    metrics      recall@k per block, hit rate with arrival times, bytes shipped and wasted per token
    quality      routing traces, run-ahead and substitution perplexity on a FractalMoE
    evaluate     replaying requests through all of the above into a report row

Imports ``model`` only (and numpy, torch): times come in as numbers or callables from the network model.
"""

from .evaluate import (
                       EvaluationError,
                       NodeLinks,
                       Request,
                       ServedRequest,
                       ServingConfig,
                       evaluate_prefetch,
                       idle_links,
                       plan,
                       served_events,
                       shipping_order,
)
from .metrics import MetricError, byte_metrics, hit_rate, recall_at_k, top_k_mask, used_mask
from .policies import POLICIES, PolicyError, RequestOutcome, link_time, remote_time, simulate_request, stream_arrivals
from .predictors import (
                       LFU,
                       LRU,
                       PREDICTORS,
                       GlobalFrequency,
                       Keyword,
                       NextBlockRouter,
                       Oracle,
                       Predictor,
                       PredictorError,
                       RandomPredictor,
                       RequestContext,
                       RoutingTrace,
                       RunAhead,
                       UserHistogram,
                       build_predictor,
                       route_counts,
                       visible_context,
                       visible_trace,
)
from .quality import (
                       PplComparison,
                       QualityError,
                       coarsen_segments,
                       route_trace,
                       router_weights,
                       segmented_substitution_ppl,
                       substitution_ppl,
)
from .selection import SelectionError, knapsack_dp, knapsack_greedy, select_experts

__all__ = [
    "EvaluationError", "NodeLinks", "Request", "ServedRequest", "ServingConfig", "evaluate_prefetch",
    "idle_links", "plan", "served_events", "shipping_order", "MetricError", "byte_metrics", "hit_rate", "recall_at_k",
    "top_k_mask", "used_mask",
    "POLICIES", "PolicyError", "RequestOutcome", "link_time", "remote_time", "simulate_request",
    "stream_arrivals", "LFU", "LRU", "PREDICTORS", "GlobalFrequency", "Keyword", "NextBlockRouter", "Oracle",
    "Predictor", "PredictorError", "RandomPredictor", "RequestContext", "RoutingTrace", "RunAhead",
    "UserHistogram", "build_predictor", "route_counts", "visible_context", "visible_trace", "PplComparison",
    "QualityError", "coarsen_segments", "route_trace", "router_weights", "segmented_substitution_ppl",
    "substitution_ppl", "SelectionError", "knapsack_dp",
    "knapsack_greedy", "select_experts",
]
