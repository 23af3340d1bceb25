"""A RememberBatch being received: its memories validated and encoded as WAL records as they
arrive, kept in chunks, so a stream holds little RAM however large it is.

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
import os
import struct
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from memspace_contract import durable
from memspace_server import errors
from memspace_server.storage import frames, memories, records, tiers, wal

CHUNK_BYTES = 1024 * 1024
"""Encoded records per chunk: the unit of staging, of WAL appends and of hot-tier inserts."""
SPILL_BYTES = 4 * 1024 * 1024
"""Bytes a stream keeps in RAM before staging to a file."""
_LENGTH = struct.Struct("<I")


@dataclasses.dataclass(frozen=True)
class _Spilled:
    offset: int
    length: int


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
        self._current: list[bytes] = []
        self._current_bytes = 0
        self._chunks: list[list[bytes] | _Spilled] = []
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
        payload = records.encode_remember(0, now, memory)
        if self.bytes + len(payload) > self.max_bytes:
            raise errors.LimitReachedError(
                f"a RememberBatch stream carries at most {self.max_bytes} bytes of memories; this "
                f"one passed it at memory {len(self.ids) + 1}. Split it into several streams "
                "(nothing of this one was stored)"
            )
        self.ids.append(memory.id)
        self.bytes += len(payload)
        self._current.append(payload)
        self._current_bytes += len(payload)
        if self._current_bytes >= CHUNK_BYTES:
            await self._seal()

    async def _seal(self) -> None:
        if not self._current:
            return
        chunk, size = self._current, self._current_bytes
        self._current, self._current_bytes = [], 0
        if self._in_ram + size <= SPILL_BYTES:
            self._chunks.append(chunk)
            self._in_ram += size
            return
        loop = asyncio.get_running_loop()
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

    def _spill(self, chunk: list[bytes]) -> _Spilled:
        """Blocking: append a chunk to the staging file (no fsync: a crash discards it)."""
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.root, prefix=".batch-")  # noqa: SIM115  # closed in close()
        data = b"".join(item for payload in chunk for item in (_LENGTH.pack(len(payload)), payload))
        self._file.seek(self._file_size)
        self._file.write(data)
        spilled = _Spilled(self._file_size, len(data))
        self._file_size += len(data)
        return spilled

    def _read(self, spilled: _Spilled) -> list[bytes]:
        """Blocking: one staged chunk back from the file."""
        assert self._file is not None
        self._file.seek(spilled.offset)
        data = self._file.read(spilled.length)
        chunk = []
        pos = 0
        while pos < len(data):
            (length,) = _LENGTH.unpack_from(data, pos)
            pos += _LENGTH.size
            chunk.append(data[pos : pos + length])
            pos += length
        return chunk

    async def chunks(self) -> AsyncIterator[list[bytes]]:
        """The staged records, a chunk at a time, in the order they arrived."""
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


def stamped(chunk: list[bytes], first_lsn: int, now: float, dim: int) -> list[bytes]:
    """Blocking: the WAL frame of a chunk of staged records (one batch frame, `frames`), given
    their LSNs and commit time."""
    columns = records.columns([memoryview(staged) for staged in chunk], dim)
    return [wal.frame(frames.encode(first_lsn, now, dim, columns))]


def latest_columns(chunk: list[bytes], dim: int) -> tiers.Columns:
    """Blocking: the memories of a staged chunk as columns, the last record of each ID only."""
    latest: dict[str, memoryview] = {}
    for staged in chunk:
        view = memoryview(staged)
        _kind, memory_id, _at = records.peek(view)
        latest.pop(memory_id, None)
        latest[memory_id] = view
    return records.columns(list(latest.values()), dim)
