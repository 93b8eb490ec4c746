"""The network model: link profiles, a deterministic virtual clock and a transfer simulator.

Bytes are measured for real at the gRPC boundary; *time* on a slow link is simulated here. Each node has a
link profile (down and up bandwidth, round-trip time to the internet core); the coordinator sits in the core
(zero RTT of its own) behind an egress capacity shared by every concurrent transfer it serves.

The transfer model, chosen to be simple enough to check by hand:

* A transfer first costs one round trip of its path (request out, first byte back) and only then starts to
  move data. The path RTT is the sum of the endpoints' RTTs (the coordinator's is 0), so node-to-node traffic
  pays both nodes' RTTs. A transfer chained ``after`` another on the same stream skips the round trip.
* Active transfers share bandwidth max-min fairly (processor sharing with water-filling): every transfer is
  limited by its source's upload (the coordinator's egress, or a node's ``up_bps``) and its destination's
  download (a node's ``down_bps``, or the coordinator's ingress if one is set), and all transfers through a
  saturated resource get equal shares of it.
* No TCP slow start, no loss, no per-message overhead: virtual times are lower bounds of a real link's.

Units: bandwidths in bits per second (as ISPs quote them), sizes in bytes, times in virtual seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

COORDINATOR = "coordinator"
# Relative tolerance under which a flow counts as drained or a resource as saturated (float rounding).
_EPS = 1e-12


class NetworkError(ValueError):
    """A link profile, a transfer or a clock operation is invalid."""


def _check_rate(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise NetworkError(f"{name} must be a finite number > 0 (bits per second), got {value!r}")


@dataclass(frozen=True, kw_only=True)
class LinkProfile:
    """A node's access link: download and upload bandwidth (bits/s) and round-trip time (s) to the core."""

    down_bps: float
    up_bps: float
    rtt_s: float

    def __post_init__(self) -> None:
        _check_rate("down_bps", self.down_bps)
        _check_rate("up_bps", self.up_bps)
        if (isinstance(self.rtt_s, bool) or not isinstance(self.rtt_s, (int, float))
                or not math.isfinite(self.rtt_s) or self.rtt_s < 0):
            raise NetworkError(f"rtt_s must be a finite number >= 0 (seconds), got {self.rtt_s!r}")

    def download_s(self, nbytes: int) -> float:
        """Virtual seconds to download ``nbytes`` alone on this link (one RTT, then the data)."""
        return self.rtt_s + 8 * nbytes / self.down_bps

    def upload_s(self, nbytes: int) -> float:
        """Virtual seconds to upload ``nbytes`` alone on this link (one RTT, then the data)."""
        return self.rtt_s + 8 * nbytes / self.up_bps


MBIT = 1_000_000

LINK_PRESETS: dict[str, LinkProfile] = {
    # A rural school on ADSL2+: far from the exchange, sync rates of ~8 Mbit/s down and 0.8 up are typical
    # (ITU-T G.992.5 peaks at 24/1 Mbit/s next to the exchange); interleaving puts RTT near 60 ms.
    "school-adsl": LinkProfile(down_bps=8 * MBIT, up_bps=0.8 * MBIT, rtt_s=0.060),
    # 4G/LTE as measured in the field rather than advertised: ~20 Mbit/s down, ~8 up, ~50 ms RTT
    # (order of the national medians that crowd-sourced speed tests such as Ookla and Opensignal publish).
    "4g": LinkProfile(down_bps=20 * MBIT, up_bps=8 * MBIT, rtt_s=0.050),
    # Fibre to the premises on a common residential tier: 300 Mbit/s down, 100 up, ~10 ms RTT.
    "fibre": LinkProfile(down_bps=300 * MBIT, up_bps=100 * MBIT, rtt_s=0.010),
    # Geostationary satellite broadband: ~25 Mbit/s down, 3 up; the 36,000 km orbit alone costs ~480 ms
    # round trip, ~600 ms once ground segments and queueing are added.
    "satellite": LinkProfile(down_bps=25 * MBIT, up_bps=3 * MBIT, rtt_s=0.600),
    # Everything on one machine: 10 Gbit/s each way and no latency worth simulating.
    "loopback": LinkProfile(down_bps=10_000 * MBIT, up_bps=10_000 * MBIT, rtt_s=0.0),
}

_LINK_KEYS = tuple(f.name for f in dataclasses.fields(LinkProfile))
# Friendlier spellings a scenario may use instead: key -> (field, factor to the field's unit)
_LINK_UNITS = {"down_mbps": ("down_bps", MBIT), "up_mbps": ("up_bps", MBIT), "rtt_ms": ("rtt_s", 1e-3)}


def get_link(name: str) -> LinkProfile:
    """The named link preset; a NetworkError naming the choices otherwise."""
    try:
        return LINK_PRESETS[name]
    except KeyError:
        raise NetworkError(f"unknown link preset {name!r}; choose one of {', '.join(LINK_PRESETS)}") from None


def link_from_dict(spec: Mapping[str, Any], *, where: str = "link") -> LinkProfile:
    """A link profile from a scenario table, optionally over a ``preset`` whose values it overrides.

    Keys: ``down_bps``, ``up_bps``, ``rtt_s``, or the same in ``down_mbps``, ``up_mbps``, ``rtt_ms``.
    ``{"preset": "4g", "rtt_ms": 200}`` is 4G with a longer RTT; without ``preset`` all three are required.
    ``where`` names the table in error messages (e.g. ``"network.profiles.village"``).
    """
    if not isinstance(spec, Mapping):
        raise NetworkError(f"{where}: expected a table of {', '.join(_LINK_KEYS)}, got {type(spec).__name__}")
    known = {"preset", *_LINK_KEYS, *_LINK_UNITS}
    unknown = sorted(k for k in spec if k not in known)
    if unknown:
        raise NetworkError(f"{where}: unknown key {unknown[0]!r}; expected preset, {', '.join(_LINK_KEYS)} "
                           f"(or {', '.join(_LINK_UNITS)})")
    values: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "preset":
            continue
        field_name, factor = _LINK_UNITS.get(key, (key, 1))
        if field_name in values:
            raise NetworkError(f"{where}: {key!r} sets {field_name} a second time")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise NetworkError(f"{where}.{key}: expected a number, got {value!r}")
        values[field_name] = value * factor
    if "preset" in spec:
        if not isinstance(spec["preset"], str):
            raise NetworkError(f"{where}.preset: expected a preset name, got {spec['preset']!r}")
        values = {**dataclasses.asdict(get_link(spec["preset"])), **values}
    missing = [k for k in _LINK_KEYS if k not in values]
    if missing:
        raise NetworkError(f"{where}: missing key {missing[0]!r} (or give a preset)")
    try:
        return LinkProfile(**values)
    except NetworkError as e:
        raise NetworkError(f"{where}: {e}") from None


def resolve_link(spec: str | Mapping[str, Any] | LinkProfile, *, where: str = "link",
                 profiles: Mapping[str, Mapping[str, Any]] | None = None) -> LinkProfile:
    """A LinkProfile from a name (a custom profile in ``profiles``, else a preset), a table, or a LinkProfile."""
    if isinstance(spec, LinkProfile):
        return spec
    if isinstance(spec, str):
        if profiles and spec in profiles:
            return link_from_dict(profiles[spec], where=f"profiles.{spec}")
        return get_link(spec)
    return link_from_dict(spec, where=where)


def link_names(n_nodes: int, *, default: str, ranges: Mapping[str, str] | None = None) -> list[str]:
    """Each node's link profile name, by index: ``default`` unless a ``ranges`` key ("3" or "0-7",
    inclusive) names another; later ranges win where ranges overlap."""
    names = [default] * n_nodes
    for key, name in (ranges or {}).items():
        lo, dash, hi = key.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise NetworkError(f"links.{key}: expected a node index like \"3\" or a range like \"0-7\"")
        first, last = int(lo), int(hi) if dash else int(lo)
        if not first <= last < n_nodes:
            raise NetworkError(f"links.{key}: nodes {first}..{last} are not all among the {n_nodes} nodes")
        names[first:last + 1] = [name] * (last - first + 1)
    return names


def assign_links(n_nodes: int, *, default: str, ranges: Mapping[str, str] | None = None,
                 profiles: Mapping[str, Mapping[str, Any]] | None = None) -> list[LinkProfile]:
    """Each node's link, by index (:func:`link_names`), resolved: names are custom ``profiles``
    (tables for ``link_from_dict``) or presets. Every name given is resolved, used or not."""
    names = link_names(n_nodes, default=default, ranges=ranges)
    where = {**{name: f"links.{key}" for key, name in (ranges or {}).items()}, default: "default"}
    resolved = {name: resolve_link(name, where=where[name], profiles=profiles)
                for name in dict.fromkeys([default, *(ranges or {}).values()])}
    return [resolved[name] for name in names]


class VirtualClock:
    """Simulated seconds, which only move forward and only when told to; independent of wall time."""

    def __init__(self, start_s: float = 0.0) -> None:
        if not math.isfinite(start_s):
            raise NetworkError(f"clock start must be finite, got {start_s!r}")
        self._now = float(start_s)

    @property
    def now(self) -> float:
        """The current virtual time in seconds."""
        return self._now

    def advance_to(self, t: float) -> None:
        """Move to virtual time ``t``; moving backwards is a NetworkError."""
        if not t >= self._now:
            raise NetworkError(f"virtual clock cannot go back from {self._now!r} to {t!r}")
        self._now = float(t)

    def advance(self, dt: float) -> None:
        """Move forward by ``dt`` >= 0 seconds."""
        self.advance_to(self._now + dt)


@dataclass(frozen=True, kw_only=True)
class TransferRecord:
    """A finished transfer: what moved, between whom, and when (virtual seconds)."""

    id: int
    kind: str
    src: str
    dst: str
    bytes: int
    start: float  # when it was requested
    first_byte: float  # when its data started to flow (start + path RTT, or its predecessor's end)
    end: float  # when its last byte arrived
    meta: Mapping[str, Any]

    @property
    def node(self) -> str:
        """The node end of the transfer (the destination for node-to-node traffic)."""
        return self.src if self.dst == COORDINATOR else self.dst

    def as_event(self) -> dict[str, Any]:
        """The events.jsonl line for this transfer: kind, node, bytes, start, end and the rest."""
        return {"kind": self.kind, "node": self.node, "bytes": self.bytes, "start": self.start, "end": self.end,
                "src": self.src, "dst": self.dst, "first_byte": self.first_byte, "id": self.id, **self.meta}


@dataclass(kw_only=True)
class _Flow:
    id: int
    kind: str
    src: str
    dst: str
    nbytes: int
    submit_s: float
    rtt_s: float
    after: int | None
    resources: tuple[str, ...]
    meta: dict[str, Any]
    active_s: float | None = None  # None until its predecessor (if any) has finished
    remaining_bits: float = 0.0


_RESERVED = frozenset({"kind", "node", "bytes", "start", "end", "src", "dst", "first_byte", "id"})


def max_min_rates(demands: Mapping[int, tuple[str, ...]], capacity: Mapping[str, float],
                  weights: Mapping[int, int] | None = None) -> dict[int, float]:
    """Max-min fair rates by water-filling: each flow (id -> resources it crosses) gets bits/s.

    All unfrozen flows grow at the same pace until a resource saturates; the flows crossing it freeze.
    ``weights`` (default 1 each): a flow of weight w stands for w identical flows, each getting the rate
    returned (so a resource crossed only by it needs w times one flow's capacity); sim.plan groups
    identical transfers of many schools this way.
    """
    weight = weights or {}
    rates = dict.fromkeys(demands, 0.0)
    left = dict(capacity)
    unfrozen = set(demands)
    while unfrozen:
        users: dict[str, int] = {}
        for f in unfrozen:
            for r in demands[f]:
                users[r] = users.get(r, 0) + weight.get(f, 1)
        step = min(left[r] / n for r, n in users.items())
        for f in unfrozen:
            rates[f] += step
        for r, n in users.items():
            left[r] -= step * n
        full = {r for r in users if left[r] <= _EPS * capacity[r]}
        unfrozen = {f for f in unfrozen if not full.intersection(demands[f])}
    return rates


class TransferSimulator:
    """Turns transfers of measured bytes into virtual start/end times on a shared, deterministic network.

    Submit transfers (at or after the clock's ``now``), then ``advance_to``, ``wait`` or ``run``. Every finished
    transfer is appended to ``events`` (dicts for events.jsonl) in order of completion. The same submissions
    in the same order always give the same times.
    """

    def __init__(self, links: Mapping[str, LinkProfile], *, egress_bps: float, ingress_bps: float | None = None,
                 clock: VirtualClock | None = None) -> None:
        _check_rate("egress_bps", egress_bps)
        if ingress_bps is not None:
            _check_rate("ingress_bps", ingress_bps)
        if COORDINATOR in links:
            raise NetworkError(f"{COORDINATOR!r} is the coordinator, not a node name")
        self.links = dict(links)
        self.egress_bps = float(egress_bps)
        self.ingress_bps = None if ingress_bps is None else float(ingress_bps)
        self.clock = clock or VirtualClock()
        self.events: list[dict[str, Any]] = []
        self._flows: dict[int, _Flow] = {}  # submitted and not yet finished
        self._done: dict[int, TransferRecord] = {}
        self._next_id = 0

    def add_node(self, name: str, link: LinkProfile) -> None:
        """Register (or replace) a node's link profile."""
        if name == COORDINATOR:
            raise NetworkError(f"{COORDINATOR!r} is the coordinator, not a node name")
        self.links[name] = link

    def _link(self, node: str) -> LinkProfile:
        try:
            return self.links[node]
        except KeyError:
            raise NetworkError(f"unknown node {node!r}: it has no link profile") from None

    def _capacity(self, resource: str) -> float:
        if resource == "egress":
            return self.egress_bps
        if resource == "ingress":
            assert self.ingress_bps is not None
            return self.ingress_bps
        node, _, way = resource.rpartition(":")
        return self._link(node).up_bps if way == "up" else self._link(node).down_bps

    def _resources(self, src: str, dst: str) -> tuple[str, ...]:
        if src == dst:
            raise NetworkError(f"a transfer needs two different endpoints, got {src!r} twice")
        out = "egress" if src == COORDINATOR else f"{src}:up"
        if dst == COORDINATOR:
            return (out,) if self.ingress_bps is None else (out, "ingress")
        return (out, f"{dst}:down")

    def path_rtt(self, src: str, dst: str) -> float:
        """Round trip between two endpoints: the sum of their RTTs to the core (the coordinator's is 0)."""
        return sum(0.0 if n == COORDINATOR else self._link(n).rtt_s for n in (src, dst))

    def submit(self, *, kind: str, src: str, dst: str, nbytes: int, at: float | None = None,
               after: int | None = None, meta: Mapping[str, Any] | None = None) -> int:
        """Queue a transfer of ``nbytes`` from ``src`` to ``dst`` (node names or COORDINATOR); returns its id.

        ``at`` (default: now) is when it is requested. ``after`` chains it behind an earlier transfer on the
        same stream: its data starts once that one has ended and it has been requested, with no round trip.
        ``meta`` (JSON values, e.g. ``{"block": 1, "expert": 7}``) is copied into its event.
        """
        at = self.clock.now if at is None else float(at)
        if not at >= self.clock.now:
            raise NetworkError(f"transfer requested at {at!r}, before the clock's now {self.clock.now!r}")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise NetworkError(f"nbytes must be an int >= 0, got {nbytes!r}")
        if after is not None and after not in self._flows and after not in self._done:
            raise NetworkError(f"after={after}: no such transfer")
        clash = _RESERVED.intersection(meta or {})
        if clash:
            raise NetworkError(f"meta key {sorted(clash)[0]!r} is reserved for the event's own fields")
        resources = self._resources(src, dst)
        fid = self._next_id
        self._next_id += 1
        flow = _Flow(id=fid, kind=kind, src=src, dst=dst, nbytes=nbytes, submit_s=at,
                     rtt_s=self.path_rtt(src, dst), after=after, resources=resources,
                     meta=dict(meta or {}), remaining_bits=8.0 * nbytes)
        if after is None:
            flow.active_s = at + flow.rtt_s
        elif after in self._done:
            flow.active_s = max(at, self._done[after].end)
        self._flows[fid] = flow
        return fid

    def _finish(self, flow: _Flow, t: float) -> None:
        del self._flows[flow.id]
        assert flow.active_s is not None  # only active flows move bytes, so only they finish
        rec = TransferRecord(id=flow.id, kind=flow.kind, src=flow.src, dst=flow.dst, bytes=flow.nbytes,
                             start=flow.submit_s, first_byte=flow.active_s, end=t, meta=flow.meta)
        self._done[flow.id] = rec
        self.events.append(rec.as_event())
        for f in self._flows.values():
            if f.after == flow.id and f.active_s is None:
                # same stream: its data follows on as soon as it has been requested, with no round trip
                f.active_s = max(t, f.submit_s)

    def _active(self) -> list[_Flow]:
        now = self.clock.now
        return sorted((f for f in self._flows.values() if f.active_s is not None and f.active_s <= now),
                      key=lambda f: f.id)

    def _step(self, horizon: float) -> bool:
        """Run to the next event (a flow starts or ends) if it is no later than ``horizon``.

        Returns False, having moved the flows on to ``horizon``, when no event comes before it.
        """
        now = self.clock.now
        drained = [f for f in self._active() if f.remaining_bits <= 0]
        if drained:  # zero-byte transfers, and those that drained in the previous step
            for f in drained:
                self._finish(f, now)
            return True
        active = self._active()
        rates = max_min_rates({f.id: f.resources for f in active},
                              {r: self._capacity(r) for f in active for r in f.resources})
        finish = {f.id: now + f.remaining_bits / rates[f.id] for f in active}
        pending = [f.active_s for f in self._flows.values() if f.active_s is not None and f.active_s > now]
        t_next = min([*pending, *finish.values()], default=math.inf)
        event = t_next <= horizon
        if not event:
            t_next = horizon
            if not t_next > now:
                return False
        for f in active:
            if event and finish[f.id] - t_next <= _EPS * max(1.0, abs(t_next)):
                f.remaining_bits = 0.0  # it ends at this event: no float residue left behind
            else:
                f.remaining_bits -= rates[f.id] * (t_next - now)
        self.clock.advance_to(t_next)
        return event

    def advance_to(self, t: float) -> list[TransferRecord]:
        """Run the network up to virtual time ``t``; returns the transfers that finished on the way."""
        if not t >= self.clock.now:
            raise NetworkError(f"cannot advance from {self.clock.now!r} back to {t!r}")
        first = len(self.events)
        while self._step(t):
            pass
        self.clock.advance_to(t)
        return [self._done[e["id"]] for e in self.events[first:]]

    def wait(self, tid: int) -> TransferRecord:
        """Run until transfer ``tid`` has finished and return its record (other transfers progress too)."""
        if tid not in self._flows and tid not in self._done:
            raise NetworkError(f"no such transfer {tid}")
        while tid not in self._done:
            if not self._step(math.inf):
                raise NetworkError(f"transfer {tid} can never finish (its predecessor is missing)")
        return self._done[tid]

    def run(self) -> list[TransferRecord]:
        """Run until every submitted transfer has finished; returns them in order of completion."""
        first = len(self.events)
        while self._flows:
            if not self._step(math.inf):
                raise NetworkError("transfers left that can never finish")
        return [self._done[e["id"]] for e in self.events[first:]]

    def record(self, tid: int) -> TransferRecord | None:
        """The finished transfer ``tid``, or None while it is still in flight."""
        return self._done.get(tid)

    def fetch_fn(self, node: str, *, kind: str = "fetch") -> Callable[[int, float], float]:
        """A ``(nbytes, at) -> end`` callable that downloads on demand from the coordinator to ``node``.

        This is the shape ``coordinator.prefetch`` takes for on-demand fetches; calls must come in
        non-decreasing ``at`` order, as the clock only moves forward.
        """
        self._link(node)

        def fetch(nbytes: int, at: float) -> float:
            return self.wait(self.submit(kind=kind, src=COORDINATOR, dst=node, nbytes=int(nbytes), at=at)).end

        return fetch

    def ship_stream(self, node: str, items: Iterable[tuple[int, Mapping[str, Any]]], *, at: float | None = None,
                    kind: str = "prefetch") -> list[int]:
        """Queue ``(nbytes, meta)`` items to ``node`` back to back on one stream (one RTT, then each in turn).

        Returns their transfer ids in order; the first is requested at ``at`` (default now).
        """
        ids: list[int] = []
        for nbytes, meta in items:
            ids.append(self.submit(kind=kind, src=COORDINATOR, dst=node, nbytes=int(nbytes), at=at,
                                   after=ids[-1] if ids else None, meta=meta))
        return ids


def simulate_transfers(links: Mapping[str, LinkProfile], transfers: Iterable[Mapping[str, Any]], *,
                       egress_bps: float, ingress_bps: float | None = None) -> list[TransferRecord]:
    """Batch form: simulate ``transfers`` (keyword dicts for ``TransferSimulator.submit``); records in input order."""
    sim = TransferSimulator(links, egress_bps=egress_bps, ingress_bps=ingress_bps)
    ids = [sim.submit(**t) for t in transfers]
    sim.run()
    return [sim.record(i) for i in ids]  # type: ignore[misc]


def expert_arrivals(sim: TransferSimulator, node: str, order: Iterable[tuple[int, int]], sizes: np.ndarray,
                    at: float) -> np.ndarray:
    """Ship experts ``order`` ((block, expert) pairs, most wanted first) to ``node`` on one stream from ``at``.

    Returns when each arrives, (L, E) virtual seconds, inf for experts not shipped. Runs the simulator until
    the last one has arrived, so other transfers in flight share the egress with them. Matches the ``ship``
    argument of ``coordinator.prefetch.evaluate_prefetch`` once ``sim`` and ``node`` are bound (functools.partial).
    """
    sizes = np.asarray(sizes)
    arrival = np.full(sizes.shape, np.inf)  # (L, E)
    order = list(order)
    ids = sim.ship_stream(node, ((int(sizes[b, e]), {"block": int(b), "expert": int(e)}) for b, e in order),
                          at=at, kind="prefetch")
    if ids:
        sim.wait(ids[-1])
    for (b, e), tid in zip(order, ids):
        arrival[b, e] = sim.record(tid).end  # type: ignore[union-attr]
    return arrival


def write_events(path: str | Path, events: Iterable[Mapping[str, Any]]) -> None:
    """Write events as JSON lines (events.jsonl), one transfer per line."""
    with open(path, "w", encoding="utf-8") as f:
        for e in events:
            f.write(json.dumps(e, sort_keys=True) + "\n")
