"""Fair shares of one server's threads between the spaces it holds.

Three pools, so that one kind of work never queues behind another: WAL appends (write and
fdatasync: each space's group commit has at most one in flight, so a space holds one of these
threads at a time), scans (recalls of large tiers), and everything else (loading, consolidation,
health). Scans are admitted round robin by space, and a space runs at most `per_space` at once
while other spaces ask for work (`queueing.Activity`): a space whose clients send a flood of
recalls waits for its own turn and never makes another space's recall wait for more than the
scans already running, nor keeps more than one core busy beside the event loop. A space alone
may run `alone` scans at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from memspace_server import queueing
from memspace_server.storage import caches, feeds
from memspace_server.storage.settings import EngineSettings

P = ParamSpec("P")
T = TypeVar("T")


class FairScans:
    """Runs blocking scans on `workers` threads, admitting the waiting spaces in turn
    (`queueing.FairQueue`): at most `per_space` of one space's at once while other spaces ask
    for work, `alone` (default `per_space`) while it is the only one."""

    def __init__(
        self,
        workers: int,
        per_space: int,
        alone: int | None = None,
        activity: queueing.Activity | None = None,
    ) -> None:
        if workers < 1 or per_space < 1:
            raise ValueError("workers and per_space must be at least 1")
        self.workers = workers
        self.per_space = per_space
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="memspace-scan"
        )
        self._slots = queueing.FairQueue(per_space, total=workers, alone=alone, activity=activity)

    def running(self, space: str) -> int:
        return self._slots.running(space)

    def waiting(self, space: str) -> int:
        return self._slots.waiting(space)

    async def run(self, space: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """fn(*args, **kwargs) on a scan thread once it is this space's turn."""
        await self._slots.acquire(space)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, lambda: fn(*args, **kwargs)
            )
        finally:
            self._slots.release(space)

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
    activity: queueing.Activity
    """The spaces that asked for work lately (the edge's turns note them too): while there are
    several, each is held to its share of the scan threads and of the fan-out."""

    @classmethod
    def create(cls, settings: EngineSettings, io: concurrent.futures.Executor) -> Pools:
        workers = settings.scan_threads or default_workers()
        activity = queueing.Activity()
        alone = settings.scans_per_space or max(1, workers - 1)
        return cls(
            io=io,
            wal=concurrent.futures.ThreadPoolExecutor(
                max_workers=settings.wal_threads, thread_name_prefix="memspace-wal"
            ),
            scans=FairScans(workers, min(alone, settings.shared_scans_per_space), alone, activity),
            chunks=caches.ChunkCache(settings.cold_cache_bytes),
            fanout=feeds.Pacer(
                settings.fanout_slots, shared_slots=settings.shared_fanout_slots, activity=activity
            ),
            activity=activity,
        )

    def shutdown(self) -> None:
        self.wal.shutdown(wait=True)
        self.scans.shutdown()
        self.chunks.clear()
