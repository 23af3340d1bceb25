"""Fair shares of one server's threads between the spaces it holds.

Three pools, so that one kind of work never queues behind another: WAL appends (write and
fdatasync: each space's group commit has at most one in flight, so a space holds one of these
threads at a time), scans (recalls of large tiers), and everything else (loading, consolidation,
health). Scans are admitted round robin by space, and a space runs at most `per_space` at once:
a space whose clients send a flood of recalls waits for its own turn and never makes another
space's recall wait for more than the scans already running.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from memspace_server.storage import caches, feeds
from memspace_server.storage.settings import EngineSettings

P = ParamSpec("P")
T = TypeVar("T")


class FairScans:
    """Runs blocking scans on `workers` threads, admitting the waiting spaces in turn."""

    def __init__(self, workers: int, per_space: int) -> None:
        if workers < 1 or per_space < 1:
            raise ValueError("workers and per_space must be at least 1")
        self.workers = workers
        self.per_space = per_space
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="memspace-scan"
        )
        self._running: collections.Counter[str] = collections.Counter()
        self._total = 0
        # Waiting scans by space, in the order their spaces take turns (a served space moves
        # to the back).
        self._waiting: collections.OrderedDict[str, collections.deque[asyncio.Future[None]]] = (
            collections.OrderedDict()
        )

    def running(self, space: str) -> int:
        return self._running[space]

    def waiting(self, space: str) -> int:
        queue = self._waiting.get(space)
        return len(queue) if queue else 0

    async def run(self, space: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """fn(*args, **kwargs) on a scan thread once it is this space's turn."""
        await self._admit(space)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, lambda: fn(*args, **kwargs)
            )
        finally:
            self._release(space)

    async def _admit(self, space: str) -> None:
        # A free thread with spaces waiting means every one of them is at its cap (a release
        # admits them otherwise): a space that is not waiting already may take it.
        free = self._total < self.workers and self._running[space] < self.per_space
        if free and space not in self._waiting:
            self._take(space)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(space, collections.deque()).append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release(space)  # admitted just as the caller gave up: pass the turn on
            else:
                queue = self._waiting.get(space)
                if queue is not None and future in queue:
                    queue.remove(future)
                    if not queue:
                        del self._waiting[space]
            raise

    def _take(self, space: str) -> None:
        self._running[space] += 1
        self._total += 1

    def _release(self, space: str) -> None:
        self._running[space] -= 1
        if self._running[space] <= 0:
            del self._running[space]
        self._total -= 1
        self._admit_next()

    def _admit_next(self) -> None:
        """Give free threads to waiting spaces, one scan per space per turn."""
        while self._total < self.workers and self._waiting:
            for space in list(self._waiting):
                if self._running[space] < self.per_space:
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

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def default_workers() -> int:
    """One scan thread per core, plus one so a newly admitted space starts at once."""
    return (os.cpu_count() or 1) + 1


@dataclasses.dataclass
class Pools:
    """The thread pools and caches a server's spaces share."""

    io: concurrent.futures.Executor
    """Loading, consolidation, health and other blocking work."""
    wal: concurrent.futures.ThreadPoolExecutor
    """WAL appends (write + fdatasync), never behind a scan."""
    scans: FairScans
    chunks: caches.ChunkCache
    """Decompressed cold-tier chunks, bounded in bytes, shared fairly by the spaces."""
    fanout: feeds.Pacer
    """Turns of every space's Subscribe streams to send an event."""

    @classmethod
    def create(cls, settings: EngineSettings, io: concurrent.futures.Executor) -> Pools:
        workers = settings.scan_threads or default_workers()
        return cls(
            io=io,
            wal=concurrent.futures.ThreadPoolExecutor(
                max_workers=settings.wal_threads, thread_name_prefix="memspace-wal"
            ),
            scans=FairScans(workers, settings.scans_per_space or max(1, workers - 1)),
            chunks=caches.ChunkCache(settings.cold_cache_bytes),
            fanout=feeds.Pacer(settings.fanout_slots),
        )

    def shutdown(self) -> None:
        self.wal.shutdown(wait=True)
        self.scans.shutdown()
        self.chunks.clear()
