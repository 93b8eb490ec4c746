"""Ray node actors seen from the simulator: how many nodes each hosts, stopping one, its memory.

`sim.federation` places its nodes with these; the benchmarks read actor memory with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import TypeVar

import ray

T = TypeVar("T")

# One Ray actor per node costs a process: ~280 MB resident with torch, ~1 s of CPU to start, and
# Ray starts only as many at once as there are cores. About 60 fit this 24 GiB machine (issue 8).
ONE_ACTOR_PER_NODE_MAX = 64
MIN_AUTO_ACTORS = 4  # so the four specialists of a mixture still sit on four actors


def packing(nodes: int, requested: int, cpus: int) -> int:
    """Virtual nodes per actor: ``requested``, unless that is 1 and one actor per node would not fit.

    Past ONE_ACTOR_PER_NODE_MAX nodes the nodes are packed into as many actors as there are CPUs
    (at least MIN_AUTO_ACTORS): an actor computes on one thread, so more actors than cores add
    memory and start-up time and no throughput; nodes inside an actor cost ~1-2 MiB each.
    """
    if requested != 1 or nodes <= ONE_ACTOR_PER_NODE_MAX:
        return requested
    return math.ceil(nodes / max(MIN_AUTO_ACTORS, cpus))


def actor_groups(plans: list[T], per_actor: int) -> list[list[T]]:
    """The nodes of each actor: ceil(N / per_actor) actors, nodes dealt round-robin.

    Dealt, not cut in runs: an actor computes on one thread, so the specialists (the first plans)
    and the users' nodes land on different actors, and a mixture's components run in parallel.
    """
    n = math.ceil(len(plans) / per_actor)
    return [plans[i::n] for i in range(n)]


def process_memory(pid: int) -> dict:
    """Resident (RSS) and proportional (PSS: shared pages split among their users) memory of a local process.

    PSS is what a process really adds to the machine: torch's libraries, mapped by every actor, count
    once in the sum of PSS but once per process in the sum of RSS. Linux only (``/proc``).
    """
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[0].endswith(":") and parts[2] == "kB":
                    fields[parts[0][:-1]] = int(parts[1]) * 1024
    except OSError:
        return {"pid": pid, "rss_bytes": 0, "pss_bytes": 0, "uss_bytes": 0}
    return {"pid": pid, "rss_bytes": fields.get("Rss", 0), "pss_bytes": fields.get("Pss", 0),
            "uss_bytes": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)}


async def stop_actor(actor) -> None:
    """Stop a node actor's nodes (30 s at most), then kill its process."""
    with contextlib.suppress(Exception):  # a node already gone (killed by a fault) is fine here
        await asyncio.wait_for(asyncio.wrap_future(actor.stop.remote().future()), 30)
    ray.kill(actor)
