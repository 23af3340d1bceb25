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

Streams (RememberBatch, Subscribe) do not take turns: they hold their call for long waits on
their client, and their own caps bound them (`limits`); Subscribe fan-out is paced by the
storage engine (`feeds.Pacer`).
"""

from __future__ import annotations

import asyncio
import math

from memspace_server import queueing

WINDOW_S = queueing.WINDOW_S

REFUSED_HOLD_S = 0.1
"""The least time a turn stays taken after its call was refused for the space's rate, while
spaces share the loop: with 2 turns, a flood that ignores refusals gets at most 20 refusals a
second worked on (a retry-after is usually shorter: 10 ms at 100 writes per second)."""

REFUSED_HOLD_MAX_S = 2.0
"""The most: a long retry-after (a large batch's debt) does not hold a space's turns for long."""


class Turns(queueing.FairQueue):
    """Unary calls at work per space, with the ones beyond `per_space` queued while spaces share
    the loop (event loop only: no locking)."""

    def __init__(
        self,
        per_space: int,
        window_s: float = WINDOW_S,
        activity: queueing.Activity | None = None,
    ) -> None:
        if per_space < 1:
            raise ValueError("turns need at least one call at work per space")
        self._activity = activity or queueing.Activity(window_s)
        super().__init__(per_space, alone=math.inf, activity=self._activity)

    @property
    def window_s(self) -> float:
        return self._activity.window_s

    @window_s.setter
    def window_s(self, seconds: float) -> None:
        self._activity.window_s = seconds

    def working_on(self, space: str) -> int:
        return self.running(space)

    async def enter(self, space: str) -> None:
        """Return once the call may start; `leave(space)` exactly once after that."""
        await self.acquire(space)

    def leave(self, space: str) -> None:
        """The call has ended (in its own task's context: a rate refusal it met is seen here)."""
        wait = queueing.refused_for()
        if wait and self.shared():
            hold_s = min(max(wait, REFUSED_HOLD_S), REFUSED_HOLD_MAX_S)
            asyncio.get_running_loop().call_later(hold_s, self.release, space)
            return
        self.release(space)
