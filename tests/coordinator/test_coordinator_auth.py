"""Tokens: parsing, roles, who reaches what (unit level; the gRPC matrix is in test_server)."""

from __future__ import annotations

import grpc
import pytest

from coordinator.auth import Authenticator, Role, bearer_token, hash_token, new_token, require_user_access
from coordinator.limits import RequestError

ADMIN, NODE = "a" * 20, "n" * 20


def _auth(users=None):
    users = {hash_token(t): u for u, t in (users or {}).items()}
    return Authenticator(ADMIN, NODE, users.get)


def _code(fn, *args):
    with pytest.raises(RequestError) as err:
        fn(*args)
    return err.value.code


@pytest.mark.parametrize("metadata", [
    (), (("x-other", "1"),), (("authorization", "Basic abc"),), (("authorization", "Bearer"),),
    (("authorization", "Bearer "),), (("authorization", "Bearer a"), ("authorization", "Bearer b")),
    (("authorization", "Bearer " + "t" * 600),),
])
def test_malformed_authorization_is_unauthenticated(metadata):
    assert _code(bearer_token, metadata) == grpc.StatusCode.UNAUTHENTICATED


def test_roles_and_access():
    alice = new_token()
    auth = _auth({"alice": alice})
    assert auth.authenticate((("authorization", f"Bearer {ADMIN}"),)).role is Role.ADMIN
    assert auth.authenticate((("authorization", f"bearer {NODE}"),)).role is Role.NODE
    p = auth.authenticate((("authorization", f"Bearer {alice}"),))
    assert (p.role, p.user_id) == (Role.USER, "alice")
    assert _code(auth.authenticate, (("authorization", "Bearer forged-token"),)) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(auth.admin, (("authorization", f"Bearer {alice}"),)) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(auth.node, (("authorization", f"Bearer {ADMIN}"),)) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(auth.client, (("authorization", f"Bearer {NODE}"),)) == grpc.StatusCode.PERMISSION_DENIED
    require_user_access(p, "alice")
    assert _code(require_user_access, p, "bob") == grpc.StatusCode.PERMISSION_DENIED
    require_user_access(auth.admin((("authorization", f"Bearer {ADMIN}"),)), "bob")


def test_tokens_are_random_and_stored_hashed():
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100 and all(len(t) >= 40 for t in tokens)
    assert hash_token("x") != hash_token("y") and len(hash_token("x")) == 32


def test_no_token_reads_as_a_command_line_option():
    """`coordinator.client --token TOKEN` parses TOKEN as an option when it starts with "-" (1 in 64
    URL-safe tokens did: the client CLI test failed on such a draw)."""
    assert not any(new_token().startswith("-") for _ in range(3000))  # ~47 would, by chance alone
