"""Fair queues: slots of some work handed out round robin by space, at most `per_space` at once to
one space and at most `total` in all, so that a space's share does not grow with how hard its
clients push. The edge's turns for unary calls (`api.sharing`), the scan threads
(`storage.scheduling.FairScans`) and the embedding threads (`embedding.Turns`) all take their
slots here. It knows nothing of gRPC, the storage engine or the models.

A queue may give a space alone more (`alone`) than its share while spaces share the server:
which spaces asked for work lately is one `Activity` for the whole server, noted by the edge's
turns, the scan threads and the Subscribe fan-out, so that a space flooding one kind of work
(recalls, say) is held to its share of the others as soon as another space calls.

A call that holds a slot and is about to wait on something that is not the event loop's work
(the group commit's fsync) hands its slot on early with `give_back`: the slot bounds work on the
loop, not waits on the disk. A call refused for going over its space's rate quota says so with
`refused`: the edge's turns then keep its slot until the quota has room again, so a client that
ignores RESOURCE_EXHAUSTED and calls again at once waits in its own space's queue instead of
turning refusals into a flood of calls that other spaces wait behind.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import math
import time
from collections.abc import Callable

_held: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "memspace_held_slot", default=None
)


_refused: contextvars.ContextVar[float] = contextvars.ContextVar(
    "memspace_refused_for", default=0.0
)


def refused(retry_after_s: float) -> None:
    """Note that the current call is refused for its space's rate quota, with room again in
    `retry_after_s` seconds (the queue holding its slot may keep it that long)."""
    _refused.set(max(_refused.get(), retry_after_s))


def refused_for() -> float:
    """Seconds the current call was told to wait before retrying (0: not refused for a rate);
    reading it clears it."""
    found = _refused.get()
    if found:
        _refused.set(0.0)
    return found


def hold(release: Callable[[], None]) -> contextvars.Token[Callable[[], None] | None]:
    """Note that the current call holds a slot that `release` gives back (idempotent)."""
    return _held.set(release)


def give_back() -> None:
    """Hand on the current call's slot, if it holds one, before a wait that is not work on the
    event loop (the call goes on without it)."""
    release = _held.get()
    if release is not None:
        _held.set(None)
        release()


WINDOW_S = 0.5
"""Spaces that asked for work within this many seconds share the server (a paced client between
two calls still counts)."""


class Activity:
    """The spaces that asked for work in the last `window_s` seconds (event loop only)."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        # When each space last asked, oldest first.
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def note(self, space: str) -> None:
        self._seen[space] = time.monotonic()
        self._seen.move_to_end(space)

    def spaces(self) -> int:
        """How many spaces asked lately."""
        seen = self._seen
        if len(seen) > 1:
            horizon = time.monotonic() - self.window_s
            while seen:
                oldest = next(iter(seen))
                if seen[oldest] >= horizon:
                    break
                del seen[oldest]
        return len(seen)

    def shared(self) -> bool:
        return self.spaces() > 1


class FairQueue:
    """Slots per space (event loop only: no locking). `acquire(space)` returns once the space
    may start one more piece of work; `release(space)` exactly once after that. Waiting spaces
    are served in turn (a served space goes to the back), each in its own arrival order.

    A space holds at most `per_space` slots while spaces share the queue (more than one holds or
    waits for slots, or `activity` saw more than one lately), and at most `alone` (default
    `per_space`) while it is the only one."""

    def __init__(
        self,
        per_space: int,
        total: int | None = None,
        *,
        alone: float | None = None,
        activity: Activity | None = None,
    ) -> None:
        if per_space < 1 or (total is not None and total < 1):
            raise ValueError("a fair queue needs at least one slot per space and in all")
        self.per_space = per_space
        self.total = math.inf if total is None else total
        self.alone = per_space if alone is None else max(alone, per_space)
        self.activity = activity
        self.working = 0
        self._running: collections.Counter[str] = collections.Counter()
        # Waiting work by space, in the order the spaces take turns.
        self._waiting: collections.OrderedDict[str, collections.deque[asyncio.Future[None]]] = (
            collections.OrderedDict()
        )

    def running(self, space: str) -> int:
        return self._running[space]

    def waiting(self, space: str) -> int:
        queue = self._waiting.get(space)
        return len(queue) if queue else 0

    def spaces_running(self) -> int:
        return len(self._running)

    def shared(self) -> bool:
        """More than one space holds or waits for slots, or asked for work lately."""
        running, waiting = self._running, self._waiting
        if len(running) > 1 or len(waiting) > 1:
            return True
        if running and waiting and next(iter(waiting)) not in running:
            return True
        return self.activity is not None and self.activity.shared()

    def _limit(self, shared: bool) -> float:
        """Slots one space may hold (`shared`: as `shared()` found it just now)."""
        return self.per_space if shared else self.alone

    async def acquire(self, space: str) -> bool:
        """Whether the space's work had to wait for its slot (False: it started at once)."""
        if self.activity is not None:
            self.activity.note(space)
        # A free slot with spaces waiting means each of them is at its cap (a release admits
        # them otherwise): a space that is not waiting already may take it.
        held = False
        if space not in self._waiting and self.working < self.total:
            shared = self.shared()
            if self._running[space] < self._limit(shared):
                if self._ready(space, shared):
                    self._take(space, shared)
                    return False
                held = True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(space, collections.deque()).append(future)
        if held:
            self._held()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(space)  # admitted just as the caller gave up: pass the slot on
            else:
                queue = self._waiting.get(space)
                if queue is not None and future in queue:
                    queue.remove(future)
                    if not queue:
                        del self._waiting[space]
            raise
        return True

    def release(self, space: str) -> None:
        self.working -= 1
        left = self._running[space] - 1
        if left > 0:
            self._running[space] = left
        else:
            del self._running[space]
        self._admit()

    def _take(self, space: str, shared: bool) -> None:
        """`space` starts one more piece of work (`shared`: as `shared()` found it just now)."""
        self.working += 1
        self._running[space] += 1

    def _ready(self, space: str, shared: bool) -> bool:
        """Whether `space` may start work now, below its cap (a subclass may hold it longer;
        `shared` as `shared()` found it just now). Decides only: see `_held`."""
        return True

    def _held(self) -> None:
        """A waiting space below its cap was not `_ready`: a subclass that holds spaces
        arranges here for `_admit` to run again once one may start (a held space may have no
        work of its own whose `release` would)."""

    def _admit(self) -> None:
        """Give free slots to waiting spaces, one per space per turn."""
        while self.working < self.total and self._waiting:
            shared = self.shared()
            cap = self._limit(shared)
            held = False
            for space in self._waiting:
                if self._running[space] < cap:
                    if self._ready(space, shared):
                        break
                    held = True
            else:
                # Every waiting space is at its cap (a release admits it) or held.
                if held:
                    self._held()
                return
            queue = self._waiting.pop(space)
            future = queue.popleft()
            if queue:
                self._waiting[space] = queue  # to the back of the turn order
            if not future.done():  # a caller cancelled but not yet told
                self._take(space, shared)
                future.set_result(None)
