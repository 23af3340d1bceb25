"""The floor of a durable RememberBatch in Python + numpy: only the steps no store of memories
can skip, in their cheapest form, measured beside the engine and the raw append
(`storage_bench`: `remember_floor_vs_raw`, `remember_vs_floor`).

Per call, on the event loop: the drafts' embeddings stacked straight into the rows that store
them (one copy: the hot tier's own block store, which grows without copying and has its pages
faulted in ahead by a background thread, as never-touched memory costs about as much to write
as the rest of the call on the machines measured), checked there (shape, finite, not zero, as
columns); confidences checked; texts checked (short ASCII only: the floor takes no other);
128 random bits an id, and each id mapped to its row. The batch is framed (fixed-width columns,
the text blobs and a view of its stored rows, CRC32C) and queued. A writer thread appends what
is queued with one writev and one fdatasync per group, then resolves the callers' futures:
group commit, as the engine's WAL does.

Not in the floor: tags, an id given twice, the hot tier's other columns and its norms, rows
that move (the engine fills a forgotten memory's row with its last one, so its log cannot refer
to stored rows and copies each batch twice), the keyword index, the events for Subscribe,
quotas, the space's lock, WAL segments and checkpoints, recovery. What the engine costs beyond
the floor is those; what the floor costs beyond the raw append is Python's.
"""

from __future__ import annotations

import asyncio
import operator
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

import crc32c
import numpy as np

from memspace_server.storage import hot, memories, tiers, validating

HEAD = struct.Struct("<IIdQ")
"""crc32c of the rest, its length, the time, the count."""
_CONFIDENCE = operator.attrgetter("confidence")
_CONTENT = operator.attrgetter("content")


class WriteFloor:
    """One space's memories, written as in the module's description. Call on one event loop;
    `close` when done."""

    def __init__(self, path: Path, dim: int) -> None:
        self.dim = dim
        self.blocks = hot.Blocks(dim)
        self.rows: dict[str, int] = {}
        self.count = 0
        self.log = GroupCommit(path)

    async def remember_many(self, drafts: Sequence[memories.Draft]) -> list[str]:
        count = len(drafts)
        self.blocks.reserve(self.count + count)
        # Straight into the rows they are stored in (past the stored ones: a refused batch
        # leaves nothing counted), where one block holds them all.
        span = self.blocks.span(self.count, count)
        embeddings = [d.embedding for d in drafts]
        if span is None:
            matrix = np.array(embeddings, np.float32)
        else:
            matrix = np.stack(embeddings, out=span)
        confidence, contents, text = checked(drafts, matrix, self.dim)
        ids = validating.fresh_ids(count)
        self.rows.update(zip(ids, range(self.count, self.count + count), strict=True))
        if span is None:
            self.blocks.write(self.count, matrix)
        else:
            self.blocks.wrote(self.count + count)
        self.count += count
        ends = np.cumsum(np.fromiter(map(len, contents), np.uint32, count), dtype=np.uint32)
        body: list[bytes | memoryview] = [
            "".join(ids).encode(),
            ends.tobytes(),
            confidence.tobytes(),
            text.encode(),
            matrix.data.cast("B"),
        ]
        crc = 0
        for part in body:
            crc = crc32c.crc32c(part, crc)
        length = sum(len(part) for part in body)
        await self.log.append([HEAD.pack(crc, length, 0.0, count), *body])
        return ids

    def close(self) -> None:
        self.log.close()


def checked(
    drafts: Sequence[memories.Draft], matrix: np.ndarray, dim: int
) -> tuple[np.ndarray, list[str], str]:
    """The floor's checks of a batch whose embeddings are `matrix`, as columns: the shape, the
    embeddings finite and not zero, confidences in 0..1, short ASCII texts (the floor takes no
    other). Returns the confidences, the texts and the texts joined."""
    count = len(drafts)
    if matrix.shape != (count, dim):
        raise ValueError(f"embeddings of {dim} values")
    with np.errstate(over="ignore", invalid="ignore"):
        squares = tiers.squared_norms(matrix)
    if not (np.isfinite(squares).all() and squares.all()):
        raise ValueError("embeddings finite and not zero")
    confidence = np.fromiter(map(_CONFIDENCE, drafts), np.float32, count)
    if not ((confidence >= 0).all() and (confidence <= 1).all()):
        raise ValueError("confidence 0..1")
    contents = list(map(_CONTENT, drafts))
    text = "".join(contents)
    if not text.isascii() or max(map(len, contents)) > memories.MAX_CONTENT_BYTES:
        raise ValueError("only short ASCII texts in the floor")
    return confidence, contents, text


class GroupCommit:
    """Appends to one file by a writer thread: each group of records queued while the previous
    one was written goes in one writev and one fdatasync; each caller's future resolves once
    its record is durable. Make it on the event loop its callers run on; `close` when done."""

    def __init__(self, path: Path) -> None:
        self.syncs = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._lock = threading.Lock()
        self._queue: list[tuple[list[bytes | memoryview], asyncio.Future[None]]] = []
        self._wake = threading.Event()
        self._stop = False
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._write, name="group-commit", daemon=True)
        self._thread.start()

    def append(self, parts: list[bytes | memoryview]) -> asyncio.Future[None]:
        """Queue one record (its parts, kept unchanged until the future resolves)."""
        future = self._loop.create_future()
        with self._lock:
            self._queue.append((parts, future))
        self._wake.set()
        return future

    def _write(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                group, self._queue = self._queue, []
                self._wake.clear()
                if self._stop and not group:
                    return
            if not group:
                continue
            os.writev(self._fd, [part for parts, _ in group for part in parts])
            os.fdatasync(self._fd)
            self.syncs += 1
            self._loop.call_soon_threadsafe(_resolve, [future for _, future in group])

    def close(self) -> None:
        with self._lock:
            self._stop = True
        self._wake.set()
        self._thread.join()
        os.close(self._fd)


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)
