"""The coordinator's registry of nodes, users, routing histograms and byte counters, in SQLite.

Every write is its own transaction (WAL journal), so a coordinator that stops, crashes or restarts
finds every node, user, adapter and token hash where it left them. Byte counters are kept in
memory by :class:`coordinator.traffic.Traffic` and written here periodically and on stop.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from proto import federation_pb2 as pb

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    state INTEGER NOT NULL,
    model TEXT NOT NULL,
    codec TEXT NOT NULL DEFAULT '',
    last_heartbeat_ms INTEGER NOT NULL,
    registered_ms INTEGER NOT NULL,
    bundles TEXT NOT NULL DEFAULT '[]',
    held_users TEXT NOT NULL DEFAULT '[]',
    expert_mask BLOB NOT NULL DEFAULT x'',
    n_blocks INTEGER NOT NULL DEFAULT 0,
    n_experts INTEGER NOT NULL DEFAULT 0,
    inflight INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    persona TEXT NOT NULL DEFAULT '',
    node_id TEXT,
    adapter_format TEXT NOT NULL DEFAULT '',
    adapter BLOB,
    adapter_sha256 BLOB,
    token_hash BLOB UNIQUE,
    created_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS users_by_node ON users(node_id);
CREATE TABLE IF NOT EXISTS routing (
    node_id TEXT PRIMARY KEY,
    n_blocks INTEGER NOT NULL,
    n_experts INTEGER NOT NULL,
    counts BLOB NOT NULL,
    tokens INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS traffic (
    node_id TEXT NOT NULL,
    kind INTEGER NOT NULL,
    user_id TEXT NOT NULL,
    sent INTEGER NOT NULL,
    received INTEGER NOT NULL,
    messages INTEGER NOT NULL,
    payload INTEGER NOT NULL,
    PRIMARY KEY (node_id, kind, user_id)
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS soup (
    node_id TEXT PRIMARY KEY,
    request BLOB NOT NULL
);
"""


def now_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch."""
    return int(time.time() * 1000)


@dataclass(frozen=True)
class NodeRecord:
    """A node as the registry holds it. ``state`` is a ``pb.NodeState`` number."""

    node_id: str
    address: str
    state: pb.NodeState.ValueType
    model: str
    codec: str
    last_heartbeat_ms: int
    registered_ms: int
    bundles: tuple[str, ...]
    held_users: tuple[str, ...]
    expert_mask: bytes
    n_blocks: int
    n_experts: int
    inflight: int

    @property
    def healthy(self) -> bool:
        """Routable for new work."""
        return self.state == pb.NODE_STATE_HEALTHY


@dataclass(frozen=True)
class UserRecord:
    """A user as the registry holds it (the token only as its hash).

    ``adapter`` is the blob, or None when the user has none or it was not read
    (``get_user(..., with_adapter=False)``); ``has_adapter`` and ``adapter_bytes`` hold either way.
    """

    user_id: str
    persona: str
    node_id: str | None
    adapter_format: str
    adapter: bytes | None
    adapter_sha256: bytes | None
    token_hash: bytes | None
    has_adapter: bool
    adapter_bytes: int


@dataclass(frozen=True)
class RoutingRecord:
    """A node's latest cumulative expert-usage counts, (n_blocks, n_experts)."""

    node_id: str
    counts: np.ndarray  # (L, E) uint64
    tokens: int


_NODE_COLS = ("node_id, address, state, model, codec, last_heartbeat_ms, registered_ms, bundles, held_users, "
              "expert_mask, n_blocks, n_experts, inflight")
_USER_COLS = ("user_id, persona, node_id, adapter_format, adapter, adapter_sha256, token_hash, adapter IS NOT NULL, "
              "COALESCE(length(adapter), 0)")
# the same, without reading the blob
_USER_COLS_NO_ADAPTER = _USER_COLS.replace("adapter_format, adapter,", "adapter_format, NULL,")


def _node(row: tuple) -> NodeRecord:
    (node_id, address, state, model, codec, hb, reg, bundles, held, mask, nb, ne, inflight) = row
    return NodeRecord(node_id, address, state, model, codec, hb, reg, tuple(json.loads(bundles)),
                      tuple(json.loads(held)), bytes(mask), nb, ne, inflight)


def _user(row: tuple) -> UserRecord:
    user_id, persona, node_id, fmt, adapter, sha, token_hash, has_adapter, size = row
    return UserRecord(user_id, persona, node_id, fmt, None if adapter is None else bytes(adapter),
                      None if sha is None else bytes(sha), None if token_hash is None else bytes(token_hash),
                      bool(has_adapter), size)


class Registry:
    """Nodes, users, routing histograms and counters persisted in one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The coordinator runs one asyncio thread; check_same_thread=False lets a test or sim
        # inspect the registry from another thread without a second connection.
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database (everything is already committed)."""
        self._db.close()

    def _write(self, sql: str, args: tuple = ()) -> int:
        with self._db:
            return self._db.execute(sql, args).rowcount

    # --- nodes -----------------------------------------------------------------------------

    def upsert_node(self, *, node_id: str, address: str, model: str, codec: str, state: pb.NodeState.ValueType,
                    bundles: Iterable[str] = (), held_users: Iterable[str] = (), n_blocks: int = 0,
                    n_experts: int = 0, at_ms: int | None = None) -> NodeRecord:
        """Insert a node, or replace a re-registering node's address and holdings (keeping its users)."""
        at = now_ms() if at_ms is None else at_ms
        self._write(
            "INSERT INTO nodes (node_id, address, state, model, codec, last_heartbeat_ms, registered_ms, bundles, "
            "held_users, n_blocks, n_experts) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(node_id) DO UPDATE SET address=excluded.address, state=excluded.state, "
            "model=excluded.model, codec=excluded.codec, last_heartbeat_ms=excluded.last_heartbeat_ms, "
            "registered_ms=excluded.registered_ms, bundles=excluded.bundles, held_users=excluded.held_users, "
            "n_blocks=excluded.n_blocks, n_experts=excluded.n_experts, expert_mask=x'', inflight=0",
            (node_id, address, state, model, codec, at, at, json.dumps(sorted(bundles)),
             json.dumps(sorted(held_users)), n_blocks, n_experts))
        return self.existing_node(node_id)

    def heartbeat(self, *, node_id: str, state: pb.NodeState.ValueType, bundles: Iterable[str],
                  held_users: Iterable[str], expert_mask: bytes, inflight: int, at_ms: int | None = None) -> bool:
        """Record a heartbeat; False when the node is unknown (it must register again)."""
        at = now_ms() if at_ms is None else at_ms
        return self._write(
            "UPDATE nodes SET state=?, bundles=?, held_users=?, expert_mask=?, inflight=?, last_heartbeat_ms=? "
            "WHERE node_id=?",
            (state, json.dumps(sorted(bundles)), json.dumps(sorted(held_users)), expert_mask, inflight, at,
             node_id)) == 1

    def set_node_state(self, node_id: str, state: pb.NodeState.ValueType) -> bool:
        """Set a node's state; False when the node is unknown."""
        return self._write("UPDATE nodes SET state=? WHERE node_id=?", (state, node_id)) == 1

    def existing_node(self, node_id: str) -> NodeRecord:
        """A node known to be registered (just written, or checked); a KeyError otherwise."""
        node = self.get_node(node_id)
        if node is None:
            raise KeyError(f"node {node_id!r} is not in the registry")
        return node

    def get_node(self, node_id: str) -> NodeRecord | None:
        """The node, or None."""
        row = self._db.execute(f"SELECT {_NODE_COLS} FROM nodes WHERE node_id=?", (node_id,)).fetchone()
        return None if row is None else _node(row)

    def nodes(self, state: pb.NodeState.ValueType | None = None) -> list[NodeRecord]:
        """All nodes (or those in ``state``), by id."""
        if state is None:
            rows = self._db.execute(f"SELECT {_NODE_COLS} FROM nodes ORDER BY node_id").fetchall()
        else:
            rows = self._db.execute(f"SELECT {_NODE_COLS} FROM nodes WHERE state=? ORDER BY node_id",
                                    (state,)).fetchall()
        return [_node(r) for r in rows]

    def mark_silent_nodes_down(self, older_than_ms: int) -> list[str]:
        """Mark DOWN every routable node whose last heartbeat is older than ``older_than_ms``."""
        rows = self._db.execute(
            "SELECT node_id FROM nodes WHERE state IN (?, ?, ?) AND last_heartbeat_ms < ? ORDER BY node_id",
            (pb.NODE_STATE_REGISTERED, pb.NODE_STATE_HEALTHY, pb.NODE_STATE_DRAINING, older_than_ms)).fetchall()
        ids = [r[0] for r in rows]
        with self._db:
            self._db.executemany("UPDATE nodes SET state=? WHERE node_id=?", [(pb.NODE_STATE_DOWN, i) for i in ids])
        return ids

    # --- users -----------------------------------------------------------------------------

    def put_user(self, user_id: str, *, persona: str | None = None, adapter: bytes | None = None,
                 adapter_format: str = "safetensors", adapter_sha256: bytes | None = None,
                 token_hash: bytes | None = None) -> UserRecord:
        """Create a user or update the given fields (None leaves a field as it is)."""
        with self._db:
            self._db.execute("INSERT OR IGNORE INTO users (user_id, persona, created_ms) VALUES (?, ?, ?)",
                             (user_id, persona or "", now_ms()))
            if persona is not None:
                self._db.execute("UPDATE users SET persona=? WHERE user_id=?", (persona, user_id))
            if adapter is not None:
                self._db.execute("UPDATE users SET adapter=?, adapter_format=?, adapter_sha256=? WHERE user_id=?",
                                 (adapter, adapter_format, adapter_sha256, user_id))
            if token_hash is not None:
                self._db.execute("UPDATE users SET token_hash=? WHERE user_id=?", (token_hash, user_id))
        return self.existing_user(user_id)

    def existing_user(self, user_id: str, *, with_adapter: bool = True) -> UserRecord:
        """A user known to exist (just written, or checked); a KeyError otherwise."""
        user = self.get_user(user_id, with_adapter=with_adapter)
        if user is None:
            raise KeyError(f"user {user_id!r} is not in the registry")
        return user

    def get_user(self, user_id: str, *, with_adapter: bool = True) -> UserRecord | None:
        """The user, or None; ``with_adapter=False`` leaves the adapter blob unread (``adapter`` None)."""
        cols = _USER_COLS if with_adapter else _USER_COLS_NO_ADAPTER
        row = self._db.execute(f"SELECT {cols} FROM users WHERE user_id=?", (user_id,)).fetchone()
        return None if row is None else _user(row)

    def adapter(self, user_id: str) -> bytes | None:
        """The user's adapter blob, or None (no such user, or no adapter)."""
        row = self._db.execute("SELECT adapter FROM users WHERE user_id=?", (user_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def users(self, persona: str = "") -> list[UserRecord]:
        """All users (or those of ``persona``), by id."""
        if persona:
            rows = self._db.execute(f"SELECT {_USER_COLS} FROM users WHERE persona=? ORDER BY user_id",
                                    (persona,)).fetchall()
        else:
            rows = self._db.execute(f"SELECT {_USER_COLS} FROM users ORDER BY user_id").fetchall()
        return [_user(r) for r in rows]

    def users_on_node(self, node_id: str) -> list[str]:
        """Ids of the users assigned to ``node_id``."""
        rows = self._db.execute("SELECT user_id FROM users WHERE node_id=? ORDER BY user_id", (node_id,)).fetchall()
        return [r[0] for r in rows]

    def user_counts_by_node(self) -> dict[str, int]:
        """How many users each node is assigned."""
        rows = self._db.execute("SELECT node_id, COUNT(*) FROM users WHERE node_id IS NOT NULL GROUP BY node_id")
        return dict(rows.fetchall())

    def user_for_token_hash(self, token_hash: bytes) -> str | None:
        """The user whose token hashes to ``token_hash``, or None."""
        row = self._db.execute("SELECT user_id FROM users WHERE token_hash=?", (token_hash,)).fetchone()
        return None if row is None else row[0]

    def assign_user(self, user_id: str, node_id: str | None) -> None:
        """Record which node holds the user's adapter (None: no node)."""
        self._write("UPDATE users SET node_id=? WHERE user_id=?", (node_id, user_id))

    def delete_user(self, user_id: str) -> bool:
        """Delete a user, its adapter and its token hash; False when unknown."""
        return self._write("DELETE FROM users WHERE user_id=?", (user_id,)) == 1

    # --- routing histograms ----------------------------------------------------------------

    def set_routing(self, node_id: str, counts: np.ndarray, tokens: int) -> None:
        """Store a node's latest cumulative (n_blocks, n_experts) counts."""
        counts = np.ascontiguousarray(counts, dtype="<u8")
        self._write(
            "INSERT INTO routing (node_id, n_blocks, n_experts, counts, tokens) VALUES (?,?,?,?,?) "
            "ON CONFLICT(node_id) DO UPDATE SET n_blocks=excluded.n_blocks, n_experts=excluded.n_experts, "
            "counts=excluded.counts, tokens=excluded.tokens",
            (node_id, counts.shape[0], counts.shape[1], counts.tobytes(), tokens))

    def routing(self, node_id: str = "") -> list[RoutingRecord]:
        """Stored histograms (of one node, or all), by node id."""
        sql = "SELECT node_id, n_blocks, n_experts, counts, tokens FROM routing"
        rows = (self._db.execute(sql + " WHERE node_id=?", (node_id,)) if node_id
                else self._db.execute(sql + " ORDER BY node_id")).fetchall()
        return [RoutingRecord(n, np.frombuffer(c, dtype="<u8").reshape(nb, ne).copy(), t)
                for n, nb, ne, c, t in rows]

    # --- soup-of-experts instantiations ----------------------------------------------------

    def set_soup(self, node_id: str, request: bytes) -> None:
        """Remember the last InstantiateSoupRequest (serialized) a node accepted."""
        self._write("INSERT INTO soup (node_id, request) VALUES (?,?) "
                    "ON CONFLICT(node_id) DO UPDATE SET request=excluded.request", (node_id, request))

    def get_soup(self, node_id: str) -> bytes | None:
        """The serialized InstantiateSoupRequest a node last accepted, if any."""
        row = self._db.execute("SELECT request FROM soup WHERE node_id=?", (node_id,)).fetchone()
        return None if row is None else bytes(row[0])

    # --- counters ----------------------------------------------------------------------------

    def save_traffic(self, rows: Iterable[tuple[str, int, str, int, int, int, int]]) -> None:
        """Replace the stored byte counters with ``rows`` (node, kind, user, sent, received, messages, payload)."""
        with self._db:
            self._db.execute("DELETE FROM traffic")
            self._db.executemany("INSERT INTO traffic VALUES (?,?,?,?,?,?,?)", list(rows))

    def load_traffic(self) -> list[tuple[str, pb.ByteKind.ValueType, str, int, int, int, int]]:
        """The stored byte counters."""
        return self._db.execute("SELECT * FROM traffic").fetchall()

    def save_counters(self, values: dict[str, int]) -> None:
        """Replace the stored named counters."""
        with self._db:
            self._db.execute("DELETE FROM counters")
            self._db.executemany("INSERT INTO counters VALUES (?, ?)", sorted(values.items()))

    def load_counters(self) -> dict[str, int]:
        """The stored named counters."""
        return dict(self._db.execute("SELECT name, value FROM counters").fetchall())
