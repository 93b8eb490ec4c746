"""What every benchmark of `sim.bench` shares: its result, the sizes, and interleaved timing."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from model.config import PRESETS


class BenchError(ValueError):
    """A benchmark name or size that cannot be run."""


@dataclass
class BenchResult:
    """One benchmark's figure: ``value`` against ``baseline`` (same unit), ``ratio = value / baseline``."""

    name: str
    value: float
    baseline: float
    unit: str
    better: str  # "higher" or "lower": which way the ratio should move
    description: str
    target: float | None = None  # the target for the ratio, or for the value when target_on == "value"
    target_on: str = "ratio"
    detail: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """value / baseline (nan when the baseline is 0)."""
        return self.value / self.baseline if self.baseline else math.nan

    def met(self) -> bool | None:
        """Whether the target is met (None without a target)."""
        if self.target is None:
            return None
        x = self.ratio if self.target_on == "ratio" else self.value
        return x >= self.target if self.better == "higher" else x <= self.target

    def as_dict(self) -> dict:
        """JSON-able: name, value, baseline, ratio, unit, and the rest."""
        return {"name": self.name, "value": self.value, "baseline": self.baseline, "ratio": self.ratio,
                "unit": self.unit, "better": self.better, "target": self.target, "target_on": self.target_on,
                "target_met": self.met(), "description": self.description, "detail": self.detail}


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """Sizes of every benchmark (``quick()`` for the smoke test). Validated; BenchError names the field."""

    decode_shape: str = "30m"  # preset whose model shape the decode/ship bundles have (random weights)
    decode_codecs: tuple[str, ...] = ("int8", "ternary")
    chunk_size: int = 1024 * 1024  # the coordinator's default chunk size
    repeats: int = 5  # interleaved rounds of value and baseline; the median of each is kept
    ship_repeats: int = 20  # rounds of the shipping benchmarks (a 30m bundle crosses loopback in ~50 ms)
    preset: str = "small"  # trained preset of the federation benchmarks
    nodes: int = 32  # federation size of startup / memory / score / mixture
    nodes_per_actor: int = 8  # packing of the measured federation
    baseline_nodes_per_actor: int = 1  # packing of the start-up baseline (1: one actor per node)
    packings: tuple[int, ...] = (1, 4, 8, 16)  # nodes per actor of the packing sweep (with the automatic one)
    packing_rounds: int = 2  # rounds of the packing sweep (a 32-actor start-up takes minutes here)
    score_requests: int = 12
    score_chars: int = 1500
    mixture_requests: int = 6
    scaling_presets: tuple[str, ...] = ("tiny", "small")  # presets of the scaling sweep
    scaling_nodes: tuple[int, ...] = (32, 128, 512, 1024)  # federation sizes of the scaling sweep
    scaling_min_free_gib: float = 3.0  # a scaling run is stopped when the machine has less available
    scaling_plot: str = ""  # where the scaling sweep draws its figure ("": nowhere)
    scaling_lock: str = ""  # a file each scaling run holds a flock on while it runs ("": none)
    scaling_warmup: bool = True  # an unreported run of each preset first (models and disk cache warm)
    plan_scenario: str = "scenarios/target_215k.toml"  # plan of the `plan` benchmark; "": a 200-school cut of it
    des_requests: int = 200_000  # requests of the des_loop benchmark (a school day's FIFO queues)
    seed: int = 0
    sweep_codecs: tuple[str, ...] = ("int8", "ternary")  # the points of the sweep benchmark

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise BenchError(f"{key}: {msg}")
        for key in ("decode_shape", "preset"):
            need(getattr(self, key) in PRESETS, key, f"must be one of {', '.join(PRESETS)}, got {getattr(self, key)!r}")
        need(bool(self.decode_codecs), "decode_codecs", "must name at least one codec")
        need(len(self.sweep_codecs) >= 2 and len(set(self.sweep_codecs)) == len(self.sweep_codecs), "sweep_codecs",
             f"must name at least two distinct codecs, got {self.sweep_codecs}")
        need(4096 <= self.chunk_size <= 4 * 1024 * 1024, "chunk_size", f"must be 4 KiB..4 MiB, got {self.chunk_size}")
        for key in ("repeats", "ship_repeats", "score_requests", "mixture_requests", "nodes_per_actor",
                    "baseline_nodes_per_actor", "packing_rounds"):
            need(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        need(bool(self.packings) and min(self.packings) >= 1, "packings", f"must be >= 1 each, got {self.packings}")
        need(bool(self.scaling_presets) and all(p in PRESETS for p in self.scaling_presets), "scaling_presets",
             f"must name presets among {', '.join(PRESETS)}, got {self.scaling_presets}")
        need(bool(self.scaling_nodes) and all(4 <= n <= 4096 for n in self.scaling_nodes), "scaling_nodes",
             f"must be 4..4096 each, got {self.scaling_nodes}")
        need(self.scaling_min_free_gib >= 0, "scaling_min_free_gib", f"must be >= 0, got {self.scaling_min_free_gib}")
        need(4 <= self.nodes <= 4096, "nodes", f"must be 4..4096 (two specialists and two base nodes at least), "
                                               f"got {self.nodes}")
        need(50 <= self.score_chars <= 30_000, "score_chars", f"must be 50..30000, got {self.score_chars}")
        need(100 <= self.des_requests <= 10_000_000, "des_requests", f"must be 100..10000000, got {self.des_requests}")

    @staticmethod
    def quick() -> BenchConfig:
        """Sizes small enough for the test suite: tiny shapes, 4 nodes, few rounds.

        The start-up baseline packs all 4 nodes into one actor: Ray actors are what costs time here
        (one actor per node is the full run's baseline).
        """
        return BenchConfig(decode_shape="tiny", decode_codecs=("int8",), repeats=2, ship_repeats=2, preset="tiny",
                           nodes=4, nodes_per_actor=2, baseline_nodes_per_actor=4, score_requests=3, score_chars=400,
                           mixture_requests=2, packings=(2,), packing_rounds=1, scaling_presets=("tiny",),
                           scaling_nodes=(4, 8), plan_scenario="", des_requests=3000)


def median_of(rounds: int, *fns: Callable[[], float]) -> list[float]:
    """Run each timing function ``rounds`` times, interleaved (a load spike hits all alike); the median each.

    The median, not the best: on a shared machine the best round is the luckiest one, and a ratio of
    two best rounds compares two lucky draws; the median of interleaved rounds is what a run sees.
    """
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            times[i].append(fn())
    return [statistics.median(t) for t in times]


async def amedian_of(rounds: int, *fns) -> list[float]:
    """``median_of`` for coroutine functions returning seconds."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            times[i].append(await fn())
    return [statistics.median(t) for t in times]
