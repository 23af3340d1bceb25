"""Fair queues: slots of some work handed out round robin by space, at most `per_space` at once to
one space and at most `total` in all, so that a space's share does not grow with how hard its
clients push. The edge's turns for unary calls (`api.sharing`), the scan threads
(`storage.scheduling.FairScans`) and the embedding threads (`embedding.Turns`) all take their
slots here. It knows nothing of gRPC, the storage engine or the models.

A call that holds a slot and is about to wait on something that is not the event loop's work
(the group commit's fsync) hands its slot on early with `give_back`: the slot bounds work on the
loop, not waits on the disk.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import math
from collections.abc import Callable

_held: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "memspace_held_slot", default=None
)


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


class FairQueue:
    """Slots per space (event loop only: no locking). `acquire(space)` returns once the space
    may start one more piece of work; `release(space)` exactly once after that. Waiting spaces
    are served in turn (a served space goes to the back), each in its own arrival order."""

    def __init__(self, per_space: int, total: int | None = None) -> None:
        if per_space < 1 or (total is not None and total < 1):
            raise ValueError("a fair queue needs at least one slot per space and in all")
        self.per_space = per_space
        self.total = math.inf if total is None else total
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

    def limit(self) -> float:
        """Slots one space may hold now (a subclass may lift the cap while a space is alone)."""
        return self.per_space

    async def acquire(self, space: str) -> None:
        # A free slot with spaces waiting means each of them is at its cap (a release admits
        # them otherwise): a space that is not waiting already may take it.
        if (
            space not in self._waiting
            and self.working < self.total
            and self._running[space] < self.limit()
        ):
            self._take(space)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(space, collections.deque()).append(future)
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

    def release(self, space: str) -> None:
        self.working -= 1
        left = self._running[space] - 1
        if left > 0:
            self._running[space] = left
        else:
            del self._running[space]
        self._admit()

    def _take(self, space: str) -> None:
        self.working += 1
        self._running[space] += 1

    def _admit(self) -> None:
        """Give free slots to waiting spaces, one per space per turn."""
        while self.working < self.total and self._waiting:
            cap = self.limit()
            for space in self._waiting:
                if self._running[space] < cap:
                    break
            else:
                return  # every waiting space is at its cap
            queue = self._waiting.pop(space)
            future = queue.popleft()
            if queue:
                self._waiting[space] = queue  # to the back of the turn order
            if not future.done():  # a caller cancelled but not yet told
                self._take(space)
                future.set_result(None)
