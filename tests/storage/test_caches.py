"""The server's decompressed-chunk cache: bounded in bytes, least recently used first, the
largest holder first, and a repeated cold recall served from it with the same answer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from memspace_contract import index
from memspace_server.storage import caches, memories, registry, settings, tiers

from .conftest import DIM, draft, make_space


def chunk(kib: int) -> caches.Chunk:
    return np.zeros((kib * 256,), np.float32)  # kib KiB


def test_the_cache_stays_within_its_bytes_and_keeps_the_start_of_a_long_scan() -> None:
    cache = caches.ChunkCache(capacity_bytes=10 * 1024)
    for n in range(30):
        cache.put("a", n, chunk(1))
        assert cache.nbytes <= 10 * 1024
    # A scan of 30 chunks through a cache of 10: the first 10 stay and hit next time, where
    # evicting them for later ones would miss on every chunk of the next scan.
    assert all(cache.get("a", n) is not None for n in range(10))
    assert cache.get("a", 29) is None


def test_the_least_recently_used_chunk_goes_first() -> None:
    cache = caches.ChunkCache(capacity_bytes=4 * 1024)
    for n in range(3):
        cache.put("a", n, chunk(1))
    assert cache.get("a", 0) is not None  # 0 is now the most recent
    cache.put("b", 0, chunk(1))
    cache.put("b", 1, chunk(1))
    assert [cache.get("a", n) is not None for n in range(3)] == [True, False, True]
    assert cache.space_bytes("b") == 2 * 1024


def test_the_space_holding_most_gives_way_to_another() -> None:
    cache = caches.ChunkCache(capacity_bytes=8 * 1024)
    for n in range(8):
        cache.put("big", n, chunk(1))
    for n in range(4):
        cache.put("small", n, chunk(1))
    # The newcomer's chunks evicted the flooder's oldest, not each other.
    assert cache.space_bytes("small") == 4 * 1024
    assert cache.space_bytes("big") == 4 * 1024
    assert cache.get("big", 0) is None
    assert cache.get("big", 7) is not None


def test_a_chunk_larger_than_the_cache_is_not_kept_and_zero_turns_it_off() -> None:
    cache = caches.ChunkCache(capacity_bytes=0)
    cache.put("a", 0, chunk(1))
    assert cache.nbytes == 0
    assert cache.get("a", 0) is None


async def test_a_repeated_cold_recall_is_served_from_the_cache(tmp_path: Path) -> None:
    engine = settings.EngineSettings(chunk_rows=16, cold_cache_bytes=1 << 20)
    reg = registry.standalone(tmp_path, engine)
    rng = np.random.default_rng(3)
    try:
        space_id = await make_space(reg, hot=1, warm=1)
        async with reg.lease(space_id) as space:
            written = [draft(rng, f"memory {i}") for i in range(200)]
            await space.remember_many(written)
            await space.consolidate()
            assert len(space.cold) > 150
            cache = reg.pools.chunks
            cue = written[50].embedding
            query = memories.Query(cue=cue, k=5, include_embeddings=True)
            first = await space.recall(query)
            misses = cache.misses
            assert cache.space_bytes(space_id) > 0
            again = await space.recall(query)
            assert cache.misses == misses  # nothing decompressed the second time
            assert cache.hits > 0
            assert [(h.memory.id, h.score) for h in again] == [
                (h.memory.id, h.score) for h in first
            ]
            assert first[0].tier == tiers.COLD
            assert first[0].memory.embedding.tobytes() == cue.tobytes()
    finally:
        await reg.close()
    assert reg.pools.chunks.nbytes == 0


async def test_new_cold_rows_are_scanned_not_a_stale_cached_chunk(tmp_path: Path) -> None:
    engine = settings.EngineSettings(chunk_rows=16)
    reg = registry.standalone(tmp_path, engine)
    rng = np.random.default_rng(4)
    try:
        space_id = await make_space(reg, hot=1, warm=1)
        async with reg.lease(space_id) as space:
            await space.remember_many([draft(rng) for _ in range(20)])
            await space.consolidate()
            await space.recall(memories.Query(cue=draft(rng).embedding, k=1))  # caches chunks
            late = draft(rng, "late")
            _count, _lsn, (late_id,) = await space.remember_many([late])
            await space.remember_many([draft(rng) for _ in range(5)])
            await space.consolidate()
            assert late_id in space.cold
            (hit,) = await space.recall(memories.Query(cue=late.embedding, k=1))
            assert hit.memory.id == late_id
            assert hit.tier == tiers.COLD
    finally:
        await reg.close()


async def test_closing_a_space_frees_its_cached_chunks(tmp_path: Path) -> None:
    reg = registry.standalone(tmp_path, settings.EngineSettings(chunk_rows=16))
    rng = np.random.default_rng(8)
    try:
        space_id = await make_space(reg, hot=1, warm=1)
        async with reg.lease(space_id) as space:
            await space.remember_many([draft(rng) for _ in range(40)])
            await space.consolidate()
            space.reconfigure(dataclasses.replace(space.entry, tiers=index.Tiers(1, 1)))
            await space.recall(memories.Query(cue=np.ones(DIM, np.float32), k=1))
            assert reg.pools.chunks.space_bytes(space_id) > 0
        await reg.unload(space_id)
        assert reg.pools.chunks.space_bytes(space_id) == 0
    finally:
        await reg.close()
