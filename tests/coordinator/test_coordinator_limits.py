"""Request validation: each bad input gets INVALID_ARGUMENT with a message; good input passes."""

from __future__ import annotations

import math

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.limits import (
    RequestError,
    check_bundle_name,
    check_enum,
    check_float,
    check_id,
    check_int,
    check_prior,
    check_text,
    check_token_count,
)


def _invalid(fn, *args, **kwargs) -> str:
    with pytest.raises(RequestError) as err:
        fn(*args, **kwargs)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "\n" not in err.value.message
    return err.value.message


@given(st.text(max_size=80))
def test_check_id_accepts_exactly_the_documented_pattern(value):
    ok = (1 <= len(value) <= 64 and value[0].isascii() and value[0].isalnum()
          and all(c.isascii() and (c.isalnum() or c in "._-") for c in value))
    if ok:
        assert check_id(value, "user_id") == value
    else:
        _invalid(check_id, value, "user_id")


@pytest.mark.parametrize("bad", ["../x", "a/b", "a\n", "", "-lead", "x" * 65, "a b", "é"])
def test_bad_ids(bad):
    assert "user_id" in _invalid(check_id, bad, "user_id")


def test_ids_may_be_empty_only_when_allowed():
    assert check_id("", "x", allow_empty=True) == ""
    _invalid(check_bundle_name, "../../etc/passwd")
    assert check_bundle_name("base.int8-v1") == "base.int8-v1"


def test_text_floats_ints_enums_priors():
    assert "empty" in _invalid(check_text, "", "text", 10)
    assert "limit is 10" in _invalid(check_text, "x" * 11, "text", 10)
    assert check_text("x" * 10, "text", 10)
    for bad in (math.nan, math.inf, -math.inf):
        assert "finite" in _invalid(check_float, bad, "temperature", 0, 10)
    _invalid(check_float, 10.5, "temperature", 0, 10)
    _invalid(check_int, 0, "max_new_tokens", 1, 5)
    _invalid(check_enum, 7, "mode", (0, 1, 2))
    assert check_prior([], 3) is None
    _invalid(check_prior, [1.0, 2.0], 3)
    _invalid(check_prior, [1.0, math.nan], 2)
    _invalid(check_prior, [1.0, 0.0], 2)
    assert "at least 2" in _invalid(check_token_count, 1, 100)
    assert "limit is 100" in _invalid(check_token_count, 101, 100)
