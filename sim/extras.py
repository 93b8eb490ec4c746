"""Optional parts of a run that a scenario switches on: the prefetch sweep and fault injection.

Each is an async callable ``extra(fed, report)`` run by `sim.run` after the workload, on the
same running federation, adding its own section to the report.
"""

from __future__ import annotations

from .scenario import Scenario


def for_scenario(scn: Scenario):
    """The extras the scenario asks for, chained into one callable (None when there are none)."""
    parts = []
    if scn.prefetch.budgets:
        from .prefetch_sweep import run_sweep

        parts.append(run_sweep)
    if scn.faults.kill_nodes or scn.faults.cut_stream_at or scn.faults.corrupt_chunks or scn.faults.restart_coordinator:
        from .faults import run_faults

        parts.append(run_faults)
    if not parts:
        return None

    async def chained(fed, report):
        for part in parts:
            await part(fed, report)
    return chained
