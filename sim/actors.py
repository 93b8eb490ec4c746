"""Ray seen from the simulator: starting it, how many nodes each actor hosts, stopping one, its memory.

`sim.federation` starts Ray and places its nodes with these; the benchmarks read actor memory with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from typing import TypeVar

import ray

from .console import GRPC_QUIET_ENV

log = logging.getLogger(__name__)

T = TypeVar("T")

# ray.init's documented address for "start a new local Ray": None would attach to $RAY_ADDRESS or to
# whatever cluster the last `ray start` on this machine left behind, even one long stopped
LOCAL_RAY = "local"
RAY_START_TRIES = 3
RAY_START_BACKOFF_S = 2.0  # doubled after each failed try: 2 s, then 4 s


class RayStartError(RuntimeError):
    """Ray could not be started or reached; the message is one line saying what to do."""


def ray_address(address: str) -> str:
    """What ``ray.init`` is given: the cluster asked for, or LOCAL_RAY for a Ray of this run's own ("")."""
    return address.strip() or LOCAL_RAY


def ray_init_options(address: str) -> dict:
    """Keyword arguments of ``ray.init`` for ``address`` ("": a local Ray of this run's own).

    Workers' output stays in Ray's log files (``log_to_driver=False``) and Ray leaves this process's
    logging as it is (``sim.console`` routes it). A local Ray's workers inherit this process's quiet
    gRPC settings (the raylet is its child); a cluster's processes did not, so its workers get them
    through the job's runtime_env.
    """
    opts = {"address": ray_address(address), "include_dashboard": False, "log_to_driver": False,
            "configure_logging": False}
    if address.strip():
        opts["runtime_env"] = {"env_vars": {k: os.environ.get(k, v) for k, v in GRPC_QUIET_ENV.items()}}
    else:
        # a local Ray stays on loopback: every byte of the simulation crosses 127.0.0.1 only
        # (Ray on Linux otherwise binds the machine's own address, whatever _node_ip_address says)
        opts["_node_ip_address"] = "127.0.0.1"
    return opts


def init_ray(address: str = "", *, tries: int = RAY_START_TRIES, backoff_s: float = RAY_START_BACKOFF_S,
             start: Callable[..., object] = ray.init) -> bool:
    """Start a local Ray of this run's own (""), or connect to the cluster at ``address``.

    A failed start (Ray's node start-up times out on a loaded machine, and the next try usually
    works) is retried ``tries`` times in all, waiting ``backoff_s`` and then twice as long each time.
    Returns True when it started or connected (the caller then shuts Ray down), False when Ray was
    already initialised in this process. Raises RayStartError, one line saying what to do.
    """
    if ray.is_initialized():
        return False
    if not address.strip():
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    opts = ray_init_options(address)
    for attempt in range(1, tries + 1):
        try:
            start(**opts)
            return True
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception when its node start-up times out
            ray.shutdown()
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            if attempt == tries:
                raise RayStartError(ray_start_advice(address, reason, tries)) from None
            log.warning("Ray did not start (try %d of %d): %s", attempt, tries, reason)
            time.sleep(backoff_s * 2 ** (attempt - 1))
    return True


def ray_start_advice(address: str, reason: str, tries: int) -> str:
    """The one line a failed Ray start ends with: what went wrong, and what to do about it."""
    if address.strip():
        return (f"could not connect to the Ray cluster at {address} ({tries} tries): {reason}; check it is up "
                f"(`ray status --address {address}`), or leave out --address to start a local Ray")
    return (f"a local Ray did not start ({tries} tries): {reason}; the machine may be overloaded or out of memory: "
            f"wait for other jobs, stop stray Ray processes of yours (`ray stop`), and run again")


AUTO = 0  # nodes_per_actor asked for: packed by measurement (see packing)
# One Ray actor per node costs a process: ~280 MB resident with torch, ~1 s of CPU to start, and
# Ray starts only as many at once as there are cores. About 60 fit this 24 GiB machine (issue 8).
ONE_ACTOR_PER_NODE_MAX = 64
MIN_AUTO_ACTORS = 4  # so the four specialists of a mixture still sit on four actors


def packing(nodes: int, requested: int, cpus: int) -> int:
    """Virtual nodes per actor: ``requested``, or the automatic packing for AUTO, or when 1 (one
    process per node) is asked past ONE_ACTOR_PER_NODE_MAX nodes, where it would not fit.

    The automatic packing puts the nodes into as many actors as there are CPUs, at least
    MIN_AUTO_ACTORS: an actor computes on one thread, so more actors than cores add memory and
    start-up time (each boots torch) and no throughput, and nodes inside an actor cost ~1-2 MiB each.
    Measured (issue 17, 32 tiny nodes on 2 cores): 8 per actor came up fastest (README, Performance).
    """
    if requested == AUTO or (requested == 1 and nodes > ONE_ACTOR_PER_NODE_MAX):
        return math.ceil(nodes / max(MIN_AUTO_ACTORS, cpus))
    return requested


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
