"""The points of a sweep: the ``[sweep]`` table and ``--grid``, expanded into scenarios and checked
before anything runs.

A sweep file is a scenario file (every point starts from it) with one more table::

    [sweep.grid]                      # the cross product of these values
    "model.expert_codec" = ["fp16", "int8"]
    "network.default_link" = ["school-adsl", "4g"]

    [[sweep.points]]                  # or: listed points (each crossed with the grid, if both are given)
    "model.expert_codec" = "ternary"
    "prefetch.budgets" = [8]

Keys are ``section.key`` as in the scenario (``network.profiles.village.rtt_ms`` reaches into a table);
unquoted dotted keys (``model.expert_codec = [...]``) mean the same. ``--grid KEY=V1,V2`` adds or
replaces a grid axis from the command line; each value is read as a TOML value (``4``, ``2.5``,
``true``) and otherwise taken as a string (``int8``, ``prune50+ternary-ec``). A single value of a key
whose scenario value is a list is a list of one: ``"prefetch.live_budgets" = [4, 8]`` sweeps one budget
per point (``[[4, 8], [12]]`` sweeps lists).

Each point is the file's scenario with its values set and then sim.run's flags (``--nodes``,
``--preset``, ...) on top, validated as a scenario file is: a point that cannot run (a value out of
range, an unknown link profile, more specialist and soup nodes than nodes, the same scenario as an
earlier point, a live prefetch point with more than one partial node) gets its error, one line, before
any point starts.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.config import ConfigError
from model.corpora import CorpusError

from ..network import NetworkError
from ..prefetch_live.run import configs as live_configs
from ..run import check_suite, link_names, new_suite, suite_key
from ..scenario import Scenario, ScenarioError, from_dict, read_toml

SWEEP_TABLE = "sweep"
SWEEP_KEYS = ("grid", "points")
MAX_POINTS = 256  # a larger sweep is a typo more often than a plan: split it
FOLDER_CHARS = 80


class SweepError(ValueError):
    """The sweep as a whole cannot run (its table, a --grid axis, a flag against an axis); one line."""


@dataclass
class Point:
    """One point of a sweep: its values of the swept keys, its report folder, and its scenario (or why not)."""

    index: int  # 1-based, in the order the points run
    values: dict[str, Any]
    folder: str
    scenario: Scenario | None = None
    error: str | None = None

    def label(self) -> str:
        """``key=value, ...`` of the point's swept keys."""
        return ", ".join(f"{k}={_show(v)}" for k, v in self.values.items()) or "(the scenario as it is)"


def _show(v: Any) -> str:
    return v if isinstance(v, str) else repr(v).replace("'", '"') if isinstance(v, (list, dict)) else str(v)


def read_file(path: str | Path | None) -> tuple[dict, dict]:
    """A sweep file's scenario data (without the sweep table; ``name`` defaulting to the file's stem)
    and its ``[sweep]`` table; no file: the default scenario and no table."""
    if path is None:
        return {"name": "sweep"}, {}
    data = read_toml(path)
    table = data.pop(SWEEP_TABLE, {})
    if not isinstance(table, dict):
        raise SweepError(f"{SWEEP_TABLE}: must be a table")
    return data, table


def _flatten(table: dict, prefix: str, leaf: typing.Callable[[Any], bool]) -> dict[str, Any]:
    """Nested tables as ``a.b.c`` keys, down to the values ``leaf`` accepts."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and not leaf(v):
            out.update(_flatten(v, key, leaf))
        else:
            out[key] = v
    return out


def check_key(key: str, where: str) -> None:
    """Refuse a key that is not a scenario key (``section.key``, deeper only into a table-valued key)."""
    parts = key.split(".")
    sections = typing.get_type_hints(Scenario)
    sec = sections.get(parts[0])
    if len(parts) < 2 or sec is None or not dataclasses.is_dataclass(sec):
        known = ", ".join(k for k, t in sections.items() if dataclasses.is_dataclass(t))
        raise SweepError(f"{where} {key!r}: not a scenario key; keys are section.key with section one of {known}")
    hints = typing.get_type_hints(sec)
    if parts[1] not in hints:
        raise SweepError(f"{where} {key!r}: unknown key of [{parts[0]}]; known: {', '.join(sorted(hints))}")
    if len(parts) > 2 and typing.get_origin(hints[parts[1]]) is not dict:
        raise SweepError(f"{where} {key!r}: {parts[0]}.{parts[1]} is not a table")


def parse_table(table: dict) -> tuple[dict[str, list], list[dict[str, Any]]]:
    """The ``[sweep]`` table's grid (key -> values) and listed points (key -> value each), keys checked."""
    for k in table:
        if k not in SWEEP_KEYS:
            raise SweepError(f"{SWEEP_TABLE}.{k}: unknown key; known: {', '.join(SWEEP_KEYS)}")
    raw_grid = table.get("grid", {})
    if not isinstance(raw_grid, dict):
        raise SweepError(f"{SWEEP_TABLE}.grid: must be a table of key = [values]")
    grid = _flatten(raw_grid, "", leaf=lambda v: False)
    for key, values in grid.items():
        check_key(key, f"{SWEEP_TABLE}.grid")
        check_axis(key, values, f"{SWEEP_TABLE}.grid")
    raw_points = table.get("points", [])
    if not isinstance(raw_points, list) or not all(isinstance(p, dict) for p in raw_points):
        raise SweepError(f"{SWEEP_TABLE}.points: must be an array of tables ([[sweep.points]])")
    points = []
    for i, p in enumerate(raw_points, 1):
        flat = _flatten(p, "", leaf=lambda v: False)
        if not flat:
            raise SweepError(f"{SWEEP_TABLE}.points[{i}]: sets no key")
        for key in flat:
            check_key(key, f"{SWEEP_TABLE}.points[{i}]")
        points.append(flat)
    return grid, points


def check_axis(key: str, values: Any, where: str) -> None:
    """A grid axis is a non-empty list of distinct values."""
    if not isinstance(values, list) or not values:
        raise SweepError(f"{where} {key!r}: must be a non-empty list of values, got {values!r}")
    if len({repr(v) for v in values}) != len(values):
        raise SweepError(f"{where} {key!r}: has duplicate values")


def literal(text: str) -> Any:
    """A command-line value as TOML reads it (``4``, ``2.5``, ``true``, ``[8, 16]``), else the string itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_grid_arg(text: str) -> tuple[str, list]:
    """``KEY=V1,V2,...`` from ``--grid``: the key (checked) and its values."""
    key, eq, rest = text.partition("=")
    key = key.strip()
    if not eq or not key or not rest.strip():
        raise SweepError(f"--grid {text!r}: expected KEY=V1,V2,... (e.g. model.expert_codec=int8,ternary)")
    check_key(key, "--grid")
    values = [literal(v.strip()) for v in rest.split(",") if v.strip()]
    check_axis(key, values, "--grid")
    return key, values


def expand(grid: dict[str, list], points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every point's values: each listed point (or the scenario as it is) crossed with the grid,
    the grid's first key outermost."""
    for i, p in enumerate(points, 1):
        both = sorted(set(p) & set(grid))
        if both:
            raise SweepError(f"{SWEEP_TABLE}.points[{i}] sets {both[0]!r}, which the grid also varies")
    combos = list(itertools.product(*grid.values()))
    out = [{**p, **dict(zip(grid, combo))} for p in (points or [{}]) for combo in combos]
    if len(out) > MAX_POINTS:
        raise SweepError(f"the sweep has {len(out)} points, more than {MAX_POINTS}: split it")
    return out


def set_key(data: dict, key: str, value: Any) -> None:
    """Set ``section.key[.sub...]`` in parsed scenario data, creating tables on the way."""
    *path, last = key.split(".")
    for part in path:
        nxt = data.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ScenarioError(f"{key}: {part} is not a table")
        data = nxt
    data[last] = value


def as_field(key: str, value: Any) -> Any:
    """``value`` as the scenario key ``key`` takes it: a single value of a list-valued key becomes a list of
    one (``prefetch.live_budgets = 4`` means ``[4]``); anything else as it is."""
    section, _, name = key.partition(".")
    sec = typing.get_type_hints(Scenario).get(section)
    if sec is None or not dataclasses.is_dataclass(sec) or "." in name:
        return value
    is_list = typing.get_origin(typing.get_type_hints(sec).get(name)) is list
    return [value] if is_list and not isinstance(value, list) else value


def check_live(scn: Scenario) -> None:
    """A sweep point with live prefetching runs one partial node (one budget, one policy, one prior beta),
    so that its row has one set of live figures to put on the frontier; more is a ScenarioError."""
    n = len(live_configs(scn)) if scn.prefetch.live else 1
    if n != 1:
        pf = scn.prefetch
        raise ScenarioError(
            f"prefetch.live: a sweep point runs one partial node, this one would run {n} "
            f"({len(pf.live_budgets) + len(pf.live_budget_bytes)} budgets x {len(pf.live_policies)} policies x "
            f"{len(pf.live_prior_betas)} prior betas): make prefetch.live_budgets and prefetch.live_policies "
            "axes of the sweep")


def folder_name(index: int, values: dict[str, Any]) -> str:
    """``NN-key=value-...`` (the last part of each key), safe as a folder name."""
    last = [k.rsplit(".", 1)[-1] for k in values]
    names = last if len(set(last)) == len(last) else list(values)  # whole keys where last parts clash
    parts = [f"{n}={_show(v)}" for n, v in zip(names, values.values())]
    name = re.sub(r"[^A-Za-z0-9.=+_,-]", "_", "-".join([f"{index:02d}", *parts]))
    return name[:FOLDER_CHARS]


def build_points(data: dict, assignments: list[dict[str, Any]], flags: dict[str, Any], *,
                 corpus_dir: str | None = None) -> list[Point]:
    """Each point's scenario: ``data`` with its values, then ``flags`` (sim.run's, as ``section.key`` ->
    value), validated. Points that cannot run carry their one-line error instead; nothing is trained."""
    swept = {k for a in assignments for k in a}
    clash = sorted(swept & set(flags))
    if clash:
        raise SweepError(f"a sim.run flag sets {clash[0]!r}, which the sweep varies: drop the flag or the axis")
    points: list[Point] = []
    seen: dict[str, int] = {}
    suites: dict[tuple, Any] = {}
    for i, values in enumerate(assignments, 1):
        point = Point(index=i, values=values, folder=folder_name(i, values))
        points.append(point)
        d = copy.deepcopy(data)
        try:
            for key, value in {**values, **flags}.items():
                set_key(d, key, as_field(key, value))
            d["name"] = f"{data.get('name', 'sweep')} [{point.label()}]" if values else data.get("name", "sweep")
            scn = from_dict(d)
            try:
                link_names(scn)  # an unknown link profile is refused here, not once the point is up
            except NetworkError as exc:
                raise ScenarioError(f"network: {exc}") from None
            check_live(scn)
            models = suite_key(scn)
            if models not in suites:
                suites[models] = new_suite(scn, corpus_dir=corpus_dir, progress=False)
            check_suite(scn, suites[models], corpus_dir)
        except (ScenarioError, CorpusError, ConfigError) as exc:
            point.error = str(exc).splitlines()[0]
            continue
        same = {k: v for k, v in scn.to_dict().items() if k != "name"}
        fingerprint = repr(same)
        if fingerprint in seen:
            point.error = f"the same scenario as point {seen[fingerprint]}"
            continue
        seen[fingerprint] = i
        point.scenario = scn
    return points


def varied_keys(points: list[Point]) -> list[str]:
    """The swept keys that take more than one value over the points (all swept keys if none do)."""
    keys = list(dict.fromkeys(k for p in points for k in p.values))
    varied = [k for k in keys if len({repr(p.values.get(k)) for p in points}) > 1]
    return varied or keys
