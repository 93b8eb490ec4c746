"""Plan scenarios (TOML): a population of schools and users, their workload, rollouts and adapter sync.

Every key has a default, so an empty file plans a small federation; unknown keys and values out of range
are refused with a :class:`PlanError` whose message names the key (``population.schools: must be ...``),
before anything is simulated. What the planner cannot invent (bytes of every kind and the nodes' compute
time) comes from a calibration run (:mod:`sim.plan.calibration`), named by ``calibration`` or
``--calibration``.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..network import NetworkError, resolve_link
from ..scenario import ScenarioError, parse_section, read_toml

MODES = ("star", "relay")
REQUEST_KINDS = ("score", "generate", "mixture")
# A school day: nothing at night, lessons from 8 to 16 with the busiest hour at 10, homework in the evening.
SCHOOL_DAY = [0, 0, 0, 0, 0, 0, 0.2, 0.5, 3, 6, 10, 8, 4, 6, 7, 5, 3, 2, 2, 3, 2.5, 1.2, 0.4, 0.1]


class PlanError(ValueError):
    """A plan scenario or its calibration is invalid; the message names the key at fault."""


def _need(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise PlanError(f"{key}: {message}")


def _finite(x: float) -> bool:
    return math.isfinite(x)


@dataclass(frozen=True, kw_only=True)
class PopulationSection:
    """Schools (one node each) with link profiles drawn from a mix, and users spread over them."""

    schools: int = 100
    users: int = 2000
    school_size_sigma: float = 0.6  # log-normal sigma of school sizes (users per school); 0: all equal
    unknown_share: float = 0.0  # users with no adapter yet: served by the base, outside the adapter share
    links: dict[str, float] = field(default_factory=lambda: {"school-adsl": 1.0})  # profile -> share of schools
    profiles: dict[str, dict] = field(default_factory=dict)  # custom link profiles, as sim.run's network.profiles

    def validate(self) -> None:
        """Raise PlanError on out-of-range values (link names are resolved too)."""
        _need(1 <= self.schools <= 100_000, "population.schools", f"must be between 1 and 100000, got {self.schools}")
        _need(self.schools <= self.users <= 10_000_000, "population.users",
              f"must be between population.schools ({self.schools}) and 10000000, got {self.users}")
        _need(_finite(self.school_size_sigma) and 0 <= self.school_size_sigma <= 3, "population.school_size_sigma",
              f"must be between 0 and 3, got {self.school_size_sigma}")
        _need(0 <= self.unknown_share < 1, "population.unknown_share", f"must be in [0, 1), got {self.unknown_share}")
        _need(bool(self.links), "population.links", "must name at least one link profile")
        for name, share in self.links.items():
            _need(_finite(share) and share >= 0, f"population.links.{name}", f"must be a share >= 0, got {share}")
            try:
                resolve_link(name, where=f"population.links.{name}", profiles=self.profiles)
            except NetworkError as exc:
                raise PlanError(f"population.links.{name}: {exc}") from None
        _need(sum(self.links.values()) > 0, "population.links", "shares must not all be 0")


@dataclass(frozen=True, kw_only=True)
class NetworkSection:
    """The coordinator's egress (shared by concurrent transfers, as in sim.network) and the time series' bins."""

    egress_mbps: float = 1000.0
    bin_s: float = 60.0  # width of the egress utilisation series' bins, virtual seconds

    def validate(self) -> None:
        """Raise PlanError on out-of-range values."""
        _need(_finite(self.egress_mbps) and 0 < self.egress_mbps <= 1e6, "network.egress_mbps",
              f"must be > 0 and <= 1000000, got {self.egress_mbps}")
        _need(_finite(self.bin_s) and 1 <= self.bin_s <= 3600, "network.bin_s", f"must be 1..3600 s, got {self.bin_s}")


@dataclass(frozen=True, kw_only=True)
class WorkloadSection:
    """When requests come: on which days of the week (0 = Monday, day 0 of the plan) and at which hours."""

    active_days: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    hourly: list[float] = field(default_factory=lambda: list(SCHOOL_DAY))  # relative weight of each hour
    peak_hours: int = 1  # the busiest hours of the profile, over which latency "at peak" is measured
    # Lessons: each school's users sit in classes of class_size; a burst_share of every user's requests come
    # in class bursts (the whole class asks within burst_window_s of one moment), the rest independently.
    burst_share: float = 0.0
    class_size: int = 25
    burst_window_s: float = 120.0

    def validate(self) -> None:
        """Raise PlanError on out-of-range values."""
        _need(all(0 <= d <= 6 for d in self.active_days), "workload.active_days", "days must be 0..6 (0 = Monday)")
        _need(len(set(self.active_days)) == len(self.active_days), "workload.active_days", "a day is listed twice")
        _need(len(self.hourly) == 24, "workload.hourly", f"must have 24 weights, got {len(self.hourly)}")
        _need(all(_finite(h) and h >= 0 for h in self.hourly) and sum(self.hourly) > 0, "workload.hourly",
              "weights must be >= 0 and not all 0")
        _need(1 <= self.peak_hours <= 24, "workload.peak_hours", f"must be 1..24, got {self.peak_hours}")
        _need(_finite(self.burst_share) and 0 <= self.burst_share <= 1, "workload.burst_share",
              f"must be in [0, 1], got {self.burst_share}")
        _need(1 <= self.class_size <= 1000, "workload.class_size", f"must be 1..1000, got {self.class_size}")
        _need(_finite(self.burst_window_s) and 0 < self.burst_window_s <= 3600, "workload.burst_window_s",
              f"must be > 0 and <= 3600 s, got {self.burst_window_s}")

    def peak(self) -> list[int]:
        """The ``peak_hours`` busiest hours of the day (ties to the earlier hour)."""
        order = sorted(range(24), key=lambda h: (-self.hourly[h], h))
        return sorted(order[:self.peak_hours])


@dataclass(frozen=True, kw_only=True)
class PersonaSection:
    """A kind of user: its share of users, requests per active day, and the mix of request kinds."""

    share: float = 1.0
    requests_per_day: float = 6.0
    kinds: dict[str, float] = field(default_factory=lambda: {"score": 0.7, "generate": 0.3})

    def validate(self, key: str) -> None:
        """Raise PlanError on out-of-range values; ``key`` names the persona's table."""
        _need(_finite(self.share) and self.share >= 0, f"{key}.share", f"must be >= 0, got {self.share}")
        _need(_finite(self.requests_per_day) and 0 <= self.requests_per_day <= 1000, f"{key}.requests_per_day",
              f"must be between 0 and 1000, got {self.requests_per_day}")
        _need(bool(self.kinds) and sum(self.kinds.values()) > 0, f"{key}.kinds", "must give some request kind a weight")
        for k, w in self.kinds.items():
            _need(k in REQUEST_KINDS, f"{key}.kinds.{k}",
                  f"unknown request kind; choose from {', '.join(REQUEST_KINDS)}")
            _need(_finite(w) and w >= 0, f"{key}.kinds.{k}", f"must be a weight >= 0, got {w}")


@dataclass(frozen=True, kw_only=True)
class RolloutSection:
    """Model rollouts: a new bundle (and the adapters that go with it) to every school, star or relay."""

    modes: list[str] = field(default_factory=lambda: list(MODES))
    model: str = "base"  # which bundle of the calibration run is rolled out
    every_days: int = 7
    first_at_h: float = 2.0  # virtual hour of day 0 when the first rollout starts
    star_streams: int = 0  # star: schools the coordinator serves at once; 0: all at once (as sim.run ships)
    relay_seeds: int = 64  # relay: schools the coordinator serves at once; the others fetch from peers
    relay_fanout: int = 2  # relay: uploads a school that holds the bundle serves at once
    relay_min_up_mbps: float = 4.0  # relay: schools with a slower uplink do not relay (ADSL's 0.8 takes minutes)

    def validate(self) -> None:
        """Raise PlanError on out-of-range values."""
        _need(bool(self.modes), "rollout.modes", f"must name at least one of {', '.join(MODES)}")
        for m in self.modes:
            _need(m in MODES, "rollout.modes", f"unknown mode {m!r}; choose from {', '.join(MODES)}")
        _need(len(set(self.modes)) == len(self.modes), "rollout.modes", "a mode is listed twice")
        _need(1 <= self.every_days <= 366, "rollout.every_days", f"must be 1..366, got {self.every_days}")
        _need(_finite(self.first_at_h) and 0 <= self.first_at_h < 24, "rollout.first_at_h",
              f"must be in [0, 24), got {self.first_at_h}")
        _need(self.star_streams >= 0, "rollout.star_streams", f"must be >= 0, got {self.star_streams}")
        _need(self.relay_seeds >= 1, "rollout.relay_seeds", f"must be >= 1, got {self.relay_seeds}")
        _need(1 <= self.relay_fanout <= 64, "rollout.relay_fanout", f"must be 1..64, got {self.relay_fanout}")
        _need(_finite(self.relay_min_up_mbps) and self.relay_min_up_mbps >= 0, "rollout.relay_min_up_mbps",
              f"must be >= 0, got {self.relay_min_up_mbps}")


@dataclass(frozen=True, kw_only=True)
class AdaptersSection:
    """Adapter sync: every user's adapter, refreshed at its school, is backed up to the coordinator."""

    sync_every_days: float = 1.0  # 0: never
    sync_at_h: float = 1.0

    def validate(self) -> None:
        """Raise PlanError on out-of-range values."""
        _need(_finite(self.sync_every_days) and 0 <= self.sync_every_days <= 366, "adapters.sync_every_days",
              f"must be 0..366 (0: never), got {self.sync_every_days}")
        _need(_finite(self.sync_at_h) and 0 <= self.sync_at_h < 24, "adapters.sync_at_h",
              f"must be in [0, 24), got {self.sync_at_h}")


@dataclass(frozen=True, kw_only=True)
class ServingSection:
    """How a school's node serves: one compute thread (FIFO), and when the coordinator routes elsewhere
    (a queue too long, or the node offline: ``outage_share`` of schools each day, for ``outage_h`` hours
    starting at an hour drawn from the daily profile)."""

    max_wait_s: float = 10.0  # a request that would queue longer at its adapter's node is served elsewhere
    compute_scale: float = 1.0  # a school's node time over the calibration machine's (1: as measured)
    outage_share: float = 0.0  # share of schools whose node is offline for outage_h hours of each active day
    outage_h: float = 2.0

    def validate(self) -> None:
        """Raise PlanError on out-of-range values."""
        _need(_finite(self.max_wait_s) and self.max_wait_s >= 0, "serving.max_wait_s",
              f"must be >= 0, got {self.max_wait_s}")
        _need(_finite(self.compute_scale) and 0 < self.compute_scale <= 1000, "serving.compute_scale",
              f"must be > 0 and <= 1000, got {self.compute_scale}")
        _need(_finite(self.outage_share) and 0 <= self.outage_share < 1, "serving.outage_share",
              f"must be in [0, 1), got {self.outage_share}")
        _need(_finite(self.outage_h) and 0 < self.outage_h <= 24, "serving.outage_h",
              f"must be > 0 and <= 24, got {self.outage_h}")


SECTIONS: dict[str, type] = {"population": PopulationSection, "network": NetworkSection,
                             "workload": WorkloadSection, "rollout": RolloutSection, "adapters": AdaptersSection,
                             "serving": ServingSection}


@dataclass(frozen=True, kw_only=True)
class PlanScenario:
    """A whole plan: the population, what it does for ``days`` virtual days, and the calibration it uses."""

    name: str = "plan"
    description: str = ""
    seed: int = 0
    days: int = 7
    preset: str = "small"  # the calibration run must be of this preset ...
    expert_codec: str = "int8"  # ... and ship experts in this codec
    calibration: str = ""  # a sim.run output folder (relative to the scenario file); --calibration overrides
    population: PopulationSection = field(default_factory=PopulationSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    workload: WorkloadSection = field(default_factory=WorkloadSection)
    personas: dict[str, PersonaSection] = field(default_factory=lambda: {
        "student": PersonaSection(share=0.9, requests_per_day=6.0),
        "teacher": PersonaSection(share=0.1, requests_per_day=12.0, kinds={"score": 0.5, "generate": 0.5})})
    rollout: RolloutSection = field(default_factory=RolloutSection)
    adapters: AdaptersSection = field(default_factory=AdaptersSection)
    serving: ServingSection = field(default_factory=ServingSection)

    def validate(self) -> PlanScenario:
        """Validate every section; returns self."""
        _need(0 <= self.seed < 2 ** 32, "seed", f"must be 0..2**32-1, got {self.seed}")
        _need(1 <= self.days <= 366, "days", f"must be 1..366, got {self.days}")
        _need(self.preset in ("tiny", "small", "30m"), "preset", f"must be tiny, small or 30m, got {self.preset!r}")
        for name in SECTIONS:
            getattr(self, name).validate()
        _need(bool(self.personas), "personas", "must define at least one persona")
        for name, p in self.personas.items():
            p.validate(f"personas.{name}")
        _need(sum(p.share for p in self.personas.values()) > 0, "personas", "shares must not all be 0")
        return self

    def to_dict(self) -> dict:
        """The scenario as plain data (for the report)."""
        return dataclasses.asdict(self)


def from_dict(data: dict, *, base_dir: Path | None = None) -> PlanScenario:
    """A validated PlanScenario from parsed TOML; ``calibration`` is resolved against ``base_dir``."""
    kwargs: dict[str, typing.Any] = {}
    scalars = {"name": str, "description": str, "seed": int, "days": int, "preset": str, "expert_codec": str,
               "calibration": str}
    known = sorted([*scalars, *SECTIONS, "personas"])
    try:
        for key, value in data.items():
            if key in scalars:
                tp = scalars[key]
                _need(isinstance(value, tp) and not isinstance(value, bool), key,
                      f"expected {tp.__name__}, got {value!r}")
                kwargs[key] = value
            elif key in SECTIONS:
                kwargs[key] = parse_section(key, SECTIONS[key], value)
            elif key == "personas":
                _need(isinstance(value, dict), "personas", "must be a table of persona tables")
                kwargs[key] = {n: parse_section(f"personas.{n}", PersonaSection, v) for n, v in value.items()}
            else:
                raise PlanError(f"{key}: unknown section or key; known: {', '.join(known)}")
    except ScenarioError as exc:
        raise PlanError(str(exc)) from None
    cal = kwargs.get("calibration", "")
    if cal and base_dir is not None and not Path(cal).is_absolute():
        kwargs["calibration"] = str((base_dir / cal).resolve())
    return PlanScenario(**kwargs).validate()


def load(path: str | Path, overrides: typing.Sequence[str] = ()) -> PlanScenario:
    """Read and validate a plan scenario file (its name defaults to the file's stem), with ``overrides``
    (``"rollout.relay_fanout=4"``, values in TOML) applied first."""
    try:
        data = read_toml(path)
    except ScenarioError as exc:
        raise PlanError(str(exc)) from None
    for item in overrides:
        apply_override(data, item)
    return from_dict(data, base_dir=Path(path).parent)


def apply_override(data: dict, item: str) -> None:
    """Set ``KEY=VALUE`` (KEY dotted, VALUE a TOML value: 4, 0.5, "fibre", [0, 1]) in parsed TOML ``data``."""
    key, eq, value = item.partition("=")
    parts = key.strip().split(".")
    if not eq or not all(parts):
        raise PlanError(f"--set {item!r}: expected KEY=VALUE, e.g. rollout.relay_fanout=4")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()  # a bare word is a string
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise PlanError(f"--set {item!r}: {p} is not a table")
    node[parts[-1]] = parsed
