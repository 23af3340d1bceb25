"""The hot tier: memories in RAM as growable numpy columns, scanned with a matrix product per
block of embeddings.

Rows stay dense: a removal moves the last row into the hole. The embeddings are kept in blocks,
so the tier grows by adding a block and never copies the rows it holds; the small per-row
columns double. The tier remembers
which memories arrived since the last checkpoint (a flag per row, moved with its row), so a
checkpoint writes only those."""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from memspace_contract import wire
from memspace_server.storage import memories, pages, tiers

BLOCK_BYTES = 64 * 1024 * 1024
"""Bytes of embeddings a block holds (pages are backed only once rows are written)."""
AHEAD_BYTES = 32 * 1024 * 1024
"""Bytes of embedding rows past the last one written whose pages are faulted in ahead, in the
background (`pages`), asked for in steps of half this."""
STEP_BYTES = 4 * 1024 * 1024
"""The least the background thread is asked to fault in at once."""


class Blocks:
    """The embedding matrix of the hot tier as a list of blocks: block k holds the rows from
    `starts[k]` on. Growing adds a block and never copies a row: a new block is as large as
    all before it together (at least 64 rows, at most `block_rows`), so a small tier stays
    small and a large one has few blocks; replay, which knows how many rows come, adds just
    that many. (Doubling one first block instead copied up to 64 MiB into fresh pages, the
    costliest part of a Remember while a space grew.)"""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.block_rows = max(1024, BLOCK_BYTES // (4 * dim))
        self.blocks: list[npt.NDArray[np.float32]] = []
        self.starts: list[int] = []
        self._starts = np.zeros(0, np.int64)
        self.capacity = 0
        self._ahead_rows = max(1, AHEAD_BYTES // (4 * dim))
        self._faulted = 0
        """Rows whose pages were asked to be faulted in (or written)."""

    @property
    def nbytes(self) -> int:
        return sum(block.nbytes for block in self.blocks)

    def reserve(self, need: int, exact: bool = False) -> None:
        """Room for `need` rows; `exact`: no more than needed (replay knows how many come)."""
        while self.capacity < need:
            missing = need - self.capacity
            size = min(self.block_rows, missing if exact else max(64, self.capacity, missing))
            self.blocks.append(np.zeros((size, self.dim), np.float32))
            self.starts.append(self.capacity)
            self.capacity += size
        if len(self.starts) != self._starts.shape[0]:
            self._starts = np.array(self.starts, np.int64)

    def _locate(self, row: int) -> tuple[int, int]:
        """(block, offset in it) of a row."""
        block = bisect.bisect_right(self.starts, row) - 1
        return block, row - self.starts[block]

    def span(self, start: int, count: int) -> npt.NDArray[np.float32] | None:
        """A writable view of rows start..start+count-1 where one block holds them all (the
        caller reserved them, and calls `wrote` once it has written them), else None."""
        block, offset = self._locate(start)
        target = self.blocks[block]
        if offset + count > target.shape[0]:
            return None
        return target[offset : offset + count]

    def wrote(self, end: int) -> None:
        """Rows up to `end` were written through a `span`."""
        self._fault_ahead(end)

    def write(self, start: int, rows: npt.NDArray[np.float32]) -> None:
        """Rows start, start + 1, ... from `rows`."""
        count = rows.shape[0]
        if count == 0:
            return
        block, offset = self._locate(start)
        done = 0
        while done < count:
            target = self.blocks[block]
            take = min(count - done, target.shape[0] - offset)
            target[offset : offset + take] = rows[done : done + take]
            done += take
            block, offset = block + 1, 0
        self._fault_ahead(start + done)

    def _fault_ahead(self, end: int) -> None:
        """Keep the pages of the rows after `end` (up to AHEAD_BYTES, within the blocks there
        are) being faulted in by the background thread, so that writes find them there."""
        self._faulted = max(self._faulted, end)
        want = end + self._ahead_rows
        if want - self._faulted >= self._ahead_rows // 2:
            self.fault_through(want)

    def fault_through(self, end: int) -> None:
        """Have the pages of the rows up to `end` (within the blocks there are) faulted in by
        the background thread, those not asked for yet."""
        want = min(self.capacity, end)
        row_bytes = 4 * self.dim
        if (want - self._faulted) * row_bytes < STEP_BYTES:
            return  # a small tier, or not much new: not worth a trip to the thread
        block, offset = self._locate(self._faulted)
        while self._faulted < want:
            array = self.blocks[block]
            take = min(want - self._faulted, array.shape[0] - offset)
            pages.ahead(array, offset * row_bytes, (offset + take) * row_bytes)
            self._faulted += take
            block, offset = block + 1, 0

    def row(self, row: int) -> npt.NDArray[np.float32]:
        """A view of one row."""
        block, offset = self._locate(row)
        view: npt.NDArray[np.float32] = self.blocks[block][offset]
        return view

    def gather(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """The given rows (a copy)."""
        if len(self.blocks) <= 1:
            if not self.blocks:
                return np.zeros((0, self.dim), np.float32)
            one: npt.NDArray[np.float32] = self.blocks[0][rows]
            return one
        out = np.empty((rows.shape[0], self.dim), np.float32)
        block = np.searchsorted(self._starts, rows, "right") - 1
        offset = rows - self._starts[block]
        for k in np.unique(block).tolist():
            wanted = block == k
            out[wanted] = self.blocks[k][offset[wanted]]
        return out

    def products(self, cue: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.float32]:
        """The first n rows times `cue`: one kernel call per block, each writing its part of
        one output (no copy of the rows, no concatenation)."""
        out = np.empty(n, np.float32)
        tiers.stacked_products(self.blocks, cue, out)
        return out


class HotTier:
    name: wire.TierName = tiers.HOT

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._n = 0
        self._emb = Blocks(dim)
        self._norms = np.zeros(0, np.float32)
        self._confidence = np.zeros(0, np.float32)
        self._created = np.zeros(0, np.float64)
        self._recalled = np.zeros(0, np.float64)
        self._count = np.zeros(0, np.uint64)
        # Rows that arrived since the last checkpoint (`unsaved_ids`): a flag per row, where a
        # set of ids cost a hash insert a memory on every write (as much as copying its row).
        self._unsaved = np.zeros(0, np.bool_)
        # Objects per row in numpy columns, out of the cyclic collector's walk (`ObjectColumn`).
        self._ids = tiers.ObjectColumn()
        self._contents = tiers.ObjectColumn()
        self._tags = tiers.ObjectColumn()
        self._row: dict[str, int] = {}
        self._tag_index = tiers.TagIndex()
        self._removed: set[str] | None = None
        """Memories removed since `watch_removals` (None: not watched)."""

    def __len__(self) -> int:
        return self._n

    def __contains__(self, memory_id: object) -> bool:
        return memory_id in self._row

    def present(self, ids: Collection[str]) -> set[str]:
        """Those of `ids` the tier holds (one set operation: a dict view or a set is walked on
        the smaller side)."""
        return self._row.keys() & ids

    def ids(self) -> Iterable[str]:
        return self._ids.tolist()

    def texts(self) -> Iterable[tuple[str, str, dict[str, str]]]:
        """(ID, content, tags) of every memory (for the keyword index)."""
        return list(
            zip(self._ids.tolist(), self._contents.tolist(), self._tags.tolist(), strict=True)
        )

    def nbytes(self) -> int:
        return int(self._emb.nbytes + self._norms.nbytes + 32 * self._norms.shape[0])

    def _grow(self, need: int, exact: bool = False) -> None:
        self._emb.reserve(need, exact)
        capacity = self._norms.shape[0]
        if need <= capacity:
            return
        size = need if exact else max(need, capacity * 2, 64)
        for name in ("_norms", "_confidence", "_created", "_recalled", "_count", "_unsaved"):
            old: npt.NDArray[np.generic] = getattr(self, name)
            new = np.zeros(size, old.dtype)
            new[: self._n] = old[: self._n]
            setattr(self, name, new)

    def reserve(self, count: int) -> None:
        """Make room for `count` more memories at once (replay knows how many come)."""
        self._grow(self._n + count, exact=True)

    def expect(self, count: int) -> None:
        """Make room for `count` more memories, grown as writes grow it, and have the pages of
        those rows faulted in by the background thread meanwhile (replay calls it as it reads
        the log, before it writes the rows)."""
        need = self._n + count
        self._grow(need)
        self._emb.fault_through(need)

    def add(self, batch: tiers.Columns, checked: bool = False) -> None:
        """Append the batch, whose ids must not be in the tier (`checked`: the caller made
        sure of it, as a write does when it removes the versions stored before)."""
        count = len(batch)
        if count == 0:
            return
        if not checked and not self._row.keys().isdisjoint(batch.ids):
            raise KeyError("memory already in the hot tier; remove it first")
        start = self._n
        end = start + count
        self._grow(end)
        self._emb.write(start, batch.embeddings)
        self._norms[start:end] = tiers.norms(batch.embeddings)
        self._confidence[start:end] = batch.confidence
        self._created[start:end] = batch.created_at
        self._recalled[start:end] = batch.last_recalled_at
        self._count[start:end] = batch.recall_count
        self._ids.extend(batch.ids)
        self._contents.extend(batch.contents)
        self._tags.extend(batch.tags)
        self._row.update(zip(batch.ids, range(start, end), strict=True))
        if any(batch.tags):
            for row, tags in enumerate(batch.tags, start):
                if tags:
                    self._tag_index.add(row, tags)
        self._n = end
        self._unsaved[start:end] = True

    def add_memories(self, items: Sequence[memories.Memory]) -> None:
        """`add` for memories not yet in columns: copied once, straight into the tier."""
        count = len(items)
        if count == 0:
            return
        if any(m.id in self._row for m in items):
            raise KeyError("memory already in the hot tier; remove it first")
        start, end = self._n, self._n + count
        self._grow(end)
        block = np.stack([m.embedding for m in items]).astype(np.float32, copy=False)
        self._emb.write(start, block)
        self._norms[start:end] = tiers.norms(block)
        self._confidence[start:end] = np.fromiter((m.confidence for m in items), np.float32, count)
        self._created[start:end] = np.fromiter((m.created_at for m in items), np.float64, count)
        self._recalled[start:end] = np.fromiter(
            (m.last_recalled_at for m in items), np.float64, count
        )
        self._count[start:end] = np.fromiter((m.recall_count for m in items), np.uint64, count)
        for row, memory in enumerate(items, start):
            tags = dict(memory.tags)
            self._ids.append(memory.id)
            self._contents.append(memory.content)
            self._tags.append(tags)
            self._row[memory.id] = row
            if tags:
                self._tag_index.add(row, tags)
        self._n = end
        self._unsaved[start:end] = True

    def add_one(self, memory: memories.Memory) -> None:
        """`add` for a single memory, without building a batch (the common Remember)."""
        if memory.id in self._row:
            raise KeyError("memory already in the hot tier; remove it first")
        row = self._n
        self._grow(row + 1)
        self._emb.write(row, memory.embedding[None, :])
        self._norms[row] = np.sqrt(np.dot(memory.embedding, memory.embedding))
        self._confidence[row] = memory.confidence
        self._created[row] = memory.created_at
        self._recalled[row] = memory.last_recalled_at
        self._count[row] = memory.recall_count
        self._ids.append(memory.id)
        self._contents.append(memory.content)
        tags = dict(memory.tags)
        self._tags.append(tags)
        self._row[memory.id] = row
        if tags:
            self._tag_index.add(row, tags)
        self._n = row + 1
        self._unsaved[row] = True

    def watch_removals(self) -> None:
        """Note from now on which memories are removed (`removed_since`)."""
        self._removed = set()

    def removed_since(self) -> set[str]:
        """The memories removed since `watch_removals`; stops noting them."""
        removed, self._removed = self._removed or set(), None
        return removed

    def rows_of(self, memory_ids: Sequence[str]) -> npt.NDArray[np.int64]:
        """The rows of the given memories (each must be in the tier)."""
        return np.fromiter((self._row[i] for i in memory_ids), np.int64, len(memory_ids))

    def remove(self, memory_id: str) -> bool:
        row = self._row.pop(memory_id, None)
        if row is None:
            return False
        if self._removed is not None:
            self._removed.add(memory_id)
        last = self._n - 1
        self._tag_index.discard(row, self._tags[row])
        if row != last:
            moved = self._ids[last]
            self._tag_index.discard(last, self._tags[last])
            self._emb.row(row)[:] = self._emb.row(last)
            for column in (
                self._norms,
                self._confidence,
                self._created,
                self._recalled,
                self._count,
                self._unsaved,
            ):
                column[row] = column[last]
            self._ids[row] = moved
            self._contents[row] = self._contents[last]
            self._tags[row] = self._tags[last]
            self._row[moved] = row
            self._tag_index.add(row, self._tags[row])
        self._ids.pop()
        self._contents.pop()
        self._tags.pop()
        self._n = last
        return True

    def unsaved_ids(self) -> list[str]:
        """The memories that arrived since the last checkpoint (`mark_saved`), in row order."""
        return self._ids.take(np.flatnonzero(self._unsaved[: self._n]))

    def mark_saved(self, memory_ids: Iterable[str] | None = None) -> None:
        """The given memories (all, without) are in a checkpoint now."""
        if memory_ids is None:
            self._unsaved[: self._n] = False
            return
        row = self._row
        rows = np.fromiter((row[i] for i in memory_ids if i in row), np.int64)
        self._unsaved[rows] = False

    def get(self, memory_id: str, with_embedding: bool = True) -> memories.Memory | None:
        return self.get_many((memory_id,), with_embedding).get(memory_id)

    def get_many(
        self, memory_ids: Iterable[str], with_embedding: bool, hit_at: float = 0.0
    ) -> dict[str, memories.Memory]:
        """The memories by id (those the tier holds); with `hit_at`, as a recall at that time
        returns them: their recall counted (the caller then `touch_many`s them; each memory is
        built once, with the counts it will have). The numeric columns are read for all of
        them at once."""
        found = [(i, row) for i in memory_ids if (row := self._row.get(i)) is not None]
        if not found:
            return {}
        rows = np.fromiter((row for _, row in found), np.int64, len(found))
        confidence = self._confidence[rows].tolist()
        created = self._created[rows].tolist()
        counts = self._count[rows]
        if hit_at:
            recalled = [hit_at] * len(found)
            counts = counts + np.uint64(1)
        else:
            recalled = self._recalled[rows].tolist()
        embeddings = self._emb.gather(rows) if with_embedding else None
        out = {}
        for k, ((memory_id, row), count) in enumerate(zip(found, counts.tolist(), strict=True)):
            out[memory_id] = memories.Memory(
                id=memories.MemoryId(memory_id),
                content=self._contents[row],
                embedding=embeddings[k] if embeddings is not None else memories.NO_EMBEDDING,
                confidence=confidence[k],
                tags=dict(self._tags[row]),
                created_at=created[k],
                last_recalled_at=recalled[k],
                recall_count=count,
            )
        return out

    def touch(self, memory_id: str, at: float) -> None:
        row = self._row.get(memory_id)
        if row is not None:
            self._recalled[row] = at
            self._count[row] += 1

    def touch_many(self, memory_ids: Iterable[str], at: float) -> None:
        """`touch` for several memories, each at most once (those the tier holds)."""
        tiers.count_recalls(self._row, self._recalled, self._count, memory_ids, at)

    def top_k(
        self,
        cue: npt.NDArray[np.float32],
        k: int,
        min_score: float,
        tags: Mapping[str, str],
    ) -> list[tuple[float, str]]:
        n = self._n
        if n == 0:
            return []
        if tags:
            rows = self._tag_index.matching(tags)
            if rows.shape[0] == 0:
                return []
            scores = (self._emb.gather(rows) @ cue) / self._norms[rows]
            found = tiers.best(scores, rows, k, min_score)
        else:
            scores = self._emb.products(cue, n)
            scores /= self._norms[:n]
            found = tiers.best(scores, None, k, min_score)
        return [(score, self._ids[row]) for score, row in found]

    def recall_stats(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.uint64]]:
        """When each memory was last recalled and how often, in the order of `ids()` (copies:
        what a checkpoint saves, without gathering the rows)."""
        return self._recalled[: self._n].copy(), self._count[: self._n].copy()

    def recency(self) -> npt.NDArray[np.float64]:
        """When each row was last used: its last recall, else its creation."""
        return np.maximum(self._recalled[: self._n], self._created[: self._n])

    def take_least_recent(self, count: int) -> tiers.Columns:
        """Remove and return the `count` least recently used memories, oldest first."""
        count = min(count, self._n)
        if count == 0:
            return tiers.Columns.empty(self.dim)
        order = np.argsort(self.recency(), kind="stable")[:count]
        batch = self.rows(order)
        for memory_id in batch.ids:
            self.remove(memory_id)
        return batch

    def rows(self, rows: npt.NDArray[np.int64]) -> tiers.Columns:
        return tiers.Columns(
            ids=self._ids.take(rows),
            contents=self._contents.take(rows),
            embeddings=self._emb.gather(rows),
            confidence=self._confidence[rows].copy(),
            tags=[dict(t) for t in self._tags.take(rows)],
            created_at=self._created[rows].copy(),
            last_recalled_at=self._recalled[rows].copy(),
            recall_count=self._count[rows].copy(),
        )

    def all_rows(self) -> tiers.Columns:
        return self.rows(np.arange(self._n, dtype=np.int64))

    def columns_for(self, memory_ids: list[str]) -> tiers.Columns:
        return self.rows(self.rows_of(memory_ids))
