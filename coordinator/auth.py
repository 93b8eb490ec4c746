"""Bearer-token authentication and access rules; optional TLS credentials.

Three kinds of token: per-user tokens (the coordinator stores only their SHA-256), the node token
(NodeControl), the admin token (everything on Federation). Every comparison of secret material
uses :func:`hmac.compare_digest`. Tokens travel as ``authorization: Bearer <token>`` metadata, read
by :func:`proto.auth_metadata.parse_bearer`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from proto.auth_metadata import BearerError, parse_bearer

from .limits import RequestError, attribute_call


class Role(enum.Enum):
    """What a token is."""

    ADMIN = "admin"
    USER = "user"
    NODE = "node"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: a role, and the user id for a user token."""

    role: Role
    user_id: str = ""

    @property
    def is_admin(self) -> bool:
        """True for the admin token."""
        return self.role is Role.ADMIN


def new_token() -> str:
    """A fresh random bearer token (256 bits) that never starts with "-": one in 64 URL-safe tokens
    would, and a command line such as ``--token -x...`` reads it as an option."""
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


def hash_token(token: str) -> bytes:
    """SHA-256 of a token: what the registry stores. Tokens are random, so no slow KDF is needed."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def _unauthenticated(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.UNAUTHENTICATED, message)


def _denied(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.PERMISSION_DENIED, message)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of the ``authorization: Bearer <token>`` metadata entry, else UNAUTHENTICATED."""
    try:
        return parse_bearer(metadata)
    except BearerError as err:
        raise _unauthenticated(str(err)) from None


class Authenticator:
    """Turns request metadata into a :class:`Principal` and enforces who reaches what.

    ``user_for_token_hash`` maps a token's SHA-256 to a user id (or None): the registry's lookup.
    """

    def __init__(self, admin_token: str, node_token: str, user_for_token_hash: Callable[[bytes], str | None]) -> None:
        self._admin = hash_token(admin_token)
        self._node = hash_token(node_token)
        self._lookup = user_for_token_hash

    def authenticate(self, metadata) -> Principal:
        """The caller behind ``metadata``; UNAUTHENTICATED for a missing, malformed or unknown token."""
        digest = hash_token(bearer_token(metadata))
        # Both fixed tokens are always compared, so timing does not say which one nearly matched.
        is_admin = hmac.compare_digest(digest, self._admin)
        is_node = hmac.compare_digest(digest, self._node)
        if is_admin:
            return Principal(Role.ADMIN)
        if is_node:
            return Principal(Role.NODE)
        user_id = self._lookup(digest)
        if user_id is None:
            raise _unauthenticated("invalid token")
        return Principal(Role.USER, user_id)

    def client(self, metadata) -> Principal:
        """A Federation caller: a user or the admin (the node token is refused). A user token's
        call counts as one of that user's requests (:func:`coordinator.limits.attribute_call`)."""
        principal = self.authenticate(metadata)
        if principal.role is Role.NODE:
            raise _denied("the node token does not reach the Federation service")
        attribute_call(principal.user_id)
        return principal

    def user_of(self, metadata) -> str:
        """The user whose token ``metadata`` carries, "" for any other (or no valid) token."""
        try:
            principal = self.authenticate(metadata)
        except RequestError:
            return ""
        return principal.user_id

    def admin(self, metadata) -> Principal:
        """The admin, else PERMISSION_DENIED (UNAUTHENTICATED for a bad token)."""
        principal = self.authenticate(metadata)
        if not principal.is_admin:
            raise _denied("this RPC needs the admin token")
        return principal

    def node(self, metadata) -> Principal:
        """A node (node token), else PERMISSION_DENIED (UNAUTHENTICATED for a bad token)."""
        principal = self.authenticate(metadata)
        if principal.role is not Role.NODE:
            raise _denied("NodeControl needs the node token")
        return principal


def require_user_access(principal: Principal, user_id: str) -> None:
    """A user token reaches only its own user; the admin reaches every user."""
    if principal.is_admin:
        return
    if principal.role is not Role.USER or not hmac.compare_digest(principal.user_id.encode(), user_id.encode()):
        raise _denied(f"this token does not reach user {user_id!r}")


def server_credentials(cert_path: Path, key_path: Path) -> grpc.ServerCredentials:
    """TLS credentials for the coordinator from PEM files."""
    return grpc.ssl_server_credentials([(Path(key_path).read_bytes(), Path(cert_path).read_bytes())])
