"""Validation: the planner's prediction for the configuration of a real run, against what that run measured.

From a ``sim.run`` output folder the planner takes the run's *configuration* (its nodes, each node's
model, link and users; its workload) and the calibration quanta, and predicts:

* bytes by kind: a bundle per node of its model, adapters per user placed, control per node, and the
  bytes of each request kind times the number of requests the workload sends (counted from the
  scenario: own and base scoring per known user, unknown users, generations, mixtures);
* each node's virtual shipping time, by a star rollout of the planner's flow engine.

The run measured the bytes at its gRPC boundary and its shipping times with :mod:`sim.shipping`.
Bytes must match exactly, shipping times within ``tolerance``.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..network import assign_links
from . import calibration, rollout
from .config import PlanError
from .population import Population


def expected_requests(r: dict) -> dict[str, int]:
    """Requests of each kind that the run's workload sends, from its scenario and its users."""
    w = r["scenario"]["workload"]
    known = sum(len(n["users"]) for n in r["per_node"])
    unknown = len({u["user"] for u in r["quality"]["unknown"]}) if w["unknown_users"] else 0
    specialists = sorted({n["model"] for n in r["per_node"]} - {"base", "soup"})
    mixtures = len(specialists) * len(w["mixture_modes"]) * w["mixture_requests"] if len(specialists) >= 2 else 0
    return {"score": w["score_requests_per_user"] * (2 * known + unknown),
            "generate": w["generate_requests_per_user"] * known, "mixture": mixtures}


def predict(run_dir: str | Path) -> dict:
    """Prediction and measurement of the run in ``run_dir``, side by side (see the module docstring)."""
    run_dir = Path(run_dir)
    cal = calibration.from_run(run_dir)
    r = json.loads((run_dir / "report.json").read_text())
    nodes = r["per_node"]
    counts = expected_requests(r)
    bytes_pred: dict[str, Fraction] = {
        "BUNDLE": sum((cal.bundle[n["model"]].per_item for n in nodes if n["model"] in cal.bundle), Fraction(0)),
        "ADAPTER": cal.adapter.times(sum(len(n["users"]) for n in nodes)),
        "CONTROL": cal.control.times(len(nodes)),
    }
    for kind, bkind in calibration.BYTE_KIND_OF.items():
        if counts[kind]:
            bytes_pred[bkind] = (cal.request_sent[kind].per_item + cal.request_received[kind].per_item) * counts[kind]
    net = r["scenario"]["network"]
    links = assign_links(len(nodes), default=net["default_link"], ranges=net["links"], profiles=net["profiles"])
    profiles = list(dict.fromkeys(links))
    pop = Population(link_names=[str(i) for i in range(len(profiles))], links=profiles,
                     school_link=np.array([profiles.index(lk) for lk in links]), user_school=np.zeros(0, int),
                     user_persona=np.zeros(0, int), user_known=np.zeros(0, bool), persona_names=[])
    bundle = np.array([float(cal.bundle[n["model"]].per_item) if n["model"] in cal.bundle else 0.0 for n in nodes])
    adapters = np.array([len(n["users"]) * float(cal.adapter.per_item) for n in nodes])
    ro = rollout.star(pop, bundle, adapters, egress_bps=net["egress_mbps"] * 1e6)
    measured_s = np.array([n["virtual_seconds"] for n in nodes])
    rel = np.abs(ro.done_s - measured_s) / np.maximum(measured_s, 1e-12)
    measured = {k: v for k, v in r["bytes_by_kind"].items() if v}
    predicted = {k: (int(v) if v.denominator == 1 else float(v)) for k, v in bytes_pred.items() if v}
    return {"run": str(run_dir), "nodes": len(nodes), "requests_predicted": counts,
            "requests_measured": {k: v["n"] for k, v in r["requests"]["by_kind"].items()},
            "bytes_predicted": predicted, "bytes_measured": measured,
            "bytes_exact": predicted == measured,
            "shipping_predicted_s": [round(float(x), 6) for x in ro.done_s],
            "shipping_measured_s": measured_s.tolist(),
            "shipping_max_rel_error": float(rel.max()) if len(rel) else 0.0,
            "makespan_predicted_s": ro.makespan_s, "makespan_measured_s": r["virtual"]["shipping_makespan_s"]}


def check(result: dict, tolerance: float = 0.05) -> None:
    """PlanError naming the first figure that misses: bytes not exact, or shipping off by more than ``tolerance``."""
    for k in sorted(set(result["bytes_predicted"]) | set(result["bytes_measured"])):
        p, m = result["bytes_predicted"].get(k, 0), result["bytes_measured"].get(k, 0)
        if p != m:
            raise PlanError(f"validation: {k} bytes predicted {p}, measured {m}")
    if result["shipping_max_rel_error"] > tolerance:
        raise PlanError(f"validation: shipping times off by {100 * result['shipping_max_rel_error']:.2f}% "
                        f"(tolerance {100 * tolerance:g}%)")
