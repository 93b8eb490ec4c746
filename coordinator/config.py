"""The coordinator's configuration: one keyword-only, validated, frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from proto.message_limits import MAX_MESSAGE_BYTES, MIB

KIB = 1024


class CoordinatorConfigError(ValueError):
    """A coordinator setting is invalid; the message names the setting."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise CoordinatorConfigError(message)


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig:
    """Everything `serve` needs. Paths are created if missing; port 0 binds a free port."""

    db_path: Path
    bundle_dir: Path
    admin_token: str
    node_token: str
    host: str = "127.0.0.1"
    port: int = 0
    tokenizer_path: Path | None = None
    # The tokenizer's beginning-of-sequence token, prepended so that the first token of a text is
    # scored too; None scores every token after the first (as model.evaluate.token_logps does).
    bos_token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # PEM CA certificate(s) that nodes' certificates chain to: the coordinator then calls every node
    # over TLS (and reaches no plaintext node). None: plaintext calls to nodes.
    node_tls_ca: Path | None = None
    chunk_size: int = MIB  # FetchBundle's chunks (1 MiB ships 15-30% faster than 256 KiB: docs/performance.md)
    # Bundles shipped from memory, up to this many bytes held (least recently shipped dropped first);
    # a bundle over it is read from its file per chunk. 0: always from the file.
    bundle_memory_bytes: int = 512 * MIB
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # Cap on concurrent client (Federation) RPCs; excess is shed with RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 64
    # Separate cap for node traffic, so a client flood never starves heartbeats and bundle fetches.
    max_concurrent_node_rpcs: int = 256
    max_text_chars: int = 32_768
    max_tokens: int = 4_096
    max_new_tokens: int = 512
    max_mixture_components: int = 16
    # Upper bound on any one call to a node; the client's own deadline is used when it is sooner.
    node_timeout_s: float = 30.0
    heartbeat_interval_ms: int = 2_000
    missed_heartbeats: int = 3
    # How many other nodes a request tries when its node is down.
    max_failover: int = 2
    # Seconds between writes of the byte counters to the database (they are also written on stop).
    flush_interval_s: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "db_path", Path(self.db_path))
        object.__setattr__(self, "bundle_dir", Path(self.bundle_dir))
        for name in ("tokenizer_path", "tls_cert", "tls_key", "node_tls_ca"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        _require(len(self.admin_token) >= 16, "admin_token must have at least 16 characters")
        _require(len(self.node_token) >= 16, "node_token must have at least 16 characters")
        _require(self.admin_token != self.node_token, "admin_token and node_token must differ")
        _require(0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}")
        _require((self.tls_cert is None) == (self.tls_key is None), "tls_cert and tls_key go together")
        _require(self.bos_token is None or self.bos_token != "", "bos_token must be None or non-empty")
        _require(4 * KIB <= self.chunk_size <= 16 * MIB, f"chunk_size must be 4 KiB..16 MiB, got {self.chunk_size}")
        _require(self.bundle_memory_bytes >= 0, f"bundle_memory_bytes must be >= 0, got {self.bundle_memory_bytes}")
        _require(self.max_message_bytes >= self.chunk_size + 64 * KIB,
                 "max_message_bytes must exceed chunk_size by at least 64 KiB (chunk headers)")
        for name in ("max_concurrent_rpcs", "max_concurrent_node_rpcs", "max_text_chars", "max_new_tokens",
                     "max_mixture_components", "heartbeat_interval_ms", "missed_heartbeats"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _require(self.max_tokens >= 2, f"max_tokens must be >= 2, got {self.max_tokens}")
        _require(self.max_failover >= 0, f"max_failover must be >= 0, got {self.max_failover}")
        _require(self.node_timeout_s > 0, f"node_timeout_s must be > 0, got {self.node_timeout_s}")
        _require(self.flush_interval_s > 0, f"flush_interval_s must be > 0, got {self.flush_interval_s}")

    @property
    def heartbeat_timeout_ms(self) -> int:
        """A node silent for this long is marked DOWN."""
        return self.heartbeat_interval_ms * self.missed_heartbeats
