"""A run's shipping in virtual time: the network model applied to the bytes the coordinator counted.

Each node's bundle and adapters are one stream from the coordinator, all nodes at once, sharing its
egress (:class:`sim.network.TransferSimulator`); the query traffic measured per node follows on the same
links. The result is each node's virtual seconds to be loaded, and the transfers for events.jsonl.
"""

from __future__ import annotations

from .network import COORDINATOR, LinkProfile, TransferRecord, TransferSimulator

DOWN_KINDS = ("BUNDLE", "ADAPTER")  # what is shipped to a node before it serves


def finished(sim: TransferSimulator, tid: int) -> TransferRecord:
    """Transfer ``tid``'s record once ``sim.run()`` has drained every transfer."""
    record = sim.record(tid)
    if record is None:
        raise RuntimeError(f"transfer {tid} still in flight after the simulator ran")
    return record


def simulate_shipping(nodes: list[dict], links: dict[str, LinkProfile], egress_bps: float
                      ) -> tuple[dict[str, float], list[dict]]:
    """Virtual seconds for every node to receive its bundle and adapters, all nodes at once.

    ``nodes``: dicts with ``node`` and ``by_kind`` (as in :func:`stats_to_dict`). Each node's
    shipping is one stream from the coordinator (bundle, then adapters, chained); concurrent
    streams share the coordinator's egress. Query traffic then follows on the same links.
    Returns each node's shipping end time and the transfer events.
    """
    sim = TransferSimulator(links, egress_bps=egress_bps)
    tids: list[int] = []
    ends: dict[str, int] = {}
    for n in nodes:
        prev = None
        for kind in DOWN_KINDS:
            b = n["by_kind"].get(kind, {})
            nbytes = int(b.get("sent", 0) + b.get("received", 0))
            if nbytes:
                prev = sim.submit(kind=kind.lower(), src=COORDINATOR, dst=n["node"], nbytes=nbytes, at=0.0,
                                  after=prev)
                tids.append(prev)
        if prev is not None:
            ends[n["node"]] = prev
    sim.run()
    shipped = {node: finished(sim, tid).end for node, tid in ends.items()}
    # query traffic follows shipping on the same links: requests down, replies up, one stream each way
    now = sim.clock.now
    for n in nodes:
        down = sum(v.get("sent", 0) for k, v in n["by_kind"].items() if k not in DOWN_KINDS)
        up = sum(v.get("received", 0) for k, v in n["by_kind"].items() if k not in DOWN_KINDS)
        if down:
            tids.append(sim.submit(kind="query-down", src=COORDINATOR, dst=n["node"], nbytes=int(down), at=now))
        if up:
            tids.append(sim.submit(kind="query-up", src=n["node"], dst=COORDINATOR, nbytes=int(up), at=now))
    sim.run()
    events = [finished(sim, t).as_event() for t in tids]
    return shipped, events
