"""The event loop the server runs on (`memspace serve --event-loop`)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run(kind: str, main: Coroutine[Any, Any, int]) -> int:
    """Run `main` to its end on a new event loop of `kind` ('uvloop' or 'asyncio')."""
    if kind == "uvloop":
        import uvloop  # noqa: PLC0415  # imported only when chosen

        return uvloop.run(main)
    return asyncio.run(main)


def running() -> str:
    """'uvloop' or 'asyncio': the kind of the event loop running the caller."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.partition(".")[0] == "uvloop" else "asyncio"
