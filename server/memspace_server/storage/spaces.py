"""One memory space: its WAL, its three tiers and every operation a client can ask of it.

Writes are applied in memory in LSN order under the space's write lock and acknowledged once
their WAL record is fsynced (group commit). Scans run in worker threads under the read lock.
If the log or a checkpoint cannot be written, the space marks itself failed: the registry then
reopens it from disk, which recovers exactly what was acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memspace_contract import durable, index, wire
from memspace_contract.wire import Lsn
from memspace_server import errors, queueing, spans
from memspace_server.storage import (
    ann,
    batches,
    checkpoints,
    consolidating,
    feeds,
    frames,
    keywords,
    locks,
    memories,
    quotas,
    recovering,
    scheduling,
    subscribing,
    tiers,
    validating,
    wal,
    zarr_tiers,
)
from memspace_server.storage.hot import HotTier
from memspace_server.storage.settings import EngineSettings

log = logging.getLogger(__name__)

INLINE_SCAN = 1 << 17
"""Floats of the hot tier up to which a recall scans on the event loop (about 50 µs)."""


@dataclasses.dataclass(frozen=True)
class Health:
    space: str
    state: wire.SpaceState
    memories: int
    tier_memories: dict[wire.TierName, int]
    pressure: float
    wal_lag_ms: float
    consolidation_rate: float
    disk_bytes: int
    index_generation: int = 0
    """The generation of the space's index entry in effect (filled in by the registry)."""
    unknown: tuple[str, ...] = ()
    """Figures above that are not known (their values then mean nothing)."""
    index: ann.Status | None = None
    """The search index of the warm and cold tiers (None: not known, the space not loaded)."""


class Space:
    """A loaded memory space. Create it with `await Space.open(...)`."""

    def __init__(
        self,
        entry: index.IndexEntry,
        state: recovering.Recovered,
        settings: EngineSettings,
        pools: scheduling.Pools,
    ) -> None:
        self.entry = entry
        self.id = entry.space_id
        self.dim = entry.embedding_dim
        self.directory = state.directory
        self.settings = settings
        self._pools = pools
        self._executor = pools.io
        self._chunks = pools.chunks.for_space(self.id)
        self._checkpointer = state.checkpointer
        self.hot = state.hot
        self.warm = state.warm
        self.cold = state.cold
        self.feed = feeds.Feed(pools.fanout, space=self.id)
        self._wal: wal.Wal[feeds.Published] = wal.Wal(
            state.directory.wal,
            state.next_lsn,
            pools.wal,
            self.feed.publish,
            settings.wal_segment_bytes,
        )
        self._lock = locks.ReadWriteLock()
        self._consolidation_lock = asyncio.Lock()
        self._consolidation_task: asyncio.Task[int] | None = None
        self._bucket = self._make_bucket(entry)
        self._recall_bucket = self._make_recall_bucket(entry)
        self._backlog = consolidating.Backlog(state.replayed, state.oldest_unconsolidated)
        self._rate = consolidating.Rate()
        self._count = len(self.hot) + len(self.warm) + len(self.cold)
        self._failure: errors.MemspaceError | None = None
        self._batch_from: int | None = None
        """The marker LSN of a batch being committed, whose records are not visible yet."""
        self._rows_pinned: asyncio.Event | None = None
        """Set once the hot tier's rows may move again (`_write_run_ahead`)."""
        self._closed = False
        self._closing = False
        self._disk_bytes: tuple[float, int] | None = None
        self._last_used = time.monotonic()
        self._leases = 0
        self.ann = ann.SpaceIndex(entry.search, settings)
        self.keywords = keywords.KeywordIndex(state.directory.root, Lsn(state.next_lsn - 1))
        self._index_task: asyncio.Task[None] | None = None
        self._sampling: asyncio.Task[None] | None = None
        self.sealed: str | None = None
        """Why the space takes no more writes (a final backup holds its last ones), or None.
        Checked under the write lock: a write that gets the lock after the seal is refused."""

    @classmethod
    async def open(
        cls,
        root: Path,
        entry: index.IndexEntry,
        settings: EngineSettings,
        pools: scheduling.Pools,
    ) -> Space:
        loop = asyncio.get_running_loop()
        chunks = pools.chunks.for_space(entry.space_id)
        state = await loop.run_in_executor(
            pools.io, recovering.recover, root, entry, settings, chunks
        )
        space = cls(entry, state, settings, pools)
        await loop.run_in_executor(pools.io, space.ann.load, space.warm, space.cold)
        space._maintain_index()
        return space

    @staticmethod
    def _make_bucket(entry: index.IndexEntry) -> quotas.TokenBucket | None:
        rate = entry.quota.max_writes_per_second
        return quotas.TokenBucket(rate, "writes") if rate else None

    @staticmethod
    def _make_recall_bucket(entry: index.IndexEntry) -> quotas.TokenBucket | None:
        rate = entry.quota.max_recalls_per_second
        return quotas.TokenBucket(rate, "recalls") if rate else None

    # -- state -----------------------------------------------------------------------------

    @property
    def failed(self) -> bool:
        return self._failure is not None or self._wal.failure is not None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def closing(self) -> bool:
        """Being unloaded (or already unloaded): new requests should wait for a fresh load."""
        return self._closing or self._closed

    @property
    def durable_lsn(self) -> Lsn:
        """The last LSN on disk and committed: a change-feed reader that saw nothing can resume
        after it. A batch being written is not part of it until it is whole."""
        if self._batch_from is not None:
            return Lsn(self._batch_from - 1)
        return self._wal.durable_lsn

    @property
    def next_lsn(self) -> Lsn:
        return self._wal.next_lsn

    @contextlib.contextmanager
    def leased(self) -> Iterator[Space]:
        """Keep the space from being unloaded as idle while the caller uses it; its idle time
        counts from the end of the last lease."""
        self._leases += 1
        try:
            yield self
        finally:
            self._leases -= 1
            self._last_used = time.monotonic()

    @contextlib.asynccontextmanager
    async def frozen(self) -> AsyncIterator[tuple[Lsn, int]]:
        """Keep the space's files as they are while the caller copies them (a backup): no
        consolidation or compaction runs meanwhile, and the WAL moves to a new segment, so
        writes go on without touching the files copied. Yields (LSN, memories): the checkpoint
        and the WAL segments that start at or before that LSN hold every write through it."""
        self._check_usable()
        async with self._consolidation_lock:
            async with self._lock.write():
                self._check_usable()
                try:
                    await self._wal.roll()
                except errors.MemspaceError as err:
                    self._failure = self._failure or err
                    raise
                lsn, count = self._wal.durable_lsn, self.count()
            with self.leased():
                yield lsn, count

    def idle_s(self, now: float) -> float:
        """Seconds since the space was last used (`time.monotonic` clock); 0 while leased."""
        return 0.0 if self._leases else max(0.0, now - self._last_used)

    def end_subscriptions(self) -> None:
        """End every change-feed stream (at drain); the space stays loaded."""
        self.feed.close()

    def count(self) -> int:
        """Memories in the space. Kept by the writes themselves, so it stays exact while a
        consolidation moves memories between tiers."""
        return self._count

    def reconfigure(self, entry: index.IndexEntry) -> None:
        """Take new tiers and quotas from the index (the embedding size never changes)."""
        if entry.embedding_dim != self.dim:
            raise errors.SpaceConflictError(
                f"space {self.id!r} has embeddingDim {self.dim}; it cannot change to "
                f"{entry.embedding_dim}"
            )
        if entry.quota.max_writes_per_second != self.entry.quota.max_writes_per_second:
            self._bucket = self._make_bucket(entry)
        if entry.quota.max_recalls_per_second != self.entry.quota.max_recalls_per_second:
            self._recall_bucket = self._make_recall_bucket(entry)
        changed = entry.search != self.entry.search
        self.entry = entry
        if changed:
            self.ann.reconfigure(entry.search)
            with contextlib.suppress(RuntimeError):  # no running loop: the next write builds
                self._maintain_index()

    def _check_usable(self) -> None:
        failure = self._failure or self._wal.failure
        if failure is not None:
            raise errors.UnavailableError(
                f"space {self.id!r} is reloading after a storage error ({failure}); retry shortly"
            )
        if self._closed:
            raise errors.UnavailableError(f"space {self.id!r} is being unloaded; retry shortly")

    def _check_writable(self) -> None:
        self._check_usable()
        if self.sealed is not None:
            raise errors.SpaceSealedError(self.sealed)

    def _locate(self, memory_id: str) -> tiers.TierStore | None:
        for tier in (self.hot, self.warm, self.cold):
            if memory_id in tier:
                return tier
        return None

    def _stored(self, ids: Collection[str]) -> list[tuple[HotTier | zarr_tiers.ZarrTier, set[str]]]:
        """Which of `ids` the space already holds, by tier (a memory is in one tier at most):
        one set operation a tier, not a lookup a memory."""
        found: list[tuple[HotTier | zarr_tiers.ZarrTier, set[str]]] = []
        for tier in (self.hot, self.warm, self.cold):
            if len(tier):
                held = tier.present(ids)
                if held:
                    found.append((tier, held))
        return found

    def _replace(
        self, stored: list[tuple[HotTier | zarr_tiers.ZarrTier, set[str]]], new: int
    ) -> None:
        """Remove the stored versions of memories about to be written again; count the new."""
        for tier, held in stored:
            assert tier is not self.hot or self._rows_pinned is None  # `_rows_settled` first
            for memory_id in held:
                tier.remove(memory_id)
        self._count += new

    async def _durable(self, future: asyncio.Future[None]) -> None:
        # The call's turn on the event loop bounds its work there, not its wait on the disk:
        # hand it on before the group commit's fsync (a unary call holds one, `queueing`).
        queueing.give_back()
        try:
            await future
        except errors.MemspaceError as err:
            self._failure = self._failure or err
            raise

    def _note_writes(self, count: int, now: float) -> None:
        self._last_used = time.monotonic()
        self._backlog.note(count, now)

    # -- writes ----------------------------------------------------------------------------

    async def remember(self, draft: memories.Draft) -> tuple[str, Lsn]:
        _count, lsn, ids = await self.remember_many([draft])
        return ids[0], lsn

    async def remember_many(self, drafts: Sequence[memories.Draft]) -> tuple[int, Lsn, list[str]]:
        """Store every draft or none: all are validated before anything is written."""
        self._check_writable()
        now = time.time()
        batch = validating.validate(drafts, self.dim, now)
        count = len(batch)
        if not count:
            return 0, self._wal.durable_lsn, []
        if self._bucket is not None:
            self._bucket.take(count)
        async with self._lock.write():
            self._check_writable()
            last: dict[str, int] | None = None
            stored: list[tuple[HotTier | zarr_tiers.ZarrTier, set[str]]] = []
            new = count
            if any(draft.id for draft in drafts):
                last = dict(zip(batch.ids, range(count), strict=True))
                stored = self._stored(last.keys())
                new = len(last) - sum(len(held) for _tier, held in stored)
                if await self._rows_settled(tier for tier, _held in stored):
                    self._check_writable()
            # Otherwise every ID is one the server just drew (128 random bits, `validating`):
            # none is stored already or given twice, so none is looked up in the tiers (a
            # lookup of a new key in a large tier's index is a cache miss a memory).
            limit = self.entry.quota.max_memories
            if limit is not None and self.count() + new > limit:
                raise errors.QuotaExceededError(
                    f"space {self.id!r} holds {self.count()} memories; its quota "
                    f"maxMemories is {limit}. Forget some or raise the quota"
                )
            # Encoded by the WAL's writer into one frame with the writes beside it (a write
            # over FRAME_BYTES: several behind a batch marker), replayed whole or not at all.
            events: list[feeds.Published] = [
                feeds.Run(feeds.EventType.REMEMBERED, batch.ids, self._wal.next_lsn, now)
            ]
            lsn, future = self._wal.append(frames.Write(batch), now, self.dim, events)
            self._replace(stored, new)
            self.keywords.add(batch.ids, batch.contents, batch.tags, lsn)
            # `_replace` removed every stored version of these memories.
            if last is None or len(last) == count:
                self.hot.add(batch, checked=True)
            else:  # an id given twice: its last draft counts
                rows = np.sort(np.fromiter(last.values(), np.int64, len(last)))
                self.hot.add(batch.take(rows), checked=True)
            self._note_writes(count, now)
        await self._durable(future)
        self._maybe_consolidate()
        return count, lsn, batch.ids

    def stage_batch(self, max_bytes: int, max_count: int) -> batches.BatchStage:
        """A stage for a RememberBatch stream into this space (see `commit_batch`)."""
        self._check_writable()
        return batches.BatchStage(
            self.directory.root, self.dim, max_bytes, max_count, self._executor
        )

    async def commit_batch(self, stage: batches.BatchStage) -> tuple[int, Lsn, list[str]]:
        """Store every staged memory or none. Returns (count, last LSN, IDs).

        The batch goes to the WAL as a marker and its records, a chunk per append, under the
        write lock: readers wait, and nothing else enters the log meanwhile. Each chunk enters
        the hot tier once it is durable. Once the first append is queued the commit runs to its
        end even if its caller is cancelled (a cut-short batch in the middle of the log could
        not be told from the records after it); a failed append fails the space, which reloads
        from disk, where recovery cuts the incomplete batch off."""
        self._check_writable()
        count = len(stage)
        if count == 0:
            return 0, self.durable_lsn, []
        if self._bucket is not None:
            self._bucket.take(count)
        task = asyncio.get_running_loop().create_task(self._commit_batch(stage))
        return await asyncio.shield(task)

    async def _commit_batch(self, stage: batches.BatchStage) -> tuple[int, Lsn, list[str]]:
        count = len(stage)
        loop = asyncio.get_running_loop()
        async with self._lock.write():
            self._check_writable()
            limit = self.entry.quota.max_memories
            if limit is not None:
                ids = set(stage.ids)
                new = len(ids) - sum(len(held) for _tier, held in self._stored(ids))
                if self.count() + new > limit:
                    raise errors.QuotaExceededError(
                        f"space {self.id!r} holds {self.count()} memories; its quota "
                        f"maxMemories is {limit}. Forget some or raise the quota"
                    )
            now = time.time()
            first = self._wal.next_lsn
            self._batch_from = first
            self._wal.holding_segment = True
            lsn: int = first
            queued: tuple[asyncio.Future[None], batches.Chunk] | None = None
            submitted = False
            try:
                header: list[bytes] = [wal.frame(frames.encode_marker(first, now, count))]
                async for chunk in stage.chunks():
                    framed = await loop.run_in_executor(
                        self._executor, batches.stamped, chunk, lsn, now
                    )
                    lsn += len(chunk)
                    if queued is not None:
                        await self._apply_durable(*queued)
                    _last, future = self._wal.submit_frames(header + framed, len(chunk), [])
                    submitted = True
                    header = []
                    queued = (future, chunk)
                    del framed
                if queued is not None:
                    await self._apply_durable(*queued)
            except BaseException:
                # Part of the batch may be in the log, and part of it in the hot tier: only a
                # reload from disk (which cuts the batch off) makes the space whole again.
                if submitted:
                    self._failure = self._failure or errors.UnavailableError(
                        f"space {self.id!r}: a batch failed midway; it reloads from disk"
                    )
                raise
            finally:
                self._wal.holding_segment = False
                self._batch_from = None
            last = Lsn(lsn - 1)
            self._note_writes(count, now)
            self.feed.publish([feeds.Run(feeds.EventType.REMEMBERED, stage.ids, first, now)])
        self._maybe_consolidate()
        return count, last, list(stage.ids)

    async def _apply_durable(self, future: asyncio.Future[None], chunk: batches.Chunk) -> None:
        """Wait for a chunk to be on disk, then put its memories in the hot tier."""
        await self._durable(future)
        columns = await asyncio.get_running_loop().run_in_executor(
            self._executor, batches.latest_columns, chunk
        )
        stored = self._stored(columns.ids)
        await self._rows_settled(tier for tier, _held in stored)
        self._replace(stored, len(columns) - sum(len(held) for _tier, held in stored))
        self.hot.add(columns, checked=True)
        self.keywords.add(columns.ids, columns.contents, columns.tags, self._wal.next_lsn - 1)

    async def forget(self, memory_id: str) -> tuple[bool, Lsn]:
        self._check_writable()
        memory_id = memories.check_id(memory_id)
        if self._bucket is not None:
            self._bucket.take(1)
        now = time.time()
        async with self._lock.write():
            self._check_writable()
            tier = self._locate(memory_id)
            if tier is None:
                return False, Lsn(0)
            if await self._rows_settled((tier,)):
                self._check_writable()
            forgotten: list[feeds.Published] = [
                feeds.Event(feeds.EventType.FORGOTTEN, memory_id, self._wal.next_lsn, now)
            ]
            lsn, future = self._wal.append(
                frames.Write(None, (memory_id,)), now, self.dim, forgotten
            )
            tier.remove(memory_id)
            self.keywords.remove(memory_id, lsn)
            self._count -= 1
            self._note_writes(1, now)
        await self._durable(future)
        self._maybe_consolidate()
        return True, lsn

    # -- reads -----------------------------------------------------------------------------

    async def get(self, memory_id: str) -> memories.Memory:
        self._check_usable()
        memory_id = memories.check_id(memory_id)
        self._last_used = time.monotonic()
        async with self._lock.read():
            self._check_usable()
            memory = self.hot.get(memory_id)
            if memory is None:
                for tier in (self.warm, self.cold):
                    if memory_id in tier:
                        memory = await asyncio.get_running_loop().run_in_executor(
                            self._executor, tier.get, memory_id
                        )
                        break
        if memory is None:
            raise errors.MemoryNotFoundError(f"no memory {memory_id!r} in space {self.id!r}")
        return memory

    def _search(
        self, query: memories.Query, now: float, parent: spans.Context | None = None
    ) -> list[memories.Hit]:
        """The top hits, each memory built once as this recall returns it (its recall counted
        at `now`; `recall` then touches them on the event loop). `parent`: the recall's trace
        context, for the span of each tier's search (a worker thread does not inherit it)."""
        top = self._ranked(query, parent)
        found: dict[str, dict[str, memories.Memory]] = {}
        for tier in (self.hot, self.warm, self.cold):
            wanted = [memory_id for _, name, memory_id in top if name == tier.name]
            if wanted:
                found[tier.name] = tier.get_many(wanted, query.include_embeddings, now)
        hits = []
        for score, name, memory_id in top:
            memory = found[name].get(memory_id)
            if memory is not None:
                hits.append(memories.Hit(memory=memory, score=score, tier=name))
        return hits

    def _top(
        self, query: memories.Query, exact: bool, parent: spans.Context | None = None
    ) -> list[tiers.Candidate]:
        """The top k (score, tier, id) of every tier: hot scanned, warm and cold through their
        search graphs unless `exact` (or the space searches exactly). One span per tier."""
        cue = tiers.unit(query.cue)
        use_graphs = self.ann.wanted(self.warm, self.cold)
        candidates: list[tiers.Candidate] = []
        for tier in (self.hot, self.warm, self.cold):
            graph = use_graphs and not exact and tier is not self.hot
            scan = spans.span("memspace.tier.scan", self._scan_attributes(tier, graph), parent)
            with scan as span:
                if isinstance(tier, zarr_tiers.ZarrTier):
                    found = self.ann.top_k(tier, query, cue, exact, use_graphs)
                else:
                    found = tier.top_k(cue, query.k, query.min_score, query.tags)
                if span is not None:
                    span.set_attribute("memspace.hits", len(found))
            candidates.extend((score, tier.name, memory_id) for score, memory_id in found)
        return tiers.merge(candidates, query.k)

    def _ranked(
        self, query: memories.Query, parent: spans.Context | None = None
    ) -> list[tiers.Candidate]:
        """The top k (score, tier, id) by the query's mode: cosine (`_top`), BM25 of the text
        query (the keyword index), or both fused by reciprocal rank (`keywords.fuse`)."""
        if query.mode == memories.VECTOR:
            return self._top(query, query.exact, parent)
        depth = query.k if query.mode == memories.KEYWORD else keywords.depth(query.k)
        # min_score is a BM25 floor for keyword recall and a cosine floor for hybrid recall.
        floor = query.min_score if query.mode == memories.KEYWORD else -1.0
        found = self.keywords.search(query.text, depth, query.tags, floor, self._texts)
        by_keyword = [
            (score, tier.name, memory_id)
            for score, memory_id in found
            if (tier := self._locate(memory_id)) is not None
        ]
        if query.mode == memories.KEYWORD:
            return by_keyword
        by_vector = self._top(dataclasses.replace(query, k=depth), query.exact, parent)
        return keywords.fuse([by_vector, by_keyword], query.k)

    def _texts(self) -> Iterator[keywords.Text]:
        """Every memory's (ID, content, tags), for a rebuild of the keyword index."""
        yield from self.hot.texts()
        yield from self.warm.texts()
        yield from self.cold.texts()

    def _scan_attributes(self, tier: tiers.TierStore, graph: bool) -> dict[str, Any] | None:
        if not spans.ENABLED:
            return None
        found: dict[str, Any] = {
            spans.SPACE: self.id,
            "memspace.tier": tier.name,
            "memspace.search": "graph" if graph else "exact",
        }
        if not graph:
            # An exact scan reads every live row of the tier (tag filters narrow it first); a
            # graph search visits a part of it, not counted.
            found["memspace.rows_scanned"] = len(tier)
        return found

    def _scan_is_small(self) -> bool:
        """A scan cheap enough to run on the event loop: a thread hop would cost more. Only a
        hot-only space qualifies (warm and cold hits read files)."""
        return (
            self.warm.rows == 0 and self.cold.rows == 0 and len(self.hot) * self.dim <= INLINE_SCAN
        )

    async def recall(self, query: memories.Query) -> list[memories.Hit]:
        self._check_usable()
        query = memories.validate_query(query, self.dim)
        if self._recall_bucket is not None:
            self._recall_bucket.take(1)
        self._last_used = time.monotonic()
        now = time.time()
        async with self._lock.read():
            self._check_usable()
            approximate = not query.exact and self.ann.approximate(self.warm, self.cold)
            if self._scan_is_small() and query.mode == memories.VECTOR:
                hits = self._search(query, now)
            else:
                # Admitted round robin by space with a cap per space: a flood of recalls on
                # one space does not queue another space's recall behind it.
                hits = await self._pools.scans.run(
                    self.id, self._search, query, now, spans.current()
                )
            # Still under the read lock: no consolidation has moved the hits since.
            for tier in (self.hot, self.warm, self.cold):
                touched = [hit.memory.id for hit in hits if hit.tier == tier.name]
                if touched:
                    tier.touch_many(touched, now)
        if approximate:
            self._maybe_sample_recall(query, [hit.memory.id for hit in hits])
        return hits

    def _maybe_sample_recall(self, query: memories.Query, found: list[str]) -> None:
        """Now and then (`ann_recall_sample`), run an approximate recall again exactly in the
        background and note its recall@k; one such run at a time per space."""
        fraction = self.settings.ann_recall_sample
        if fraction <= 0 or random.random() >= fraction:  # noqa: S311 - sampling, not secrets
            return
        if self._sampling is not None and not self._sampling.done():
            return
        self._sampling = asyncio.get_running_loop().create_task(self._sample_recall(query, found))

    async def _sample_recall(self, query: memories.Query, found: list[str]) -> None:
        try:
            async with self._lock.read():
                if self.closing or self.failed:
                    return
                top = await self._pools.scans.run(self.id, self._top, query, True)
            self.ann.meter.note(found, [memory_id for _, _, memory_id in top])
        except errors.MemspaceError as err:
            log.warning("space %s: measuring recall failed: %s", self.id, err)

    # -- the search index --------------------------------------------------------------------

    def _maintain_index(self) -> None:
        """Start building the search graphs due, in the background, if none is running."""
        if self._index_task is not None and not self._index_task.done():
            return
        if self.closing or self.ann.next_job(self.warm, self.cold) is None:
            return
        self._index_task = asyncio.get_running_loop().create_task(self._build_index())

    def _tier(self, name: str) -> zarr_tiers.ZarrTier:
        return self.warm if name == tiers.WARM else self.cold

    async def _build_index(self) -> None:
        """Build or extend the graphs due, one after the other. Rows are read under the read
        lock a batch at a time and added to a copy outside it, in the server's build thread;
        the copy is saved, then published. A tier compacted meanwhile (a new generation)
        abandons the build, and the loop starts that generation's."""
        loop = asyncio.get_running_loop()
        builder = ann.builder()
        self.ann.building = True
        try:
            while not self.closing:
                async with self._lock.read():
                    job = self.ann.next_job(self.warm, self.cold)
                if job is None:
                    break
                hnsw = await loop.run_in_executor(
                    builder, ann.started, job.base, self.dim, self.ann.params
                )
                done = job.base.rows if job.base is not None else 0
                while done < job.rows:
                    end = min(done + ann.BUILD_BATCH, job.rows)
                    async with self._lock.read():
                        tier = self._tier(job.name)
                        if self.closing or tier.generation != job.generation:
                            break
                        vectors = await loop.run_in_executor(
                            self._executor, tier.vectors_between, done, end
                        )
                    threads = self.settings.ann_build_threads
                    await loop.run_in_executor(builder, ann.add, hnsw, vectors, threads)
                    done = end
                if done < job.rows:
                    continue
                graph = ann.Graph(hnsw, job.generation, self.ann.params)
                async with self._lock.read():
                    tier = self._tier(job.name)
                    if self.closing or tier.generation != job.generation:
                        continue
                    await loop.run_in_executor(builder, ann.save, tier, graph)
                    self.ann.graphs[job.name] = graph
                self.ann.failed = False
        except Exception:
            # Derived data: exact scans answer meanwhile, and the next consolidation retries.
            log.exception("space %s: building its search index failed", self.id)
            self.ann.failed = True
        finally:
            self.ann.building = False

    async def index_built(self) -> ann.Status:
        """Wait until no graph build is running or due (for tests and tools)."""
        while self._index_task is not None and not self._index_task.done():
            await asyncio.shield(self._index_task)
            self._maintain_index()
        return self.ann.status(self.warm, self.cold)

    async def subscribe(self, since_lsn: int = 0) -> AsyncGenerator[feeds.Event, None]:
        """Events in LSN order: from `since_lsn` (inclusive) if the WAL still holds it, then
        live; `since_lsn` 0 means from now on."""
        self._check_usable()
        if since_lsn < 0:
            raise errors.InvalidArgumentError("since_lsn must be 0 or a positive LSN")
        durable = self._wal.durable_lsn
        if since_lsn:
            first = self._wal.first_retained_lsn()
            if since_lsn < first:
                raise errors.LsnNotRetainedError(
                    f"since_lsn {since_lsn} is no longer in the WAL of space {self.id!r} "
                    f"(it holds LSN {first} onwards); resubscribe with since_lsn >= {first} or 0"
                )
        subscription = self.feed.subscribe(self.settings.subscriber_buffer, durable)
        return subscribing.follow(
            subscription, self.directory.wal, since_lsn, durable, self._executor
        )

    # -- consolidation ---------------------------------------------------------------------

    def _maybe_consolidate(self) -> None:
        if self._consolidation_task is not None and not self._consolidation_task.done():
            return
        if consolidating.needs_consolidation(
            self.hot, self.warm, self._wal, self.entry.tiers, self.settings.consolidate_wal_bytes
        ):
            self._consolidation_task = asyncio.get_running_loop().create_task(
                self._background_consolidation()
            )

    async def _background_consolidation(self) -> int:
        try:
            return await self.consolidate()
        except errors.MemspaceError as err:
            log.warning("space %s: background consolidation failed: %s", self.id, err)
            return 0

    def due_for_consolidation(self) -> bool:
        """Unconsolidated records older than the consolidation interval (for the registry)."""
        return self._backlog.due(self.settings.consolidate_interval_s, time.time())

    async def consolidate(self) -> int:
        """Demote over-capacity tiers, write a checkpoint and drop the WAL it covers
        (`consolidating`). Returns the number of WAL records consolidated."""
        attributes = {spans.SPACE: self.id} if spans.ENABLED else None
        with spans.span("memspace.consolidate", attributes) as span:
            count = await self._consolidate()
            if span is not None:
                span.set_attribute("memspace.consolidated", count)
            return count

    async def _write_run_ahead(self) -> checkpoints.Ahead | None:
        """Write the run of the hot tier's new memories before the checkpoint that will name
        it, with the space serving meanwhile: the write lock is held only to pick them; their
        rows stay put until the run is written (removals wait, `_rows_settled`), while writes
        of new memories and recalls go on. Those removed after it (forgotten, or written
        again) are left out of it by the checkpoint. None if there are few to write, or the
        run could not be written (the checkpoint then writes them under the lock, as ever)."""
        await self._rows_settled((self.hot,))  # a cancelled consolidation's run may be written
        async with self._lock.write():
            self._check_usable()
            fresh = self._checkpointer.ahead_of_checkpoint(self.hot)
            if fresh is None:
                return None
            rows = self.hot.rows_of(fresh)
            self.hot.watch_removals()
            pinned = self._rows_pinned = asyncio.Event()
        loop = asyncio.get_running_loop()

        def release() -> None:
            if self._rows_pinned is pinned:
                self._rows_pinned = None
            pinned.set()

        writing = self._executor.submit(self._checkpointer.write_run_ahead, self.hot, fresh, rows)
        try:
            return await asyncio.wrap_future(writing)
        except Exception:
            log.exception("space %s: the run ahead of a checkpoint was not written", self.id)
            return None
        finally:
            # Cancelled, the thread may still be reading the rows: they stay put until it ends.
            if writing.done():
                release()
            else:
                writing.add_done_callback(lambda _done: loop.call_soon_threadsafe(release))

    async def _rows_settled(self, touched: Iterable[tiers.TierStore]) -> bool:
        """Before removing memories from the `touched` tiers: if the hot tier is one of them
        (a removal moves its last row into the hole), wait while a run is written from its
        rows (`_write_run_ahead`). True if it waited (the space may have changed meanwhile)."""
        pinned = self._rows_pinned
        if pinned is None or not any(tier is self.hot for tier in touched):
            return False
        await pinned.wait()
        return True

    async def _consolidate(self) -> int:
        self._check_usable()
        async with self._consolidation_lock:
            ahead = await self._write_run_ahead()
            try:
                return await self._consolidate_locked(ahead)
            finally:
                self.hot.removed_since()  # stops noting removals, whatever happened

    async def _consolidate_locked(self, ahead: checkpoints.Ahead | None) -> int:
        async with self._lock.write():
            removed = self.hot.removed_since()
            if ahead is not None:
                ahead = checkpoints.Ahead(
                    ahead.run, [i for i in ahead.memory_ids if i not in removed]
                )
            self._check_usable()
            try:
                await self._wal.roll()
            except errors.MemspaceError as err:
                self._failure = self._failure or err
                raise
            lsn = self._wal.durable_lsn
            caps = self.entry.tiers
            demoted = self.hot.take_least_recent(
                consolidating.overflow(len(self.hot), caps.hot_capacity, self.settings.demote_slack)
            )
            write = functools.partial(
                consolidating.write,
                demoted,
                hot=self.hot,
                warm=self.warm,
                cold=self.cold,
                checkpointer=self._checkpointer,
                log=self._wal,
                caps=caps,
                settings=self.settings,
                lsn=lsn,
                ahead=ahead,
            )
            try:
                self.warm, self.cold = await asyncio.get_running_loop().run_in_executor(
                    self._executor, write
                )
            except Exception as err:
                log.exception("space %s: consolidation failed; the space will reload", self.id)
                if durable.is_disk_full(err):
                    self._failure = errors.DiskFullError(
                        "the space's volume is full; consolidation could not write its checkpoint"
                    )
                else:
                    self._failure = errors.UnavailableError(
                        f"space {self.id!r}: consolidation failed; it reloads from disk"
                    )
                raise self._failure from err
            count = self._backlog.clear()
            self._wal.mark_consolidated()
            await asyncio.get_running_loop().run_in_executor(self._executor, self.keywords.flush)
            # Memories consolidated are the WAL records moved into the tiers; demotions between
            # tiers are not consolidations (counting both read 10 records + 8 demotions as 18).
            self._rate.note(count)
            self._disk_bytes = None
        self._maintain_index()
        return count

    # -- metrics and lifecycle -------------------------------------------------------------

    def consolidation_rate(self) -> float:
        return self._rate.per_second()

    @property
    def rate(self) -> consolidating.Rate:
        """Its consolidations of the last minute (kept by the registry when the space unloads,
        so that its rate stays known)."""
        return self._rate

    def disk_bytes(self) -> int:
        """Bytes on the space's volume (cached for a few seconds: it walks the directory)."""
        now = time.monotonic()
        if self._disk_bytes is None or now - self._disk_bytes[0] > 5.0:
            self._disk_bytes = (now, self.directory.disk_bytes())
        return self._disk_bytes[1]

    def health(self) -> Health:
        return Health(
            space=self.id,
            state=wire.FAILED if self.failed else self.entry.state,
            memories=self.count(),
            tier_memories={
                tiers.HOT: len(self.hot),
                tiers.WARM: len(self.warm),
                tiers.COLD: len(self.cold),
            },
            pressure=len(self.hot) / self.entry.tiers.hot_capacity,
            wal_lag_ms=self._backlog.lag_ms(time.time()),
            consolidation_rate=self.consolidation_rate(),
            disk_bytes=self.disk_bytes(),
            index=self.ann.status(self.warm, self.cold),
        )

    async def close(self, consolidate: bool = True) -> None:
        """Flush and release everything: no RAM for data, no open files afterwards."""
        if self._closed:
            return
        self._closing = True
        try:
            if consolidate and not self.failed and self._backlog.records:
                await self.consolidate()
        except errors.MemspaceError as err:
            log.warning("space %s: could not consolidate on close: %s", self.id, err)
        finally:
            self._closed = True
            healthy = not self.failed
            for task in (self._index_task, self._sampling):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            self.feed.close()
            with contextlib.suppress(errors.MemspaceError):
                await self._wal.close()
            self.warm.close()
            self.cold.close()
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self.keywords.close, healthy
            )
            self.hot = HotTier(self.dim)
