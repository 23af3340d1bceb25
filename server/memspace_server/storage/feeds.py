"""The change feed of one space: events in LSN order to bounded subscriber buffers.

A subscriber that falls a whole buffer behind is cut off with SubscriberTooSlowError naming the
LSN to resume from, so a slow reader costs a bounded amount of memory and never slows writers.
A group commit hands its events to each subscriber as one batch (its cost grows with the
subscribers, not with subscribers times events), and the server's subscribers send through a
few turns of a shared `Pacer`. A stream waiting for events is woken only once the pacer has a
turn for it: one batch to a thousand subscribers queues a few steps on the event loop, not a
thousand, so another space's requests never wait behind more than a few sends."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import time
from collections.abc import AsyncIterator, Iterable, Sequence

from memspace_contract.wire import Lsn
from memspace_server import errors, queueing


class EventType(enum.Enum):
    REMEMBERED = 1
    FORGOTTEN = 2


@dataclasses.dataclass(frozen=True)
class Event:
    type: EventType
    id: str
    lsn: Lsn
    at: float


@dataclasses.dataclass(frozen=True)
class Run:
    """The events of one write whose records have consecutive LSNs, kept as its IDs: they
    become `Event`s only if someone subscribes (`Feed.publish`), so a write to a space nobody
    follows builds no object per memory."""

    type: EventType
    ids: Sequence[str]
    first_lsn: int
    at: float

    def events(self) -> list[Event]:
        kind, at = self.type, self.at
        return [Event(kind, i, Lsn(lsn), at) for lsn, i in enumerate(self.ids, self.first_lsn)]


Published = Event | Run
"""What a write hands the feed: single events or runs of them."""


class Pacer:
    """Turns to send one event, `slots` at a time across the server, handed out in arrival
    order. A turn is held from before a subscriber yields an event until it is asked for the
    next one; a turn held longer than `hold_s` (a reader whose transport is full) is taken back,
    so stalled readers cannot keep the others waiting.

    While `activity` shows other spaces asking for work beside the subscribed ones, only
    `shared_slots` turns are out at once: a fan-out then queues at most that many sends ahead of
    each step of another space's call."""

    def __init__(
        self,
        slots: int = 8,
        hold_s: float = 0.05,
        shared_slots: int | None = None,
        activity: queueing.Activity | None = None,
    ) -> None:
        if slots < 1 or (shared_slots is not None and shared_slots < 1):
            raise ValueError("a pacer needs at least one slot")
        self.slots = slots
        self.shared_slots = slots if shared_slots is None else min(slots, shared_slots)
        self.hold_s = hold_s
        self.activity = activity
        self._held: dict[int, float] = {}
        self._next = 0
        self._waiters: collections.deque[asyncio.Future[int | None]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def held(self) -> int:
        return len(self._held)

    def note(self, space: str | None) -> None:
        """`space` is sending: it counts among the spaces asking for work."""
        if self.activity is not None and space is not None:
            self.activity.note(space)

    def _room(self) -> bool:
        held = len(self._held)
        if held < self.shared_slots:
            return True
        if held >= self.slots:
            return False
        return self.activity is None or not self.activity.shared()

    async def acquire(self) -> int:
        if not self._waiters and self._room():
            return self._grant()
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.enqueue(future)
        try:
            token = await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result())
            else:
                future.cancel()
            raise
        assert token is not None
        return token

    def enqueue(self, future: asyncio.Future[int | None]) -> None:
        """Give `future` a turn (its result is the token) now if one is free, else in arrival
        order; a future done meanwhile (cancelled, or woken for another reason) is skipped."""
        if not self._waiters and self._room():
            future.set_result(self._grant())
            return
        self._waiters.append(future)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.hold_s, self._expire)

    def _grant(self) -> int:
        token = self._next
        self._next += 1
        self._held[token] = time.monotonic()
        return token

    def release(self, token: int | None) -> None:
        if token is None or self._held.pop(token, None) is None:
            return  # taken back already
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._room():
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(self._grant())

    def _expire(self) -> None:
        self._timer = None
        horizon = time.monotonic() - self.hold_s
        for token, since in list(self._held.items()):
            if since <= horizon:
                del self._held[token]
        self._wake()
        if self._waiters:
            self._timer = asyncio.get_running_loop().call_later(self.hold_s, self._expire)


class Subscription:
    def __init__(self, feed: Feed, buffer: int, skip_through: int) -> None:
        self._feed = feed
        self._buffer = buffer
        self._batches: collections.deque[list[Event]] = collections.deque()
        self._pending = 0
        # Set while the stream waits for events: offered events queue it for a turn to send.
        self._parked: asyncio.Future[int | None] | None = None
        self._skip_through = skip_through
        self._overflow_lsn: int | None = None
        self._last = skip_through
        self.closed = False

    def offer(self, events: list[Event]) -> None:
        """Queue one group commit's events. A subscriber is cut off when it is already more than
        its buffer behind, so at most buffer + one group commit's events ever wait for it, and a
        reader that keeps up is never cut off by a large batch."""
        if self._overflow_lsn is not None or not events:
            return
        if events[0].lsn <= self._skip_through:
            events = [e for e in events if e.lsn > self._skip_through]
            if not events:
                return
        if self._pending > self._buffer:
            self._overflow_lsn = events[0].lsn
            self._rouse()
            return
        self._batches.append(events)
        self._pending += len(events)
        parked, self._parked = self._parked, None
        if parked is not None and not parked.done():
            # Woken only once it has a turn to send: a batch to a thousand subscribers wakes
            # a few streams at a time, not a thousand tasks in one step of the loop.
            self._feed.pacer.enqueue(parked)

    def _rouse(self) -> None:
        """Wake a parked stream without a turn (it ends, or reports it fell behind)."""
        parked, self._parked = self._parked, None
        if parked is not None and not parked.done():
            parked.set_result(None)

    @property
    def buffer(self) -> int:
        return self._buffer

    async def live(self) -> AsyncIterator[Event]:
        pacer = self._feed.pacer
        turn: int | None = None  # a turn granted while parked, not used yet
        try:
            while True:
                if not self._batches:
                    pacer.release(turn)
                    turn = None
                    if self._overflow_lsn is not None:
                        raise errors.SubscriberTooSlowError(
                            "the subscriber fell behind its buffer of "
                            f"{self._buffer} events; resubscribe with since_lsn="
                            f"{self._last + 1} to resume",
                            resume_lsn=self._last + 1,
                        )
                    if self.closed:
                        return
                    turn = await self._park()
                    continue
                batch = self._batches.popleft()
                space = self._feed.space
                for event in batch:
                    pacer.note(space)
                    if turn is None:
                        turn = await pacer.acquire()
                    try:
                        self._pending -= 1
                        self._last = event.lsn
                        yield event
                    finally:
                        pacer.release(turn)
                        turn = None
        finally:
            pacer.release(turn)

    async def _park(self) -> int | None:
        """Wait for events: the turn to send the first of them (None when woken to end)."""
        parked: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._parked = parked
        try:
            return await parked
        except asyncio.CancelledError:
            if parked.done() and not parked.cancelled():
                self._feed.pacer.release(parked.result())
            else:
                parked.cancel()  # the pacer skips it
            raise
        finally:
            if self._parked is parked:
                self._parked = None

    def note_replayed(self, lsn: int) -> None:
        self._last = max(self._last, lsn)

    def close(self) -> None:
        self._feed.remove(self)

    def end(self) -> None:
        """Finish the stream after what it already holds."""
        self.closed = True
        self._rouse()


class Feed:
    def __init__(self, pacer: Pacer | None = None, space: str | None = None) -> None:
        self._subscribers: set[Subscription] = set()
        self.pacer = pacer or Pacer()
        self.space = space

    def __len__(self) -> int:
        return len(self._subscribers)

    def publish(self, events: Iterable[Published]) -> None:
        if not self._subscribers:
            return
        self.pacer.note(self.space)
        batch: list[Event] = []
        for item in events:
            if isinstance(item, Run):
                batch.extend(item.events())
            else:
                batch.append(item)
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
            subscriber.end()
        self._subscribers.clear()
