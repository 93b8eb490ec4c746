"""How a bearer token travels in gRPC metadata: ``authorization: Bearer <token>``.

Clients, nodes and the coordinator build their call metadata with :func:`bearer_metadata`; the
coordinator reads its callers' tokens with :func:`parse_bearer`; a node compares its caller's
entry with :func:`bearer_value` of its node token.

Dependency rule: this module imports nothing else of ours.
"""

from __future__ import annotations

from collections.abc import Iterable

AUTH_HEADER = "authorization"  # gRPC metadata keys are lower case
BEARER_SCHEME = "Bearer"
MAX_TOKEN_CHARS = 512


class BearerError(ValueError):
    """Metadata that does not carry exactly one well-formed bearer token (the message says why)."""


def bearer_value(token: str) -> str:
    """The ``authorization`` value presenting ``token``."""
    return f"{BEARER_SCHEME} {token}"


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata presenting ``token``."""
    return ((AUTH_HEADER, bearer_value(token)),)


def auth_entries(metadata: Iterable[tuple[str, str | bytes]] | None) -> list[tuple[str, str | bytes]]:
    """The ``authorization`` entries of ``metadata`` (what a proxy forwards)."""
    return [(k, v) for k, v in (metadata or ()) if k.lower() == AUTH_HEADER]


def parse_bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of the one ``authorization: Bearer <token>`` entry of ``metadata``.

    The scheme is case-insensitive and surrounding blanks are ignored; no entry, two entries,
    another scheme, an empty token or one over :data:`MAX_TOKEN_CHARS` raise :class:`BearerError`.
    """
    values = [v for _, v in auth_entries(metadata)]
    if not values:
        raise BearerError(f"missing '{AUTH_HEADER}: {BEARER_SCHEME} <token>' metadata")
    if len(values) > 1:
        raise BearerError(f"more than one {AUTH_HEADER} header")
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != BEARER_SCHEME.lower() or not token:
        raise BearerError(f"{AUTH_HEADER} metadata must be '{BEARER_SCHEME} <token>'")
    if len(token) > MAX_TOKEN_CHARS:
        raise BearerError("token too long")
    return token
