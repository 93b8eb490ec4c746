"""Property-based fuzzing of request validation on a real coordinator (hypothesis).

Random ScoreRequest and GenerateRequest field values, and random bytes on the wire, must get only
the status codes docs/api.md documents for a client's request (never INTERNAL or UNKNOWN, which
would mean the server tripped over its own input), and the server must keep serving. Where the
documented rules decide the outcome alone, the exact code is checked too.

The bundle reader is fuzzed in tests/proto/test_bundle.py (arbitrary bytes, forged manifests,
every kind of corruption at any chunking).
"""

from __future__ import annotations

import re

import grpc
import pytest
from coordinator_harness import WORDS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_coordinator import LiveCoordinator, status_of

from proto import federation_pb2 as pb

C = grpc.StatusCode
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # the documented id syntax (proto comments)
# What a client's request may get from the coordinator (docs/api.md, "Status codes"), minus the
# transport-level ones a healthy loopback server never needs here (DEADLINE_EXCEEDED, CANCELLED).
DOCUMENTED = {C.OK, C.UNAUTHENTICATED, C.PERMISSION_DENIED, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION,
              C.RESOURCE_EXHAUSTED, C.UNAVAILABLE}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    live = LiveCoordinator(tmp_path_factory.mktemp("fuzz"), max_text_chars=400, max_new_tokens=16)
    live.add_node("n1", seed=1)
    live.add_node("n2", seed=2, model="programmer")
    live.add_user("alice", boost=2, node_id="n1")
    live.add_user("bob", boost=3, node_id="n1")
    live.add_user("carol")
    yield live
    assert live.alive()
    live.close()


chars = st.characters(blacklist_categories=("Cs",))  # protobuf strings are UTF-8: no lone surrogates
ids = st.one_of(st.sampled_from(["", "alice", "bob", "carol", "ghost", "n1", "n2"]), st.text(chars, max_size=70))
texts = st.one_of(st.lists(st.sampled_from(WORDS), max_size=60).map(" ".join), st.text(chars, max_size=450))
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
components = st.builds(pb.MixtureComponent, specialist=st.one_of(st.sampled_from(["", "base", "programmer"]), ids),
                       node_id=st.one_of(st.sampled_from(["", "n1", "n2"]), ids), adapter_user_id=ids)
mixtures = st.one_of(st.none(), st.builds(
    lambda comps, mode, prior: pb.MixtureSpec(components=comps, mode=mode, prior=prior),
    st.lists(components, max_size=18), st.integers(-2, 4), st.lists(floats, max_size=4)))
callers = st.sampled_from(["admin", "alice", "bob", "carol", "node", "forged", "none"])


def metadata(live, who: str):
    if who == "none":
        return ()
    if who == "forged":
        return (("authorization", "Bearer forged-token-0123456789"),)
    return live.meta(who)


def expected(who: str, user_id: str) -> grpc.StatusCode | None:
    """The code the documented rules alone decide (authentication first), else None."""
    if who in ("none", "forged"):
        return C.UNAUTHENTICATED
    if who == "node":
        return C.PERMISSION_DENIED
    if who == "admin" and user_id and not ID_RE.fullmatch(user_id):
        return C.INVALID_ARGUMENT
    return None


@FUZZ
@given(who=callers, user_id=ids, text=texts, use_base=st.booleans(), omit=st.booleans(), mixture=mixtures)
def test_random_score_requests_get_documented_codes(live, who, user_id, text, use_base, omit, mixture):
    request = pb.ScoreRequest(user_id=user_id, text=text, use_base=use_base, omit_token_strings=omit)
    if mixture is not None:
        request.mixture.CopyFrom(mixture)
    code = status_of(lambda: live.stub.Score(request, metadata=metadata(live, who), timeout=20))
    assert code in DOCUMENTED
    assert expected(who, user_id) in (None, code)


@FUZZ
@given(who=callers, user_id=ids, prompt=texts, max_new=st.one_of(st.integers(0, 20), st.integers(0, 2**32 - 1)),
       temperature=floats, top_k=st.one_of(st.integers(0, 20), st.integers(0, 2**32 - 1)),
       seed=st.integers(0, 2**64 - 1), use_base=st.booleans(), wire_top_k=st.integers(0, 40), mixture=mixtures)
def test_random_generate_requests_get_documented_codes(live, who, user_id, prompt, max_new, temperature, top_k, seed,
                                                       use_base, wire_top_k, mixture):
    request = pb.GenerateRequest(user_id=user_id, prompt=prompt, max_new_tokens=max_new, temperature=temperature,
                                 top_k=top_k, seed=seed, use_base=use_base, wire_top_k=wire_top_k)
    if mixture is not None:
        request.mixture.CopyFrom(mixture)
    code = status_of(lambda: live.stub.Generate(request, metadata=metadata(live, who), timeout=20))
    assert code in DOCUMENTED
    assert expected(who, user_id) in (None, code)
    if who == "admin" and not 1 <= max_new <= 16:  # the coordinator's max_new_tokens in this fixture
        assert code in (C.INVALID_ARGUMENT, C.NOT_FOUND)  # a bad id or an unknown user may be found first


@FUZZ
@given(method=st.sampled_from(["Score", "Generate", "GetAdapter", "ListUsers", "GetStats"]),
       data=st.binary(max_size=300), who=st.sampled_from(["admin", "alice"]))
def test_random_bytes_on_the_wire_get_documented_codes(live, method, data, who):
    path = f"/fractal.federation.v1.Federation/{method}"
    make = live.channel.unary_stream if method == "Generate" else live.channel.unary_unary
    code = status_of(lambda: make(path)(data, metadata=live.meta(who), timeout=20))
    assert code in DOCUMENTED


def test_the_server_survived_the_fuzzing(live):
    assert live.alive()
    users = live.stub.ListUsers(pb.ListUsersRequest(), metadata=live.meta("admin")).users
    assert sorted(u.user_id for u in users) == ["alice", "bob", "carol"]
