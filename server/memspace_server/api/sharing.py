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

import asyncio
import collections
import time

WINDOW_S = 0.5
"""Spaces that called within this many seconds share the loop (a paced client between two calls
still counts)."""


class Turns:
    """Unary calls at work per space, with the ones beyond `per_space` queued while spaces share
    the loop (event loop only: no locking)."""

    def __init__(self, per_space: int, window_s: float = WINDOW_S) -> None:
        if per_space < 1:
            raise ValueError("turns need at least one call at work per space")
        self.per_space = per_space
        self.window_s = window_s
        self.working = 0
        self._by_space: collections.Counter[str] = collections.Counter()
        self._waiting: dict[str, collections.deque[asyncio.Future[None]]] = {}
        # When each space last called, oldest first: the spaces sharing the loop lately.
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def waiting(self, space: str) -> int:
        queue = self._waiting.get(space)
        return len(queue) if queue else 0

    def working_on(self, space: str) -> int:
        return self._by_space[space]

    def shared(self) -> bool:
        """More than one space has called in the last `window_s` seconds, or has calls at work."""
        seen = self._seen
        horizon = time.monotonic() - self.window_s
        while seen:
            oldest = next(iter(seen))
            if seen[oldest] >= horizon:
                break
            del seen[oldest]
        return len(seen) > 1 or len(self._by_space) > 1

    async def enter(self, space: str) -> None:
        """Return once the call may start; `leave(space)` exactly once after that."""
        self._seen[space] = time.monotonic()
        self._seen.move_to_end(space)
        if space not in self._waiting and (
            self._by_space[space] < self.per_space or not self.shared()
        ):
            self._take(space)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(space, collections.deque()).append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.leave(space)  # admitted just as the caller gave up: pass the turn on
            else:
                queue = self._waiting.get(space)
                if queue is not None and future in queue:
                    queue.remove(future)
                    if not queue:
                        del self._waiting[space]
            raise

    def leave(self, space: str) -> None:
        self.working -= 1
        left = self._by_space[space] - 1
        if left > 0:
            self._by_space[space] = left
        else:
            del self._by_space[space]
        if space in self._waiting:
            self._admit(space)

    def _take(self, space: str) -> None:
        self.working += 1
        self._by_space[space] += 1

    def _admit(self, space: str) -> None:
        """Start the space's waiting calls its share allows (all of them once it is alone)."""
        queue = self._waiting[space]
        alone = not self.shared()
        while queue and (alone or self._by_space[space] < self.per_space):
            future = queue.popleft()
            if not future.done():  # a caller cancelled but not yet told
                self._take(space)
                future.set_result(None)
        if not queue:
            del self._waiting[space]
