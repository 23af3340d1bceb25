"""A RememberBatch being received: its memories validated as they arrive and kept in chunks,
each encoded once as the WAL batch frame it will be written as (`frames`; its LSN and time are
set when it commits), so a stream holds little RAM however large it is.

The first chunks stay in RAM (a small batch costs no file); past `SPILL_BYTES` they go to an
anonymous file on the space's own volume (O_TMPFILE where the filesystem has it): a stream
that ends early or a crash leaves nothing behind, and nothing staged is ever in the WAL, so it is
never replayed. The batch reaches the WAL only when it commits (`Space.commit_batch`), as a
batch marker and its records, which recovery applies whole or not at all (`wal`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import numpy as np

from memspace_contract import durable
from memspace_server import errors
from memspace_server.storage import frames, memories, tiers, wal

CHUNK_BYTES = 1024 * 1024
"""Bytes of memories per chunk: the unit of staging, of WAL appends and of hot-tier inserts."""
SPILL_BYTES = 4 * 1024 * 1024
"""Bytes a stream keeps in RAM before staging to a file."""
_RECORD_BYTES = 48
"""What a memory costs in a frame beyond its embedding and text (its fixed-width columns)."""


@dataclasses.dataclass
class Chunk:
    """Staged memories as one batch frame, with LSN 0 and time 0 until it commits."""

    payload: bytearray
    count: int

    def __len__(self) -> int:
        return self.count


@dataclasses.dataclass(frozen=True)
class _Spilled:
    offset: int
    length: int
    count: int


class BatchStage:
    """The staged memories of one RememberBatch stream. `add` each draft as it arrives, then
    commit it through the space, and `close` it in any case."""

    def __init__(
        self,
        root: Path,
        dim: int,
        max_bytes: int,
        max_count: int,
        executor: concurrent.futures.Executor,
    ) -> None:
        self.root = root
        self.dim = dim
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.ids: list[str] = []
        self.bytes = 0
        self._executor = executor
        self._current: list[memories.Memory] = []
        self._current_bytes = 0
        self._chunks: list[Chunk | _Spilled] = []
        self._in_ram = 0
        self._file: IO[bytes] | None = None
        self._file_size = 0

    def __len__(self) -> int:
        return len(self.ids)

    async def add(self, draft: memories.Draft, now: float) -> None:
        """Validate one memory and stage its record; refuse it past the stream's limits."""
        if len(self.ids) >= self.max_count:
            raise errors.LimitReachedError(
                f"a RememberBatch stream holds at most {self.max_count} memories; split it into "
                "several streams (nothing of this one was stored)"
            )
        memory = memories.validate_draft(draft, self.dim, now)
        size = _RECORD_BYTES + 4 * self.dim + len(memory.id) + len(memory.content)
        if not memory.content.isascii():
            size += len(memory.content.encode()) - len(memory.content)
        if memory.tags:
            size += len(json.dumps(memory.tags, separators=(",", ":")))
        if self.bytes + size > self.max_bytes:
            raise errors.LimitReachedError(
                f"a RememberBatch stream carries at most {self.max_bytes} bytes of memories; this "
                f"one passed it at memory {len(self.ids) + 1}. Split it into several streams "
                "(nothing of this one was stored)"
            )
        self.ids.append(memory.id)
        self.bytes += size
        self._current.append(memory)
        self._current_bytes += size
        if self._current_bytes >= CHUNK_BYTES:
            await self._seal()

    async def _seal(self) -> None:
        if not self._current:
            return
        staged, self._current, self._current_bytes = self._current, [], 0
        loop = asyncio.get_running_loop()
        chunk = await loop.run_in_executor(self._executor, _encode, staged, self.dim)
        del staged
        if self._in_ram + len(chunk.payload) <= SPILL_BYTES:
            self._chunks.append(chunk)
            self._in_ram += len(chunk.payload)
            return
        try:
            spilled = await loop.run_in_executor(self._executor, self._spill, chunk)
        except OSError as err:
            if durable.is_disk_full(err):
                raise errors.DiskFullError(
                    "the space's volume is full; the batch could not be staged on it (nothing "
                    "of it was stored). Free space or grow the volume (storage.size), or send "
                    "smaller batches"
                ) from err
            reason = os.strerror(err.errno or 0)
            raise errors.UnavailableError(
                f"the batch could not be staged on the space's volume ({reason}); nothing of it "
                "was stored, retry shortly"
            ) from err
        self._chunks.append(spilled)

    def _spill(self, chunk: Chunk) -> _Spilled:
        """Blocking: append a chunk to the staging file (no fsync: a crash discards it)."""
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.root, prefix=".batch-")  # noqa: SIM115  # closed in close()
        self._file.seek(self._file_size)
        self._file.write(chunk.payload)
        spilled = _Spilled(self._file_size, len(chunk.payload), chunk.count)
        self._file_size += len(chunk.payload)
        return spilled

    def _read(self, spilled: _Spilled) -> Chunk:
        """Blocking: one staged chunk back from the file."""
        assert self._file is not None
        self._file.seek(spilled.offset)
        payload = bytearray(self._file.read(spilled.length))
        if len(payload) != spilled.length:
            raise errors.UnavailableError("a staged chunk of the batch could not be read back")
        return Chunk(payload, spilled.count)

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The staged memories, a chunk at a time, in the order they arrived."""
        await self._seal()
        loop = asyncio.get_running_loop()
        while self._chunks:
            chunk = self._chunks.pop(0)  # a committed chunk is not held any longer
            if isinstance(chunk, _Spilled):
                yield await loop.run_in_executor(self._executor, self._read, chunk)
            else:
                yield chunk

    def close(self) -> None:
        self._chunks = []
        self._current = []
        if self._file is not None:
            self._file.close()
            self._file = None


def _encode(staged: list[memories.Memory], dim: int) -> Chunk:
    """Blocking: a chunk's memories as one batch frame (columns, encoded once)."""
    return Chunk(bytearray(frames.encode(0, 0.0, dim, staged)), len(staged))


def stamped(chunk: Chunk, first_lsn: int, now: float) -> list[bytes]:
    """Blocking: the WAL frame of a staged chunk, given its LSNs and commit time."""
    frames.restamp(chunk.payload, first_lsn, now)
    return [wal.frame(chunk.payload)]


def latest_columns(chunk: Chunk) -> tiers.Columns:
    """Blocking: the memories of a staged chunk as columns, the last of each ID only."""
    frame = frames.decode(chunk.payload)
    last = dict(zip(frame.ids, range(len(frame)), strict=True))
    if len(last) == len(frame):
        rows = np.arange(len(frame), dtype=np.int64)
    else:
        rows = np.sort(np.fromiter(last.values(), np.int64, len(last)))
    return frame.columns(rows)
