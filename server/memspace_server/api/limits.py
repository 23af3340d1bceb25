"""Caps on what clients can hold at once: calls and streams in flight on the whole server, calls
and Subscribe streams on one space. The edge admits every call after routing it and releases it
when the call ends; a call over a cap is refused at once with RESOURCE_EXHAUSTED naming the cap,
before it allocates anything of its own. (Bytes a RememberBatch stream may carry and a Recall
may answer are bounded where they are counted: `servicers`.)"""

from __future__ import annotations

import collections
import dataclasses
import enum

from memspace_server import errors


class Shape(enum.Enum):
    UNARY = "unary"
    CLIENT_STREAM = "client stream"
    """RememberBatch: counts as a call on its space and as a stream on the server."""
    SERVER_STREAM = "server stream"
    """Subscribe: counts as a subscriber of its space and as a stream on the server."""


@dataclasses.dataclass(frozen=True)
class Caps:
    calls: int
    """Calls in flight on the server, of every shape (--max-calls)."""
    streams: int
    """Streaming calls in flight on the server (--max-streams)."""
    calls_per_space: int
    """Unary calls and RememberBatch streams in flight on one space (--max-calls-per-space)."""
    subscribers_per_space: int
    """Subscribe streams open on one space (--max-subscribers-per-space)."""


@dataclasses.dataclass
class Ticket:
    """An admitted call; `release` it exactly once when the call ends."""

    limits: Limits
    shape: Shape
    space: str | None
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limits._release(self)


class Limits:
    """Counts of admitted calls (event-loop only: no locking)."""

    def __init__(self, caps: Caps) -> None:
        self.caps = caps
        self.calls = 0
        self.streams = 0
        self._space_calls: collections.Counter[str] = collections.Counter()
        self._subscribers: collections.Counter[str] = collections.Counter()

    def admit(self, shape: Shape, space: str | None) -> Ticket:
        caps = self.caps
        streaming = shape is not Shape.UNARY
        if self.calls >= caps.calls:
            raise errors.LimitReachedError(
                f"the server is handling its maximum of {caps.calls} concurrent calls "
                "(--max-calls); retry shortly"
            )
        if streaming and self.streams >= caps.streams:
            raise errors.LimitReachedError(
                f"the server holds its maximum of {caps.streams} open streams (--max-streams); "
                "retry shortly, or close streams you no longer read"
            )
        if space is not None:
            if shape is Shape.SERVER_STREAM:
                if self._subscribers[space] >= caps.subscribers_per_space:
                    raise errors.LimitReachedError(
                        f"space {space!r} has its maximum of {caps.subscribers_per_space} open "
                        "Subscribe streams (--max-subscribers-per-space); close one first"
                    )
                self._subscribers[space] += 1
            else:
                if self._space_calls[space] >= caps.calls_per_space:
                    raise errors.LimitReachedError(
                        f"space {space!r} has its maximum of {caps.calls_per_space} calls in "
                        "flight (--max-calls-per-space); retry shortly, or make fewer calls at "
                        "once"
                    )
                self._space_calls[space] += 1
        self.calls += 1
        if streaming:
            self.streams += 1
        return Ticket(self, shape, space)

    def _release(self, ticket: Ticket) -> None:
        self.calls -= 1
        if ticket.shape is not Shape.UNARY:
            self.streams -= 1
        if ticket.space is not None:
            counts = self._subscribers if ticket.shape is Shape.SERVER_STREAM else self._space_calls
            counts[ticket.space] -= 1
            if counts[ticket.space] <= 0:
                del counts[ticket.space]
