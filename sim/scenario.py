"""Scenario files (TOML): what a federation run looks like, validated, with command-line overrides.

A scenario has sections ``[federation]``, ``[model]``, ``[network]``, ``[workload]``,
``[prefetch]``, ``[faults]``, ``[heal]`` and ``[soup]``; every key has a default, so an empty file is a valid
scenario.
Unknown sections or keys, and values of the wrong type or range, are refused with a
:class:`ScenarioError` whose message names the key at fault (``workload.generate_tokens: ...``).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from model.codecs import CODECS
from model.config import MAX_BASE_STEPS


class ScenarioError(ValueError):
    """A scenario file or override is invalid; the message names the key at fault."""


def _fail(key: str, message: str) -> typing.NoReturn:
    raise ScenarioError(f"{key}: {message}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        _fail(key, message)


@typing.runtime_checkable
class _Validated(typing.Protocol):
    """A scenario section: checks its own values."""

    def validate(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class FederationSection:
    """How many nodes, on which Ray cluster, with which models."""

    nodes: int = 32
    preset: str = "small"
    seed: int = 0
    users_per_persona: int = 0  # 0: the preset's own number
    nodes_per_actor: int = 0  # nodes per Ray actor process; 0: packed by sim.actors.packing; 1: a process per node
    address: str = ""  # Ray cluster address; "" starts a local Ray
    # Characters of each --corpus user's own text its adapter trains on; 0: the preset's (a quarter
    # of its corpus_chars: 75,000 at small). The report says how many were used and scored.
    corpus_chars: int = 0

    def validate(self) -> None:
        """Raise ScenarioError on out-of-range values."""
        _check(1 <= self.nodes <= 4096, "federation.nodes", f"must be between 1 and 4096, got {self.nodes}")
        _check(self.preset in ("tiny", "small", "30m"), "federation.preset",
               f"must be one of tiny, small, 30m, got {self.preset!r}")
        _check(self.users_per_persona >= 0, "federation.users_per_persona", "must be >= 0")
        _check(self.nodes_per_actor >= 0, "federation.nodes_per_actor", "must be >= 0 (0: automatic)")
        _check(self.corpus_chars == 0 or 1000 <= self.corpus_chars <= 1_000_000_000, "federation.corpus_chars",
               f"must be 0 (the preset's) or between 1000 and 1000000000, got {self.corpus_chars}")


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """What is shipped: the codec of the experts and of the rest, and the specialist nodes."""

    expert_codec: str = "int8"
    other_codec: str = "fp16"
    # Personas whose specialist each gets a node of its own (for mixtures). ["auto"]: the four
    # synthetic personas, fewer when the federation is small (always leaving two base nodes).
    specialists: list[str] = field(default_factory=lambda: ["auto"])
    # Pretrain the tokenizer and the base on the --corpus users' training text too (needs --corpus).
    corpus_pretrain: bool = False
    # Steps of the base's pretraining; 0: the preset's (600 at small, sized for a cold run on 2 cores).
    base_steps: int = 0

    def validate(self) -> None:
        """Raise ScenarioError on out-of-range values."""
        for key in ("expert_codec", "other_codec"):
            codec = getattr(self, key)
            _check(codec in CODECS, f"model.{key}", f"unknown codec {codec!r}; choose one of {' '.join(CODECS)}")
        _check(len(set(self.specialists)) == len(self.specialists), "model.specialists", "has duplicates")
        _check(0 <= self.base_steps <= MAX_BASE_STEPS, "model.base_steps",
               f"must be 0 (the preset's) or between 1 and {MAX_BASE_STEPS}, got {self.base_steps}")
        _check("auto" not in self.specialists or self.specialists == ["auto"], "model.specialists",
               '"auto" stands alone')

    def resolved_specialists(self, nodes: int, reserved: int = 0) -> list[str]:
        """The specialist personas, with "auto" resolved for a federation of ``nodes`` nodes of
        which ``reserved`` are taken by other roles (soup nodes): auto leaves two base nodes."""
        if self.specialists == ["auto"]:
            return ["programmer", "novelist", "scientist", "journalist"][:max(0, min(4, nodes - 2 - reserved))]
        return list(self.specialists)


@dataclass(frozen=True, kw_only=True)
class NetworkSection:
    """Link profiles of the nodes and the coordinator's egress capacity."""

    default_link: str = "school-adsl"
    egress_mbps: float = 1000.0
    links: dict[str, str] = field(default_factory=dict)  # "0-7" or "3" -> profile name
    profiles: dict[str, dict] = field(default_factory=dict)  # custom profiles: name -> {down_mbps, up_mbps, rtt_ms}

    def validate(self) -> None:
        """Raise ScenarioError on out-of-range values."""
        _check(self.egress_mbps > 0, "network.egress_mbps", f"must be > 0, got {self.egress_mbps}")
        for rng in self.links:
            lo, _, hi = rng.partition("-")
            _check(lo.isdigit() and (not hi or hi.isdigit()), f"network.links.{rng}",
                   "keys are node indices like \"3\" or ranges like \"0-7\"")


@dataclass(frozen=True, kw_only=True)
class WorkloadSection:
    """What the users do once the federation is up."""

    score_requests_per_user: int = 1
    generate_requests_per_user: int = 1
    generate_tokens: int = 16
    score_chars: int = 1500  # characters of held-out text per scoring request
    unknown_users: bool = True
    mixture_requests: int = 1  # per training persona, over the specialist nodes
    mixture_modes: list[str] = field(default_factory=lambda: ["uniform", "posterior"])
    concurrency: int = 8

    def validate(self) -> None:
        """Raise ScenarioError on out-of-range values."""
        for k in ("score_requests_per_user", "generate_requests_per_user", "mixture_requests"):
            _check(getattr(self, k) >= 0, f"workload.{k}", "must be >= 0")
        _check(1 <= self.generate_tokens <= 512, "workload.generate_tokens", "must be between 1 and 512")
        _check(50 <= self.score_chars <= 100_000, "workload.score_chars", "must be between 50 and 100000")
        _check(1 <= self.concurrency <= 256, "workload.concurrency", "must be between 1 and 256")
        for m in self.mixture_modes:
            _check(m in ("uniform", "posterior"), "workload.mixture_modes", f"unknown mode {m!r}")


# Predictor names the sweep knows: coordinator.prefetch.PREDICTORS plus the sweep's own "hybrid"
# (tests/sim/test_prefetch_sweep.py keeps the two lists in step).
PREFETCH_PREDICTORS = ("random", "lru", "lfu", "global", "user", "run-ahead", "keyword", "next-block", "oracle",
                       "hybrid")


@dataclass(frozen=True, kw_only=True)
class PrefetchSection:
    """The prefetch sweep: predictors against expert budgets (off when ``budgets`` is empty)."""

    predictors: list[str] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)  # experts per block
    miss_policy: str = "substitute"
    warmup_tokens: int = 16  # the prompt: prefill tokens the run-ahead router (and keyword, next-block) see
    requests: int = 32  # held-out requests replayed per (predictor, budget), dealt round-robin over users
    request_tokens: int = 0  # tokens per request; 0: the preset's context length
    history_requests: int = 8  # per user, from their training text: what the predictors have seen before
    step_ms: float = 20.0  # compute per step (prefill, then each token), virtual milliseconds
    lead_s: float = 60.0  # how early predictors that plan ahead ship before a request, virtual seconds
    # live prefetching (issue 16): partial nodes fed by the coordinator's planner, one per policy x budget
    live: bool = False
    live_budgets: list[int] = field(default_factory=lambda: [4, 8])  # experts per block
    live_budget_bytes: list[int] = field(default_factory=list)  # expert payload bytes over all blocks
    live_policies: list[str] = field(default_factory=lambda: ["substitute", "wait", "remote", "auto"])
    live_predictor: str = "user"
    # router prior strengths of the partial nodes (each beta its own set of nodes; 0: no prior)
    live_prior_betas: list[float] = field(default_factory=lambda: [0.0])

    def validate(self) -> None:
        """Raise ScenarioError on out-of-range values."""
        live_predictors = ("global", "user", "lru", "lfu", "random")  # coordinator.prefetch_live.LIVE_PREDICTORS
        _check(self.live_predictor in live_predictors, "prefetch.live_predictor",
               f"must be one of {', '.join(live_predictors)} (the predictors that plan ahead), "
               f"got {self.live_predictor!r}")
        for b in self.live_budgets:
            _check(1 <= b <= 16, "prefetch.live_budgets", f"each budget is 1..16 experts per block, got {b}")
        for b in self.live_budget_bytes:
            _check(b >= 1, "prefetch.live_budget_bytes", f"each budget is a positive byte count, got {b}")
        for p in self.live_policies:
            _check(p in ("wait", "substitute", "remote", "auto"), "prefetch.live_policies",
                   f"unknown policy {p!r}; choose from wait, substitute, remote, auto")
        for beta in self.live_prior_betas:
            _check(isinstance(beta, (int, float)) and 0 <= beta <= 10, "prefetch.live_prior_betas",
                   f"each beta is a number between 0 and 10, got {beta!r}")
        _check(bool(self.live_prior_betas), "prefetch.live_prior_betas", "needs at least one beta (0: no prior)")
        _check(self.live_predictor in ("global", "user", "lfu") or not any(self.live_prior_betas),
               "prefetch.live_prior_betas", f"a router prior needs a predictor that estimates usage (global, user, "
                                            f"lfu), not {self.live_predictor!r}")
        for key in ("live_budgets", "live_budget_bytes", "live_policies", "live_prior_betas"):
            values = getattr(self, key)
            _check(len(set(values)) == len(values), f"prefetch.{key}", "has duplicates")
        _check(not self.live or (bool(self.live_budgets or self.live_budget_bytes) and bool(self.live_policies)),
               "prefetch.live", "needs at least one budget (live_budgets or live_budget_bytes) and one policy")
        for b in self.budgets:
            _check(1 <= b <= 16, "prefetch.budgets", f"each budget is 1..16 experts per block, got {b}")
        _check(len(set(self.budgets)) == len(self.budgets), "prefetch.budgets", "has duplicates")
        for p in self.predictors:
            _check(p in PREFETCH_PREDICTORS, "prefetch.predictors",
                   f"unknown predictor {p!r}; choose from {', '.join(PREFETCH_PREDICTORS)}")
        _check(len(set(self.predictors)) == len(self.predictors), "prefetch.predictors", "has duplicates")
        _check(not self.budgets or bool(self.predictors), "prefetch.predictors",
               "must name at least one predictor when budgets are given")
        _check(self.miss_policy in ("wait", "substitute", "remote", "auto"), "prefetch.miss_policy",
               f"must be wait, substitute, remote or auto, got {self.miss_policy!r}")
        _check(1 <= self.warmup_tokens <= 4096, "prefetch.warmup_tokens", "must be between 1 and 4096")
        _check(1 <= self.requests <= 100_000, "prefetch.requests", "must be between 1 and 100000")
        _check(self.request_tokens == 0 or self.request_tokens > self.warmup_tokens, "prefetch.request_tokens",
               f"must be 0 (the context length) or more than warmup_tokens = {self.warmup_tokens}")
        _check(self.history_requests >= 0, "prefetch.history_requests", "must be >= 0")
        _check(0 <= self.step_ms <= 60_000, "prefetch.step_ms", "must be between 0 and 60000")
        _check(0 < self.lead_s <= 86_400, "prefetch.lead_s", "must be > 0 and at most 86400 (a day)")


@dataclass(frozen=True, kw_only=True)
class FaultsSection:
    """Faults injected during the run (all off by default)."""

    kill_nodes: int = 0
    cut_stream_at: float = 0.0  # fraction of a bundle after which one stream is cut (0: never)
    corrupt_chunks: int = 0
    restart_coordinator: bool = False
    # kill -9 of node processes, one case after the other, each measured until the federation is back
    # at full strength (sim.faults.heal): "one" (the process of one node), "half" (of the nodes),
    # "model" (every node of the base model) or "model:NAME"; "lost-" before a case: the processes
    # cannot come back (ray.kill without restart), so the federation must start replacements.
    kill9: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Raise ScenarioError on out-of-range values."""
        _check(self.kill_nodes >= 0, "faults.kill_nodes", "must be >= 0")
        _check(0.0 <= self.cut_stream_at < 1.0, "faults.cut_stream_at", "must be in [0, 1)")
        _check(self.corrupt_chunks >= 0, "faults.corrupt_chunks", "must be >= 0")
        for i, case in enumerate(self.kill9):
            what = case.removeprefix("lost-")
            _check(what in ("one", "half", "model") or (what.startswith("model:") and len(what) > 6),
                   f"faults.kill9[{i}]", f"must be one, half, model or model:NAME (optionally lost-...), got {case!r}")


@dataclass(frozen=True, kw_only=True)
class HealSection:
    """Self-healing: Ray restarts node processes that die; the federation replaces nodes that stay down."""

    restarts: int = 3  # times Ray restarts a node actor's process (its nodes come back with their ids); 0: never
    # a planned node whose process Ray says is dead for good is replaced at once, one not healthy for this long
    # (its process restarted but the node does not get healthy) too; 0: never replace
    replace_after_s: float = 30.0

    def validate(self) -> None:
        """Raise ScenarioError on out-of-range values."""
        _check(-1 <= self.restarts <= 1000, "heal.restarts", f"must be -1 (always) or 0 to 1000, got {self.restarts}")
        _check(self.replace_after_s == 0 or 1 <= self.replace_after_s <= 3600, "heal.replace_after_s",
               f"must be 0 (never) or between 1 and 3600 seconds, got {self.replace_after_s}")


AUTO_SOUP_MIN_NODES = 16  # "auto" soup nodes only in federations this large


@dataclass(frozen=True, kw_only=True)
class SoupSection:
    """Soup-of-Experts nodes (seed 004): each holds the bank and instantiates, with no training, the
    specialist for the domain weights of a group of users, estimated on the node from their text."""

    nodes: int = -1  # -1: auto (2 in a federation of 16 nodes or more, else none); 0: none
    bank_size: int = 4
    rank: int = 0  # 0: dense bank entries; r > 0: low-rank U V^T entries of rank r
    support: int = 2  # personas per training mixture
    sample_chars: int = 2000  # characters of the target users' own (training) text the node estimates h from

    def validate(self) -> None:
        """Raise ScenarioError on out-of-range values."""
        _check(self.nodes >= -1, "soup.nodes", f"must be -1 (auto), 0 (none) or a count, got {self.nodes}")
        _check(1 <= self.bank_size <= 64, "soup.bank_size", f"must be between 1 and 64, got {self.bank_size}")
        _check(self.rank >= 0, "soup.rank", f"must be >= 0 (0 = dense), got {self.rank}")
        _check(1 <= self.support <= 5, "soup.support", f"must be between 1 and 5 (the training personas), "
               f"got {self.support}")
        _check(50 <= self.sample_chars <= 100_000, "soup.sample_chars", "must be between 50 and 100000")

    def resolved_nodes(self, nodes: int) -> int:
        """Soup nodes in a federation of ``nodes`` nodes, with -1 (auto) resolved."""
        if self.nodes == -1:
            return 2 if nodes >= AUTO_SOUP_MIN_NODES else 0
        return self.nodes


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """A whole scenario."""

    name: str = "default"
    description: str = ""
    federation: FederationSection = field(default_factory=FederationSection)
    model: ModelSection = field(default_factory=ModelSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    workload: WorkloadSection = field(default_factory=WorkloadSection)
    prefetch: PrefetchSection = field(default_factory=PrefetchSection)
    faults: FaultsSection = field(default_factory=FaultsSection)
    heal: HealSection = field(default_factory=HealSection)
    soup: SoupSection = field(default_factory=SoupSection)

    def validate(self) -> Scenario:
        """Validate every section; returns self."""
        for f in dataclasses.fields(self):
            sec = getattr(self, f.name)
            if isinstance(sec, _Validated):  # every section; not the name and description
                sec.validate()
        _check(self.faults.kill_nodes < self.federation.nodes, "faults.kill_nodes",
               "must leave at least one node alive")
        n_spec, n_soup = len(self.specialists()), self.soup_nodes()
        _check(n_spec < self.federation.nodes, "model.specialists",
               f"{n_spec} specialist nodes leave no base node among federation.nodes = {self.federation.nodes}")
        _check(n_spec + n_soup < self.federation.nodes, "soup.nodes",
               f"{n_soup} soup and {n_spec} specialist nodes leave no base node among "
               f"federation.nodes = {self.federation.nodes}")
        return self

    def specialists(self) -> list[str]:
        """The personas with a specialist node, "auto" resolved around the soup nodes."""
        return self.model.resolved_specialists(self.federation.nodes, self.soup_nodes())

    def soup_nodes(self) -> int:
        """The number of Soup-of-Experts nodes, "auto" resolved."""
        return self.soup.resolved_nodes(self.federation.nodes)

    def to_dict(self) -> dict:
        """The scenario as plain data (for the report)."""
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Scenario)}


def _coerce(key: str, value: object, tp: object) -> object:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            _fail(key, f"expected a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
        _check(ok, key, f"expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            _fail(key, f"expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, f"expected a table, got {value!r}")
        _, inner = typing.get_args(tp)
        return {k: _coerce(f"{key}.{k}", v, inner) for k, v in value.items()}
    if isinstance(tp, types.GenericAlias) or tp is dict:
        return value
    raise ScenarioError(f"{key}: unsupported type {tp}")


def parse_section(name: str, cls: type, data: object):
    """An instance of the dataclass ``cls`` from the TOML table ``data`` named ``name``: unknown keys and
    values of the wrong type are a ScenarioError naming the key (ranges are the section's own ``validate``)."""
    return _section(name, cls, data)


def _section(name: str, cls: type, data: object):
    if not isinstance(data, dict):
        _fail(name, "must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        _check(k in known, f"{name}.{k}", f"unknown key; known keys: {', '.join(sorted(known))}")
    return cls(**{k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in data.items()})


def from_dict(data: dict) -> Scenario:
    """A validated Scenario from parsed TOML."""
    hints = typing.get_type_hints(Scenario)
    kwargs: dict[str, typing.Any] = {}  # each value checked against its field's type by _coerce or _section
    for k, v in data.items():
        _check(k in hints, k, f"unknown section or key; known: {', '.join(sorted(hints))}")
        if k in ("name", "description"):
            kwargs[k] = _coerce(k, v, str)
        else:
            kwargs[k] = _section(k, hints[k], v)
    return Scenario(**kwargs).validate()


def read_toml(path: str | Path) -> dict:
    """A scenario file's parsed TOML, its ``name`` defaulting to the file's stem; a ScenarioError naming
    the file when it is missing or not TOML."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such scenario file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    data.setdefault("name", path.stem)
    return data


def load(path: str | Path) -> Scenario:
    """Read and validate a scenario file."""
    data = read_toml(path)
    if "sweep" in data:
        raise ScenarioError(f"{path}: has a [sweep] table: run it with python -m sim.sweep --scenario {path}")
    return from_dict(data)


def override(scn: Scenario, section: str, **values: object) -> Scenario:
    """A copy of ``scn`` with ``values`` replacing keys of ``section`` (None values are ignored)."""
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return scn
    sec = dataclasses.replace(getattr(scn, section), **values)
    return dataclasses.replace(scn, **{section: sec}).validate()
