"""Space IDs: one type and one validator for the rule every part of memspace applies."""

from __future__ import annotations

import re
from typing import NewType

SpaceId = NewType("SpaceId", str)

MIN_LENGTH = 3
MAX_LENGTH = 63
DEFAULT_SPACE = SpaceId("default")

_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_RULE = (
    f"{MIN_LENGTH} to {MAX_LENGTH} characters of lower-case letters, digits and '-', "
    "starting and ending with a letter or digit"
)


class InvalidSpaceIdError(ValueError):
    """A string that is not a valid space ID; the message says why and what is allowed."""


def parse_space_id(value: str) -> SpaceId:
    """Return `value` as a SpaceId, or raise InvalidSpaceIdError saying what is wrong."""
    if not isinstance(value, str):
        raise InvalidSpaceIdError(f"space ID must be a string, got {type(value).__name__}")
    shown = value if len(value) <= 80 else value[:77] + "..."
    if not MIN_LENGTH <= len(value) <= MAX_LENGTH:
        raise InvalidSpaceIdError(
            f"invalid space ID {shown!r}: length {len(value)}; a space ID is {_RULE}"
        )
    if _PATTERN.fullmatch(value) is None:
        raise InvalidSpaceIdError(f"invalid space ID {shown!r}: a space ID is {_RULE}")
    return SpaceId(value)


def is_valid_space_id(value: str) -> bool:
    try:
        parse_space_id(value)
    except InvalidSpaceIdError:
        return False
    return True
