"""Sections of a run's report, and the optional parts of a run that produce them.

A run's report has a core that every run has (bytes, time, quality, requests: :mod:`sim.report`) and
then a list of sections. A :class:`Section` is one key of report.json with its data, the lines it adds
to report.md and the plots it draws beside them. The module that produces a part of a run (the soup
nodes, the prefetch sweep, fault injection, ...) builds its own section and adds it with
:func:`add_section`; the renderer draws every section it is given, in the order they were added,
without knowing any of them by name.

Parts that run on the live federation after the workload, when the scenario asks for them, are
:class:`LivePart`\\ s: `sim.run` lists them, and :func:`chain_parts` runs those a scenario wants.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SECTIONS = "_sections"  # where a report being assembled keeps its sections; popped before it is written
JSON_MARKDOWN_CHARS = 4000  # a section without tables of its own shows this much of its JSON in report.md


def no_plots(data: Any, out: Path) -> list[str]:
    """The plots of a section that draws none."""
    return []


@dataclass(frozen=True)
class Section:
    """One section of a run's report: ``data`` under ``key`` in report.json, ``markdown(data)`` in
    report.md (a ``## `` heading first), and ``plots(data, out)`` writing PNGs into ``out`` and
    returning their file names. A section whose data is empty draws nothing."""

    key: str
    data: Any
    markdown: Callable[[Any], list[str]]
    plots: Callable[[Any, Path], list[str]] = no_plots


def json_markdown(title: str) -> Callable[[Any], list[str]]:
    """report.md lines of a section without tables of its own: a heading, then its data as JSON."""
    def lines(data: Any) -> list[str]:
        return [f"## {title}", "", "```json", json.dumps(data, indent=1)[:JSON_MARKDOWN_CHARS], "```"]
    return lines


def add_section(report: dict, section: Section) -> None:
    """Put ``section``'s data into ``report`` under its key and queue the section for the renderer."""
    report[section.key] = section.data
    report.setdefault(SECTIONS, []).append(section)


def pop_sections(report: dict) -> list[Section]:
    """The sections added to ``report``, removed from it (the report itself stays plain JSON data)."""
    return report.pop(SECTIONS, [])


def save_figure(fig, out: Path, name: str) -> str:
    """Lay out ``fig``, write it to ``out/name`` (PNG, 110 dpi), close it; returns ``name``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(Path(out) / name, dpi=110)
    plt.close(fig)
    return name


@dataclass(frozen=True)
class LivePart:
    """An optional part of a run: ``wanted(scenario)`` says whether the scenario switches it on;
    ``run(fed, report)`` runs it on the live federation after the workload and adds its section."""

    name: str
    wanted: Callable[[Any], bool]
    run: Callable[[Any, dict], Awaitable[Any]]


def chain_parts(parts: Sequence[LivePart], scn) -> Callable[[Any, dict], Awaitable[None]] | None:
    """The parts ``scn`` wants, chained into one ``extra(fed, report)`` in the given order (None if none)."""
    wanted = [p for p in parts if p.wanted(scn)]
    if not wanted:
        return None

    async def chained(fed, report: dict) -> None:
        for part in wanted:
            await part.run(fed, report)
    return chained
