"""Fair shares of the event loop between spaces: turns for unary calls.

Every unary call runs on the one event loop, so a space whose clients keep many calls in flight
(a flood that ignores RESOURCE_EXHAUSTED, say) would take most of the loop's steps and make
another space's call wait behind all of its own. So while more than one space has called in the
last `window_s` seconds, the edge works on at most `per_space` unary calls of each space at once;
a space's calls beyond them wait in that space's own queue (already received, routed and
admitted under the caps of `limits`) and start in arrival order as its calls finish. A quiet
space's call starts at once, beside at most `per_space` calls of each flooding space however
many those have sent, and a flood's share of the loop does not grow with how hard its clients
push. A space alone on the server is not held back: its clients get all the concurrency they
ask for.

Streams (RememberBatch, Subscribe) do not take turns: they hold their call for long waits on
their client, and their own caps bound them (`limits`); Subscribe fan-out is paced by the
storage engine (`feeds.Pacer`).
"""

from __future__ import annotations

import collections
import math
import time

from memspace_server import queueing

WINDOW_S = 0.5
"""Spaces that called within this many seconds share the loop (a paced client between two calls
still counts)."""


class Turns(queueing.FairQueue):
    """Unary calls at work per space, with the ones beyond `per_space` queued while spaces share
    the loop (event loop only: no locking)."""

    def __init__(self, per_space: int, window_s: float = WINDOW_S) -> None:
        if per_space < 1:
            raise ValueError("turns need at least one call at work per space")
        super().__init__(per_space)
        self.window_s = window_s
        # When each space last called, oldest first: the spaces sharing the loop lately.
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def working_on(self, space: str) -> int:
        return self.running(space)

    def shared(self) -> bool:
        """More than one space has called in the last `window_s` seconds, or has calls at work."""
        seen = self._seen
        horizon = time.monotonic() - self.window_s
        while seen:
            oldest = next(iter(seen))
            if seen[oldest] >= horizon:
                break
            del seen[oldest]
        return len(seen) > 1 or self.spaces_running() > 1

    def limit(self) -> float:
        """A space alone on the server is not held back."""
        return self.per_space if self.shared() else math.inf

    async def enter(self, space: str) -> None:
        """Return once the call may start; `leave(space)` exactly once after that."""
        self._seen[space] = time.monotonic()
        self._seen.move_to_end(space)
        await self.acquire(space)

    def leave(self, space: str) -> None:
        self.release(space)
