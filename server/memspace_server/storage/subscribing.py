"""A Subscribe stream of one space: the events the WAL still holds from `since_lsn`, read a chunk
at a time in a worker thread, then the live feed (design section 5). `Space.subscribe` checks
the request and opens the feed subscription; `follow` is the stream."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

from memspace_server.storage import feeds, records, wal

REPLAY_CHUNK = 256
"""Events read from the WAL per worker-thread hop of a Subscribe replay."""


def _replay_chunk(replay: Iterator[records.Record]) -> list[feeds.Event]:
    """The next events of a replay (blocking: the WAL is read as they are taken)."""
    events = []
    for record in itertools.islice(replay, REPLAY_CHUNK):
        if isinstance(record, records.Remembered):
            events.append(
                feeds.Event(feeds.EventType.REMEMBERED, record.memory.id, record.lsn, record.at)
            )
        else:
            events.append(feeds.Event(feeds.EventType.FORGOTTEN, record.id, record.lsn, record.at))
    return events


async def follow(
    subscription: feeds.Subscription,
    wal_directory: Path,
    since_lsn: int,
    durable: int,
    executor: concurrent.futures.Executor,
) -> AsyncGenerator[feeds.Event, None]:
    """Replay the WAL from `since_lsn` through `durable` (none when `since_lsn` is 0), then
    follow `subscription` live; the subscription closes with the stream."""
    try:
        if since_lsn and since_lsn <= durable:
            # A chunk at a time: a subscriber that reads slowly holds one chunk of events,
            # never a copy of the log.
            replay = wal.read_range(wal_directory, since_lsn - 1, durable)
            loop = asyncio.get_running_loop()
            try:
                while chunk := await loop.run_in_executor(executor, _replay_chunk, replay):
                    for event in chunk:
                        subscription.note_replayed(event.lsn)
                        yield event
            finally:
                # A cancelled call may leave a worker inside the generator: it then closes
                # when collected.
                with contextlib.suppress(ValueError):
                    replay.close()
        async for event in subscription.live():
            yield event
    finally:
        subscription.close()
