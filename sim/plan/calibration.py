"""Calibration: what the planner takes from a real run of the federation, measured, never assumed.

A calibration is a ``sim.run`` output folder (its report.json). From it the planner takes:

* bytes of every kind as the coordinator counted them at its gRPC boundary, turned into quanta:
  a node's bundle fetch (per model), a user's adapters, a node's control traffic, and each request
  kind's bytes sent to the node and received from it (per request);
* the service time of each request kind: the wall latency of every request of the run (through the
  coordinator to a node and back, on loopback). Run the calibration with ``workload.concurrency = 1``
  (``scenarios/calibration.toml``) so that these are service times, not queues.

Quanta are exact fractions (total bytes over count), so a plan of the calibration run's own
configuration predicts its bytes exactly. ``python -m sim.plan calibrate`` produces a calibration run
(:func:`calibrate`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from .config import REQUEST_KINDS, PlanError

# Which byte kind each request kind of the workload moves (sim.workload's request kinds).
BYTE_KIND_OF = {"score": "SCORE", "generate": "GENERATE", "mixture": "MIXTURE"}
CALIBRATION_SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "calibration.toml"


@dataclass(frozen=True)
class Quantum:
    """``total`` bytes measured over ``count`` items: ``per_item`` exactly, ``times(n)`` for n items."""

    total: int
    count: int

    @property
    def per_item(self) -> Fraction:
        """Bytes per item, as an exact fraction (0 when nothing was counted)."""
        return Fraction(self.total, self.count) if self.count else Fraction(0)

    def times(self, n: int) -> Fraction:
        """Bytes of ``n`` items."""
        return self.per_item * n

    def as_dict(self) -> dict:
        """JSON-able: total, count and bytes per item."""
        return {"total": self.total, "count": self.count, "per_item": float(self.per_item)}


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Per-item bytes and service times measured by one sim.run (see the module docstring)."""

    source: str
    preset: str
    expert_codec: str
    nodes: int
    concurrency: int  # the run's workload.concurrency: 1 means latencies are service times
    bundle: dict[str, Quantum]  # model -> BUNDLE bytes of one node's fetch
    adapter: Quantum  # ADAPTER bytes per user placed on a node
    control: Quantum  # CONTROL bytes per node
    request_sent: dict[str, Quantum]  # request kind -> bytes coordinator -> node, per request
    request_received: dict[str, Quantum]  # request kind -> bytes node -> coordinator, per request
    service_s: dict[str, list[float]] = field(default_factory=dict)  # request kind -> measured seconds, sorted
    by_kind_measured: dict[str, int] = field(default_factory=dict)  # the run's own totals, for validation

    def service_samples(self, kind: str) -> np.ndarray:
        """The measured service times of ``kind`` (seconds), as an array."""
        return np.asarray(self.service_s[kind], dtype=float)

    def check(self, *, preset: str, expert_codec: str, model: str, kinds: set[str]) -> None:
        """PlanError unless this calibration measured what a plan of ``preset``/``expert_codec`` needs."""
        where = f"calibration {self.source}"
        if self.preset != preset:
            raise PlanError(f"preset: the plan is of {preset!r} but {where} ran {self.preset!r}")
        if self.expert_codec != expert_codec:
            raise PlanError(f"expert_codec: the plan ships {expert_codec!r} but {where} shipped {self.expert_codec!r}")
        if model not in self.bundle:
            raise PlanError(f"rollout.model: {where} shipped no {model!r} bundle (it has {', '.join(self.bundle)})")
        for k in sorted(kinds):
            if not self.service_s.get(k):
                raise PlanError(f"personas: request kind {k!r} was not measured by {where} "
                                f"(measured: {', '.join(sorted(self.service_s)) or 'none'})")

    def as_dict(self) -> dict:
        """JSON-able summary for the report."""
        return {"source": self.source, "preset": self.preset, "expert_codec": self.expert_codec, "nodes": self.nodes,
                "concurrency": self.concurrency,
                "bundle_bytes": {m: q.as_dict() for m, q in self.bundle.items()},
                "adapter_bytes_per_user": self.adapter.as_dict(), "control_bytes_per_node": self.control.as_dict(),
                "request_bytes": {k: {"sent": self.request_sent[k].as_dict(),
                                      "received": self.request_received[k].as_dict()} for k in self.request_sent},
                "service_s": {k: {"n": len(v), "p50": _pct(v, 50), "p99": _pct(v, 99), "mean": float(np.mean(v))}
                              for k, v in self.service_s.items() if v}}


def _pct(v: list[float], q: float) -> float:
    return float(np.percentile(v, q)) if v else math.nan


def _service_samples(requests: dict) -> dict[str, list[float]]:
    """Each request kind's measured seconds: every sample when the report has them, else a log-normal
    fitted to its p50 and p99 (reports written before samples were kept)."""
    out: dict[str, list[float]] = {}
    samples = requests.get("samples_s") or {}
    for kind, summary in requests.get("by_kind", {}).items():
        if kind not in REQUEST_KINDS or not summary.get("n"):
            continue
        if samples.get(kind):
            out[kind] = sorted(float(x) for x in samples[kind])
            continue
        p50, p99 = float(summary["p50_s"]), float(summary["p99_s"])
        mu, sigma = math.log(p50), max(0.0, math.log(max(p99, p50) / p50) / 2.326)
        qs = (np.arange(64) + 0.5) / 64  # 64 quantiles of the fitted log-normal
        from statistics import NormalDist
        out[kind] = [math.exp(mu + sigma * NormalDist().inv_cdf(float(q))) for q in qs]
    return out


def from_run(run_dir: str | Path) -> Calibration:
    """The calibration measured by the ``sim.run`` output folder ``run_dir``; PlanError when it is not one."""
    run_dir = Path(run_dir)
    path = run_dir / "report.json"
    try:
        r = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"calibration: {path} not found (give a sim.run output folder, or make one with "
                        "`python -m sim.plan calibrate`)") from None
    except json.JSONDecodeError as exc:
        raise PlanError(f"calibration: {path} is not JSON: {exc}") from None
    try:
        return _parse(r, str(run_dir))
    except (KeyError, TypeError) as exc:
        raise PlanError(f"calibration: {path} is not a sim.run report (missing {exc})") from None


def _parse(r: dict, source: str) -> Calibration:
    scn = r["scenario"]
    if any(n.get("model") == "soup" for n in r["per_node"]) or r.get("soup_of_experts"):
        raise PlanError(f"calibration: {source} has Soup-of-Experts nodes, whose requests mix byte kinds; "
                        "calibrate with soup.nodes = 0 (scenarios/calibration.toml)")
    bundle_tot: dict[str, list[int]] = {}
    users = control = 0
    for n in r["per_node"]:
        kinds = n["bytes_by_kind"]
        if kinds.get("BUNDLE"):
            bundle_tot.setdefault(n["model"], [0, 0])
            bundle_tot[n["model"]][0] += kinds["BUNDLE"]
            bundle_tot[n["model"]][1] += 1
        users += len(n["users"])
        control += kinds.get("CONTROL", 0)
    detail = r["bytes_detail"]
    requests = r["requests"]
    sent, received = {}, {}
    for kind, bkind in BYTE_KIND_OF.items():
        n = requests["by_kind"].get(kind, {}).get("n", 0)
        d = detail.get(bkind, {"sent": 0, "received": 0})
        sent[kind], received[kind] = Quantum(int(d["sent"]), n), Quantum(int(d["received"]), n)
    adapter = detail.get("ADAPTER", {"sent": 0, "received": 0})
    return Calibration(
        source=source, preset=scn["federation"]["preset"], expert_codec=scn["model"]["expert_codec"],
        nodes=int(r["nodes"]), concurrency=int(scn["workload"]["concurrency"]),
        bundle={m: Quantum(t, c) for m, (t, c) in bundle_tot.items()},
        adapter=Quantum(int(adapter["sent"]) + int(adapter["received"]), users),
        control=Quantum(control, int(r["nodes"])), request_sent=sent, request_received=received,
        service_s=_service_samples(requests), by_kind_measured={k: int(v) for k, v in r["bytes_by_kind"].items()})


def calibrate(out: str | Path, *, preset: str = "small", nodes: int = 32, seed: int = 0, codec: str = "int8",
              progress: bool = False, suite=None) -> Calibration:
    """Run the real federation (``sim.run`` with ``scenarios/calibration.toml``) into ``out`` and return
    its calibration. Trains or loads the preset's models ($FRACTAL_CACHE), unless ``suite`` (a
    ``model.pipeline.Suite`` of that preset and seed) is given."""
    import asyncio
    import os

    from ..console import noise_to
    from ..run import run_federation
    from ..scenario import load, override

    scn = load(CALIBRATION_SCENARIO)
    scn = override(scn, "federation", nodes=nodes, preset=preset, seed=seed)
    scn = override(scn, "model", expert_codec=codec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with noise_to(out / "stderr.log"):  # what Ray and gRPC print goes to the run's stderr.log, as sim.run's
        asyncio.run(run_federation(scn, out, progress=progress, suite=suite))
    return from_run(out)
