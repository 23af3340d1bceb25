"""The change feed of one space: events in LSN order to bounded subscriber buffers.

A subscriber that falls a whole buffer behind is cut off with SubscriberTooSlowError naming the
LSN to resume from, so a slow reader costs a bounded amount of memory and never slows writers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
from collections.abc import AsyncIterator, Iterable

from memspace_server import errors


class EventType(enum.Enum):
    REMEMBERED = 1
    FORGOTTEN = 2


@dataclasses.dataclass(frozen=True)
class Event:
    type: EventType
    id: str
    lsn: int
    at: float


class Subscription:
    def __init__(self, feed: Feed, buffer: int, skip_through: int) -> None:
        self._feed = feed
        self._buffer = buffer
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._skip_through = skip_through
        self._overflow_lsn: int | None = None
        self._last = skip_through
        self.closed = False

    def offer(self, events: list[Event]) -> None:
        """Queue one group commit's events. A subscriber is cut off when it is already more than
        its buffer behind, so at most buffer + one group commit's events ever wait for it, and a
        reader that keeps up is never cut off by a large batch."""
        if self._overflow_lsn is not None:
            return
        fresh = [e for e in events if e.lsn > self._skip_through]
        if not fresh:
            return
        if self._queue.qsize() > self._buffer:
            self._overflow_lsn = fresh[0].lsn
            return
        for event in fresh:
            self._queue.put_nowait(event)

    @property
    def buffer(self) -> int:
        return self._buffer

    async def live(self) -> AsyncIterator[Event]:
        while True:
            if self._queue.empty():
                if self._overflow_lsn is not None:
                    raise errors.SubscriberTooSlowError(
                        "the subscriber fell behind its buffer of "
                        f"{self._buffer} events; resubscribe with since_lsn="
                        f"{self._last + 1} to resume",
                        resume_lsn=self._last + 1,
                    )
                if self.closed:
                    return
            event = await self._queue.get()
            if event.lsn == 0:  # the feed closing
                return
            self._last = event.lsn
            yield event

    def note_replayed(self, lsn: int) -> None:
        self._last = max(self._last, lsn)

    def close(self) -> None:
        self._feed.remove(self)


class Feed:
    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()

    def __len__(self) -> int:
        return len(self._subscribers)

    def publish(self, events: Iterable[Event]) -> None:
        batch = list(events)
        for subscriber in list(self._subscribers):
            subscriber.offer(batch)

    def subscribe(self, buffer: int, skip_through: int) -> Subscription:
        subscription = Subscription(self, buffer, skip_through)
        self._subscribers.add(subscription)
        return subscription

    def remove(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def close(self) -> None:
        """End every subscription: their streams finish after what they already hold."""
        for subscriber in list(self._subscribers):
            subscriber.closed = True
            with contextlib.suppress(asyncio.QueueFull):
                subscriber._queue.put_nowait(Event(EventType.REMEMBERED, "", 0, 0.0))
        self._subscribers.clear()
