"""The one space ID rule, applied everywhere: 3..63 characters, a DNS label."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memspace_contract import spaces


@pytest.mark.parametrize("value", ["abc", "team-a", "a1b", "0-9", "x" * 63, "default"])
def test_valid_space_ids_are_accepted(value: str) -> None:
    assert spaces.parse_space_id(value) == value


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("ab", "length 2"),
        ("x" * 64, "length 64"),
        ("-abc", "starting and ending"),
        ("abc-", "starting and ending"),
        ("Team", "lower-case"),
        ("a_b_c", "lower-case"),
        ("a.b.c", "lower-case"),
        ("abc\n", "lower-case"),
        ("", "length 0"),
    ],
)
def test_invalid_space_ids_say_what_is_wrong(value: str, why: str) -> None:
    with pytest.raises(spaces.InvalidSpaceIdError, match=why):
        spaces.parse_space_id(value)


# No per-example deadline: a loaded machine can pause any example past hypothesis's 200 ms, which
# it reports as a flaky test.
@settings(deadline=None)
@given(st.text(max_size=80))
def test_the_validator_agrees_with_the_dns_label_rule(value: str) -> None:
    expected = (
        3 <= len(value) <= 63
        and all(c in "abcdefghijklmnopqrstuvwxyz0123456789-" for c in value)
        and value[0] != "-"
        and value[-1] != "-"
    )
    assert spaces.is_valid_space_id(value) == expected
