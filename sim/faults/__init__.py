"""Faults injected into a live federation, and what its users saw: :func:`run_faults`.

`sim.run` calls ``run_faults(fed, report)`` after the workload when a scenario's ``[faults]``
asks for any (:data:`LIVE_PART`, one of `sim.run.LIVE_PARTS`). On the running federation, while the users keep sending
their requests (each one over and over, in its own loop):

- ``kill9 = [cases]``: kill -9 of node processes, case after case ("one", "half", "model",
  "model:NAME", "lost-..."), each timed until the federation is back at full strength (Ray
  restarts the processes, or the federation replaces what cannot come back): ``heal`` in the
  section, one summary row per case (``sim.faults.heal``).
- ``kill_nodes = k``: k Ray actors hosting nodes that hold users are killed (``ray.kill``, no restart).
  The coordinator fails their users over: each adapter is reinstalled from the coordinator's
  store on a surviving node; with self-healing on, replacements then take the killed nodes' places.
- ``restart_coordinator``: the coordinator is stopped and served again on the same database,
  bundle store and port; the nodes' channels reconnect and their heartbeats resume.
- ``cut_stream_at = f``, ``corrupt_chunks = c``: new nodes join through a faulty link (a loopback
  gRPC proxy in front of NodeControl, :class:`FaultyLink`). One link cuts the bundle stream after
  a fraction f of the bundle; one flips a byte in c tensors, one per stream; a third flips the
  same byte on every stream (that node must refuse the bundle and install nothing).

Every answer is compared with the same request made before any fault: the per-token log-probs
within a tolerance (1e-4), the same token ids, the same model label (the user's own adapter
stays the user's own adapter). A failed request is retried with backoff, as a user's client
would. ``report["faults"]`` has what was ``injected``, ``requests_failed`` (requests that saw at
least one error), ``requests_retried`` (extra attempts), ``requests_unanswered`` (no answer after
every attempt), wrong answers, ``adapters_lost``, and per-fault details and wall timings. A
request that failed counts under the fault that was the latest when it first failed.

The package, by job: ``settings`` (:class:`FaultSettings`, the probes, their answers and how two
answers compare), ``traffic`` (:class:`UserTraffic`, the users' requests with retries),
``links`` (:class:`FaultyLink`, the corrupting NodeControl proxy), ``heal`` (the kill -9 cases) and
``run`` (:class:`FaultRun`:
chooses the victims, injects the faults through `LocalFederation`'s fault operations, judges the
recovery). The names below are the package's public entry points.
"""

from .links import FaultyLink, LinkFaults
from .run import LIVE_PART, FaultRun, run_faults, wanted
from .settings import Answer, FaultError, FaultSettings, Probe, answer_diff
from .traffic import UserTraffic, summarise_requests

__all__ = ["LIVE_PART", "Answer", "FaultError", "FaultRun", "FaultSettings", "FaultyLink", "LinkFaults", "Probe",
           "UserTraffic", "answer_diff", "run_faults", "summarise_requests", "wanted"]
