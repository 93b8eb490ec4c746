"""Byte accounting: every message between the coordinator and a node, by kind, node and user.

Sizes are serialized protobuf message sizes (``ByteSize()``), measured where the message crosses
the coordinator's gRPC boundary; ``payload`` is the bulk data inside (bundle chunk bytes, adapter
blobs). Client traffic to the coordinator is not counted: the federation's links are what matter.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from proto import federation_pb2 as pb

KINDS = (pb.BYTE_KIND_BUNDLE, pb.BYTE_KIND_ADAPTER, pb.BYTE_KIND_SCORE, pb.BYTE_KIND_MIXTURE,
         pb.BYTE_KIND_GENERATE, pb.BYTE_KIND_CONTROL)

_SENT, _RECEIVED, _MESSAGES, _PAYLOAD = range(4)


class Traffic:
    """In-memory byte counters keyed by (node id, kind, user id); user id "" for non-user traffic."""

    def __init__(self) -> None:
        self._c: dict[tuple[str, pb.ByteKind.ValueType, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self.requests_failed_over = 0
        self.requests_failed_over_by_user: dict[str, int] = defaultdict(int)

    def count(self, kind: pb.ByteKind.ValueType, node_id: str, *, sent: int = 0, received: int = 0, payload: int = 0,
              user_id: str = "", messages: int = 1) -> None:
        """Add one message (or ``messages``) of ``kind`` exchanged with ``node_id``."""
        row = self._c[(node_id, kind, user_id)]
        row[_SENT] += sent
        row[_RECEIVED] += received
        row[_MESSAGES] += messages
        row[_PAYLOAD] += payload

    def failed_over(self, user_id: str) -> None:
        """Count a request that was served by another node than the one first chosen."""
        self.requests_failed_over += 1
        self.requests_failed_over_by_user[user_id] += 1

    def reset(self) -> None:
        """Zero every counter."""
        self._c.clear()
        self.requests_failed_over = 0
        self.requests_failed_over_by_user.clear()

    def rows(self) -> list[tuple[str, pb.ByteKind.ValueType, str, int, int, int, int]]:
        """(node, kind, user, sent, received, messages, payload) rows, for persistence."""
        return [(n, k, u, v[0], v[1], v[2], v[3]) for (n, k, u), v in sorted(self._c.items())]

    def load(self, rows: Iterable[tuple[str, pb.ByteKind.ValueType, str, int, int, int, int]]) -> None:
        """Restore counters saved by :meth:`rows` (added to the current ones)."""
        for n, k, u, sent, received, messages, payload in rows:
            self.count(k, n, sent=sent, received=received, payload=payload, user_id=u, messages=messages)

    def totals(self, user_id: str | None = None) -> dict[str, dict[pb.ByteKind.ValueType, list[int]]]:
        """{node: {kind: [sent, received, messages, payload]}}, restricted to one user when given."""
        out: dict[str, dict[pb.ByteKind.ValueType, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0, 0]))
        for (n, k, u), v in self._c.items():
            if user_id is not None and u != user_id:
                continue
            acc = out[n][k]
            for i in range(4):
                acc[i] += v[i]
        return out

    def stats(self, user_id: str | None = None) -> pb.Stats:
        """The counters as a ``Stats`` message (request counters left for the caller to fill)."""
        per_node = self.totals(user_id)
        by_kind = {k: [0, 0, 0, 0] for k in KINDS}
        stats = pb.Stats(user_id=user_id or "")
        for node_id in sorted(per_node):
            nb = stats.by_node.add(node_id=node_id)
            for kind in sorted(per_node[node_id]):
                v = per_node[node_id][kind]
                nb.by_kind.add(kind=kind, sent=v[0], received=v[1], messages=v[2], payload=v[3])
                nb.total += v[0] + v[1]
                for i in range(4):
                    by_kind[kind][i] += v[i]
        for kind in KINDS:
            v = by_kind[kind]
            stats.by_kind.add(kind=kind, sent=v[0], received=v[1], messages=v[2], payload=v[3])
            stats.bytes_total += v[0] + v[1]
        return stats
