"""Fair shares of the event loop between spaces: turns for unary calls.

Every unary call runs on the one event loop, so a space whose clients keep many calls in flight
(a flood that ignores RESOURCE_EXHAUSTED, say) would take most of the loop's steps and make
another space's call wait behind all of its own. So while more than one space has asked for
work in the last `window_s` seconds (`queueing.Activity`, shared with the scan threads and the
Subscribe fan-out), the edge works on at most `per_space` unary calls of each space at once; a
space's calls beyond them wait in that space's own queue (already received, routed and admitted
under the caps of `limits`) and start in arrival order as its calls finish. A quiet space's call
starts at once, beside at most `per_space` calls of each flooding space however many those have
sent, and a flood's share of the loop does not grow with how hard its clients push. A space
alone on the server is not held back: its clients get all the concurrency they ask for.

A call refused for its space's rate quota (RESOURCE_EXHAUSTED with a retry-after) is answered
at once, but while spaces share the loop its turn stays taken until the retry-after, at least
`REFUSED_HOLD_S`: a client that ignores the refusal and calls again at once waits in its own
space's queue, and its refusals cannot become a flood of cheap calls that another space waits
behind. A client that backs off as told never notices.

A space that keeps more calls coming than its turns (calls wait in its queue) is also held to a
share of the time while spaces share the loop: its calls may be at work at most `share` of the
time (a credit of work time that fills at `share` seconds a second, up to `burst_s`, and drains
while any of its calls is at work); once it is spent, the space's next call waits until the
credit has room again. Turns bound how many of a flood's calls the loop works on at once, but a
flood with its turns always taken still keeps the loop busy all the time, and a quiet space's
call, arriving at any moment, waits behind whatever step of the flood the loop is on: a loop
free part of the time is what lets it start at once. A client that calls one at a time (or
within its turns) never waits in the queue and is never held, however long its calls take; a
space alone is never held.

Streams (RememberBatch, Subscribe) do not take turns: they hold their call for long waits on
their client, and their own caps bound them (`limits`); Subscribe fan-out is paced by the
storage engine (`feeds.Pacer`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from memspace_server import queueing

WINDOW_S = queueing.WINDOW_S

REFUSED_HOLD_S = 0.1
"""The least time a turn stays taken after its call was refused for the space's rate, while
spaces share the loop: with 2 turns, a flood that ignores refusals gets at most 20 refusals a
second worked on (a retry-after is usually shorter: 10 ms at 100 writes per second)."""

REFUSED_HOLD_MAX_S = 2.0
"""The most: a long retry-after (a large batch's debt) does not hold a space's turns for long."""

SHARE = 0.5
"""The part of the time a space with calls waiting may have calls at work while spaces share."""

BURST_S = 0.05
"""Work time a space may take at once before its share holds it (a space that has not called
for a while starts with this much)."""

PRUNE_EVERY = 1024
"""Calls started or ended between two sweeps of the credits of spaces that stopped calling."""

MAX_DEBT_S = 1.0
"""The most work time a space can owe: a very long call (a cold scan) holds its space's next
calls for at most `MAX_DEBT_S / share` after it."""


class Turns(queueing.FairQueue):
    """Unary calls at work per space, with the ones beyond `per_space` queued while spaces share
    the loop (event loop only: no locking)."""

    def __init__(
        self,
        per_space: int,
        window_s: float = WINDOW_S,
        activity: queueing.Activity | None = None,
        *,
        share: float = SHARE,
        burst_s: float = BURST_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_space < 1:
            raise ValueError("turns need at least one call at work per space")
        if not 0 < share <= 1 or burst_s < 0:
            raise ValueError("a share of time is above 0 and at most 1, its burst at least 0")
        self._activity = activity or queueing.Activity(window_s)
        super().__init__(per_space, alone=math.inf, activity=self._activity)
        self.share = share
        self.burst_s = burst_s
        self._clock = clock
        # Work-time credit of the spaces counted lately, as (seconds, when counted); a space
        # not here has a full burst.
        self._credit: dict[str, tuple[float, float]] = {}
        self._counted = 0
        self._wake: asyncio.TimerHandle | None = None
        self._wake_at = math.inf

    @property
    def window_s(self) -> float:
        return self._activity.window_s

    @window_s.setter
    def window_s(self, seconds: float) -> None:
        self._activity.window_s = seconds

    def working_on(self, space: str) -> int:
        return self.running(space)

    async def enter(self, space: str) -> bool:
        """Return once the call may start (whether it waited for a turn or for its space's
        share of time); `leave(space)` exactly once after that."""
        return await self.acquire(space)

    def leave(self, space: str) -> None:
        """The call has ended (in its own task's context: a rate refusal it met is seen here)."""
        wait = queueing.refused_for()
        if wait and self.shared():
            hold_s = min(max(wait, REFUSED_HOLD_S), REFUSED_HOLD_MAX_S)
            asyncio.get_running_loop().call_later(hold_s, self.release, space)
            return
        self.release(space)

    def credit(self, space: str) -> float:
        """Seconds of work `space` may still take before its share holds its waiting calls."""
        return self._reckon(space, self._clock())

    def _reckon(self, space: str, now: float) -> float:
        """The space's credit at `now`: its calls at work since it was last counted drained
        it; none at work, it filled."""
        found = self._credit.get(space)
        if found is None:
            return self.burst_s
        credit, since = found
        credit += (now - since) * (self.share - (self._running.get(space, 0) > 0))
        return min(max(credit, -MAX_DEBT_S), self.burst_s)

    def _count(self, space: str, shared: bool) -> None:
        """Note the space's credit as a call of it starts or ends: the time since is charged at
        whether it had calls at work. A space alone owes nothing for its time alone."""
        if self.share >= 1:
            return
        if not shared:
            self._credit.pop(space, None)
            return
        now = self._clock()
        self._credit[space] = (self._reckon(space, now), now)
        self._counted += 1
        if self._counted % PRUNE_EVERY == 0:
            self._prune(now)

    def _prune(self, now: float) -> None:
        """Forget the spaces whose credit is full again with no call at work (the rest of the
        server's spaces, never counted, have a full one too)."""
        full = [
            space
            for space in self._credit
            if not self._running.get(space) and self._reckon(space, now) >= self.burst_s
        ]
        for space in full:
            del self._credit[space]

    def _take(self, space: str, shared: bool) -> None:
        self._count(space, shared)
        super()._take(space, shared)

    def release(self, space: str) -> None:
        self._count(space, self.shared())
        super().release(space)

    def _ready(self, space: str, shared: bool) -> bool:
        """A space with calls waiting starts the next one only with credit left, while spaces
        share the loop."""
        if self.share >= 1 or not shared or space not in self._waiting:
            return True
        return self._reckon(space, self._clock()) >= 0

    def _held(self) -> None:
        """A held space with no call at work has no call's end to admit its next one: a timer
        does, once the first of them has its credit back to zero (at once if it is by now: the
        clock moved on since `_ready` found it short, and nothing else would look again)."""
        if self.share >= 1:
            return
        now = self._clock()
        for space in self._waiting:
            if not self._running.get(space):
                owed = max(0.0, -self._reckon(space, now))
                self._wake_up_in(1e-4 + owed / self.share, now)

    def _wake_up_in(self, delay_s: float, now: float) -> None:
        at = now + delay_s
        if at >= self._wake_at:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake_at = at
        self._wake = asyncio.get_running_loop().call_later(delay_s, self._woken)

    def _woken(self) -> None:
        self._wake = None
        self._wake_at = math.inf
        self._admit()
