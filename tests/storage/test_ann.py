"""The approximate search index of the warm and cold tiers (storage/ann.py), on real spaces:
real Zarr tiers on disk, real faiss graphs built in the background, saved and loaded."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from memspace_contract import index, spaces
from memspace_server.storage import ann, memories, registry, settings, tiers
from memspace_server.storage.spaces import Space
from tests.storage.conftest import DIM, vec

HNSW = index.SearchIndex(type="hnsw", m=16, ef_construction=64, ef_search=64)


@pytest.fixture
def engine_settings() -> settings.EngineSettings:
    return settings.EngineSettings(chunk_rows=64, wal_segment_bytes=1 << 20, ann_recall_sample=0.0)


async def make(
    reg: registry.Registry,
    search: index.SearchIndex = HNSW,
    hot: int = 20,
    warm: int = 1_000_000,
    name: str = "alpha",
) -> spaces.SpaceId:
    space_id = spaces.parse_space_id(name)
    await reg.create(
        space_id,
        DIM,
        tiers_config=index.Tiers(hot_capacity=hot, warm_capacity=warm),
        search=search,
    )
    return space_id


def drafts(rng: np.random.Generator, count: int, **kwargs: object) -> list[memories.Draft]:
    return [
        memories.Draft(content=f"m{i}", embedding=vec(rng), **kwargs)  # type: ignore[arg-type]
        for i in range(count)
    ]


async def fill(space: Space, rng: np.random.Generator, count: int, **kwargs: object) -> list[str]:
    """Remember `count` memories and consolidate, so that all but the hot tier's share are in
    the warm tier; then wait for the graphs."""
    _, _, ids = await space.remember_many(drafts(rng, count, **kwargs))
    await space.consolidate()
    await space.index_built()
    return ids


async def ids_of(space: Space, query: memories.Query) -> list[str]:
    return [hit.memory.id for hit in await space.recall(query)]


async def test_auto_searches_exactly_below_the_threshold_and_through_a_graph_from_it(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(1)
    search = dataclasses.replace(HNSW, type="auto", auto_threshold=100)
    space_id = await make(spaces_registry, search)
    async with spaces_registry.lease(space_id) as space:
        await fill(space, rng, 90)
        below = space.health().index
        assert below is not None
        assert (below.type, below.state, below.rows) == ("exact", "none", 0)
        assert not space.ann.approximate(space.warm, space.cold)
        assert ann.persisted_files(space.warm.root) == []

        await fill(space, rng, 60)  # warm + cold now 130 - hot's share >= 100
        assert len(space.warm) + len(space.cold) >= 100
        above = space.health().index
        assert above is not None
        assert (above.type, above.state) == ("hnsw", "ready")
        assert above.rows == space.warm.rows
        assert space.ann.approximate(space.warm, space.cold)
        names = [p.name for p in ann.persisted_files(space.warm.root)]
        assert names == [
            f"g{space.warm.generation:06d}.faiss",
            f"g{space.warm.generation:06d}.json",
        ]


async def test_forgotten_memories_never_come_back_through_the_graph(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(2)
    space_id = await make(spaces_registry)
    async with spaces_registry.lease(space_id) as space:
        ids = await fill(space, rng, 300)
        assert space.ann.graphs[tiers.WARM].rows == space.warm.rows
        in_warm = [i for i in ids if i in space.warm]
        for victim in in_warm[:40]:
            memory = await space.get(victim)
            assert (await space.forget(victim))[0]
            found = await ids_of(space, memories.Query(cue=memory.embedding, k=10))
            assert victim not in found
            assert len(found) == 10
        # The graph still holds the forgotten rows: only the tombstones keep them out.
        assert space.ann.graphs[tiers.WARM].rows == space.warm.rows
        assert space.warm.tombstones() == 40


async def test_tag_filters_hold_and_a_selective_filter_is_answered_exactly(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(3)
    space_id = await make(spaces_registry)
    async with spaces_registry.lease(space_id) as space:
        await space.remember_many(drafts(rng, 200, tags={"kind": "common"}))
        await space.remember_many(drafts(rng, 150, tags={"kind": "other"}))
        _, _, rare = await space.remember_many(drafts(rng, 6, tags={"kind": "rare"}))
        await space.consolidate()
        await space.index_built()
        assert space.ann.approximate(space.warm, space.cold)
        for _ in range(20):
            cue = vec(rng)
            for kind in ("common", "other"):
                query = memories.Query(cue=cue, k=10, tags={"kind": kind})
                hits = await space.recall(query)
                assert len(hits) == 10
                assert all(hit.memory.tags == {"kind": kind} for hit in hits)
                exact = await ids_of(space, dataclasses.replace(query, exact=True))
                assert len(set(exact) & {hit.memory.id for hit in hits}) >= 8
            # Six rows of ~350: far below the exact fraction, so they are scanned, all found.
            found = await ids_of(space, memories.Query(cue=cue, k=10, tags={"kind": "rare"}))
            assert sorted(found) == sorted(rare)


async def test_min_score_holds_through_the_graph(spaces_registry: registry.Registry) -> None:
    rng = np.random.default_rng(4)
    space_id = await make(spaces_registry)
    async with spaces_registry.lease(space_id) as space:
        await fill(space, rng, 400)
        for _ in range(20):
            cue = vec(rng)
            query = memories.Query(cue=cue, k=50, min_score=0.3)
            hits = await space.recall(query)
            assert all(hit.score >= 0.3 for hit in hits)
            exact = await space.recall(dataclasses.replace(query, exact=True))
            assert all(hit.score >= 0.3 for hit in exact)
            assert len(hits) >= len(exact) - 3


async def test_exact_recall_matches_a_brute_force_scan_and_the_graph_comes_close(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(5)
    space_id = await make(spaces_registry, hot=10, warm=300)
    async with spaces_registry.lease(space_id) as space:
        ids = await fill(space, rng, 800)
        assert space.warm.rows
        assert space.cold.rows
        assert set(space.ann.graphs) == {tiers.WARM, tiers.COLD}
        matrix = np.stack([(await space.get(i)).embedding for i in ids])
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        overlap = 0
        for _ in range(30):
            cue = vec(rng)
            truth = [ids[i] for i in np.argsort(-(matrix @ (cue / np.linalg.norm(cue))))[:10]]
            exact = await ids_of(space, memories.Query(cue=cue, k=10, exact=True))
            assert exact == truth
            approximate = await ids_of(space, memories.Query(cue=cue, k=10))
            overlap += len(set(approximate) & set(truth))
        assert overlap / 300 >= 0.95


async def test_rows_added_after_a_build_are_found_before_the_graph_is_extended(
    tmp_path: Path,
) -> None:
    engine = settings.EngineSettings(chunk_rows=64, ann_extend_fraction=10.0, ann_recall_sample=0)
    reg = registry.standalone(tmp_path / "data", engine)
    rng = np.random.default_rng(6)
    try:
        space_id = await make(reg)
        async with reg.lease(space_id) as space:
            await fill(space, rng, 200)
            covered = space.ann.graphs[tiers.WARM].rows
            late = await fill(space, rng, 100)
            assert space.ann.graphs[tiers.WARM].rows == covered < space.warm.rows
            for memory_id in [i for i in late if i in space.warm][:20]:
                memory = await space.get(memory_id)
                found = await ids_of(space, memories.Query(cue=memory.embedding, k=3))
                assert found[0] == memory_id
    finally:
        await reg.close()


async def test_a_restart_loads_the_saved_graph_without_building(tmp_path: Path) -> None:
    engine = settings.EngineSettings(chunk_rows=64, ann_recall_sample=0)
    rng = np.random.default_rng(7)
    cues = [vec(rng) for _ in range(10)]
    reg = registry.standalone(tmp_path / "data", engine)
    try:
        space_id = await make(reg)
        async with reg.lease(space_id) as space:
            await fill(space, rng, 300)
            before = [await ids_of(space, memories.Query(cue=c, k=5)) for c in cues]
            saved = {p: p.stat().st_mtime_ns for p in ann.persisted_files(space.warm.root)}
            assert len(saved) == 2
    finally:
        await reg.close()
    reg = registry.standalone(tmp_path / "data", engine)
    try:
        async with reg.lease(space_id) as space:
            # Published at open, with no build started.
            assert space.ann.graphs[tiers.WARM].rows == space.warm.rows
            assert space._index_task is None
            status = space.health().index
            assert status is not None
            assert (status.state, status.rows) == ("ready", space.warm.rows)
            after = [await ids_of(space, memories.Query(cue=c, k=5)) for c in cues]
            assert after == before
            assert {p: p.stat().st_mtime_ns for p in ann.persisted_files(space.warm.root)} == saved
    finally:
        await reg.close()


@pytest.mark.parametrize("damage", ["cut-short", "temporary-left", "other-generation", "no-meta"])
async def test_a_graph_damaged_by_a_crash_is_built_again(tmp_path: Path, damage: str) -> None:
    engine = settings.EngineSettings(chunk_rows=64, ann_recall_sample=0)
    rng = np.random.default_rng(8)
    cues = [vec(rng) for _ in range(10)]
    reg = registry.standalone(tmp_path / "data", engine)
    try:
        space_id = await make(reg)
        async with reg.lease(space_id) as space:
            await fill(space, rng, 300)
            exact = [await ids_of(space, memories.Query(cue=c, k=5, exact=True)) for c in cues]
            graph_path, meta_path = ann.persisted_files(space.warm.root)
    finally:
        await reg.close()
    leftover = graph_path.with_name(f".{graph_path.name}.tmp")
    if damage == "cut-short":  # a crash while the graph was written over
        graph_path.write_bytes(graph_path.read_bytes()[:1000])
    elif damage == "temporary-left":  # a crash before the rename: the old graph is gone too
        leftover.write_bytes(graph_path.read_bytes()[:500])
        graph_path.unlink()
    elif damage == "other-generation":  # a graph that does not describe these rows
        meta = json.loads(meta_path.read_text())
        meta["firstId"] = "0" * 32
        meta_path.write_text(json.dumps(meta))
    else:  # a crash between the graph's rename and its description
        meta_path.unlink()
    reg = registry.standalone(tmp_path / "data", engine)
    try:
        async with reg.lease(space_id) as space:
            assert not leftover.exists()
            status = await space.index_built()
            assert (status.state, status.rows) == ("ready", space.warm.rows)
            assert len(ann.persisted_files(space.warm.root)) == 2
            for cue, truth in zip(cues, exact, strict=True):
                found = await ids_of(space, memories.Query(cue=cue, k=5))
                assert len(set(found) & set(truth)) >= 4
    finally:
        await reg.close()


async def test_sampled_recalls_measure_recall_at_k(tmp_path: Path) -> None:
    engine = settings.EngineSettings(chunk_rows=64, ann_recall_sample=1.0)
    reg = registry.standalone(tmp_path / "data", engine)
    rng = np.random.default_rng(9)
    try:
        space_id = await make(reg)
        async with reg.lease(space_id) as space:
            await fill(space, rng, 300)
            status = space.health().index
            assert status is not None
            assert (status.recall, status.samples) == (None, 0)
            for _ in range(5):
                await space.recall(memories.Query(cue=vec(rng), k=10))
                assert space._sampling is not None
                await space._sampling
            status = space.health().index
            assert status is not None
            assert status.samples == 5
            assert status.recall is not None
            assert 0.9 <= status.recall <= 1.0
            # An exact recall is not sampled: there is nothing to measure.
            await space.recall(memories.Query(cue=vec(rng), k=10, exact=True))
            assert space._sampling is not None
            await space._sampling
            assert space.ann.meter.samples == 5
    finally:
        await reg.close()


async def test_setting_exact_drops_the_graphs(spaces_registry: registry.Registry) -> None:
    rng = np.random.default_rng(10)
    space_id = await make(spaces_registry)
    async with spaces_registry.lease(space_id) as space:
        await fill(space, rng, 200)
        assert space.ann.approximate(space.warm, space.cold)
        space.reconfigure(dataclasses.replace(space.entry, search=index.SearchIndex(type="exact")))
        assert not space.ann.approximate(space.warm, space.cold)
        assert space.ann.graphs == {}
        status = space.health().index
        assert status is not None
        assert (status.type, status.state) == ("exact", "none")
