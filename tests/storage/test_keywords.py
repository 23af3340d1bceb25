"""The keyword index of a space: BM25 over content and tags, kept with every write across the
three tiers, persisted with the LSN it reflects and rebuilt only when that is not the space's."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

from memspace_server import errors
from memspace_server.storage import keywords, memories, registry, settings, tiers

from .conftest import draft, make_space, vec
from .test_registry import _open_files_under


def keyword(text: str, k: int = 10, **tags: str) -> memories.Query:
    return memories.Query(
        cue=np.zeros(0, np.float32), k=k, tags=tags, mode=memories.KEYWORD, text=text
    )


async def test_keyword_recall_follows_remember_forget_and_replace_in_every_tier(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(5)
    space_id = await make_space(spaces_registry, hot=40, warm=80)
    model: dict[str, tuple[str, dict[str, str]]] = {}
    async with spaces_registry.lease(space_id) as space:
        for i in range(300):
            content = f"note {i} about {'zebra' if i % 10 == 0 else 'horse'} number{i}"
            tags = {"group": str(i % 3)}
            memory_id, _ = await space.remember(draft(rng, content, tags=tags))
            model[memory_id] = (content, tags)
        # A keyword recall before any consolidation: the index builds from the hot tier.
        zebras = {i for i, (c, _) in model.items() if "zebra" in c}
        found = await space.recall(keyword("ZEBRA!", k=100))
        assert {hit.memory.id for hit in found} == zebras
        await space.consolidate()
        placement = space.health().tier_memories
        assert all(placement[name] > 0 for name in tiers.NAMES), placement
        gone = sorted(zebras)[:5]
        for memory_id in gone:
            assert (await space.forget(memory_id))[0]
        changed = sorted(set(model) - zebras)[0]
        await space.remember(
            memories.Draft(content="now a zebra too", embedding=vec(rng), id=changed)
        )
        found = await space.recall(keyword("zebra", k=100))
        assert {hit.memory.id for hit in found} == (zebras - set(gone)) | {changed}
        assert all(hit.score > 0 for hit in found)
        assert [hit.score for hit in found] == sorted((hit.score for hit in found), reverse=True)
        # Tag filters: all must match; tags are searchable words too.
        tagged = await space.recall(keyword("zebra", k=100, group="1"))
        assert {hit.memory.id for hit in tagged} == {
            i for i in (zebras - set(gone)) if model[i][1]["group"] == "1"
        }
        # The replaced memory has no tags any more.
        assert len(await space.recall(keyword("group", k=1000))) == 300 - len(gone) - 1
        # A rare exact term finds its one memory, whichever tier holds it.
        kept = [i for i in model if i not in gone and i != changed]
        for wanted in (kept[3], kept[150], kept[-1]):
            number = model[wanted][0].rsplit(" ", 1)[1]
            top = await space.recall(keyword(number, k=3))
            assert [hit.memory.id for hit in top] == [wanted]


async def test_a_reload_keeps_the_index_without_rebuilding_it(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(6)
    space_id = await make_space(spaces_registry, hot=20, warm=40)
    async with spaces_registry.lease(space_id) as space:
        ids = [(await space.remember(draft(rng, f"word{i} common")))[0] for i in range(100)]
        assert len(await space.recall(keyword("common", k=200))) == 100
        await space.forget(ids[0])
        await space.remember(draft(rng, "latecomer common"))
    before = keywords.KeywordIndex.rebuilds
    assert await spaces_registry.unload(space_id)
    async with spaces_registry.lease(space_id) as space:
        found = await space.recall(keyword("common", k=200))
        assert len(found) == 100
        assert ids[0] not in {hit.memory.id for hit in found}
        assert len(await space.recall(keyword("latecomer"))) == 1
    assert keywords.KeywordIndex.rebuilds == before


async def test_writes_waiting_for_the_index_are_nothing_the_garbage_collector_visits(
    spaces_registry: registry.Registry,
) -> None:
    """A full collection of the cyclic garbage collector stops the whole server for as long as
    it takes to visit every tracked object. The writes kept for a keyword index nobody opened
    (up to MAX_PENDING of them) must not add to those: single writes with tags and without,
    batches and forgets alike. They still reach the index as written."""
    rng = np.random.default_rng(10)
    space_id = await make_space(spaces_registry)

    def tracked() -> int:
        for _ in range(4):  # a tuple is untracked once what it holds is: a level each pass
            gc.collect()
        return len(gc.get_objects())

    async with spaces_registry.lease(space_id) as space:
        # Whatever the first write, batch and forget load or cache, before counting.
        first, _ = await space.remember(draft(rng, "first", tags={"a": "b"}))
        await space.remember_many([draft(rng, "first batch") for _ in range(3)])
        await space.forget(first)
        before = tracked()
        ids = []
        for i in range(1000):
            tags = {"kind": "note", "from": "test"} if i % 2 else {}
            ids.append((await space.remember(draft(rng, f"pending {i}", tags=tags)))[0])
        await space.remember_many([draft(rng, "batch", tags={"b": "1"}) for _ in range(100)])
        for memory_id in ids[:50]:
            await space.forget(memory_id)
        grown = tracked() - before
        assert not space.keywords.is_open
        assert grown < 100, f"{grown} more tracked objects after 1,150 writes"
        found = await space.recall(keyword("pending", k=1000))
        assert {hit.memory.id for hit in found} == set(ids[50:])
        notes = await space.recall(keyword("pending", k=1000, kind="note"))
        assert {hit.memory.id for hit in notes} == {ids[n] for n in range(51, 1000, 2)}
        assert len(await space.recall(keyword("batch", k=200, b="1"))) == 100


async def test_a_space_closed_after_a_failure_or_too_many_pending_writes_rebuilds_its_index(
    spaces_registry: registry.Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(9)
    space_id = await make_space(spaces_registry)
    async with spaces_registry.lease(space_id) as space:
        for i in range(10):
            await space.remember(draft(rng, f"first{i} alike"))
        assert len(await space.recall(keyword("alike", k=100))) == 10
        # A failed space commits nothing and unstamps what it committed in this load.
        space.keywords.close(commit=False)
    assert await spaces_registry.unload(space_id)
    before = keywords.KeywordIndex.rebuilds
    async with spaces_registry.lease(space_id) as space:
        assert len(await space.recall(keyword("alike", k=100))) == 10
    assert keywords.KeywordIndex.rebuilds == before + 1
    assert await spaces_registry.unload(space_id)
    # More writes than MAX_PENDING before the index is opened: dropped, then rebuilt.
    monkeypatch.setattr(keywords, "MAX_PENDING", 5)
    async with spaces_registry.lease(space_id) as space:
        for i in range(8):
            await space.remember(draft(rng, f"second{i} alike"))
        assert len(await space.recall(keyword("alike", k=100))) == 18
    assert keywords.KeywordIndex.rebuilds == before + 2
    assert await spaces_registry.unload(space_id)
    # Or more characters of content than MAX_PENDING_CHARS (a few long memories).
    monkeypatch.setattr(keywords, "MAX_PENDING_CHARS", 1000)
    async with spaces_registry.lease(space_id) as space:
        for i in range(3):
            await space.remember(draft(rng, f"third{i} alike " + "x" * 600))
        assert len(await space.recall(keyword("alike", k=100))) == 21
    assert keywords.KeywordIndex.rebuilds == before + 3


async def test_an_unloaded_space_keeps_no_file_of_its_keyword_index_open(tmp_path: Path) -> None:
    reg = registry.standalone(tmp_path, settings.EngineSettings(chunk_rows=16), idle_unload_s=0.0)
    rng = np.random.default_rng(8)
    try:
        space_id = await make_space(reg, hot=10)
        async with reg.lease(space_id) as space:
            for i in range(40):
                await space.remember(draft(rng, f"entry{i} shared"))
            assert len(await space.recall(keyword("shared", k=100))) == 40
            assert space.keywords.is_open
            held = _open_files_under(tmp_path / "spaces" / space_id / keywords.FOLDER)
            assert held, "an open keyword index maps its segment files"
        await reg.maintain()
        assert reg.loaded() == {}
        assert _open_files_under(tmp_path) == []
    finally:
        await reg.close()


async def test_hybrid_recall_fuses_the_vector_and_the_keyword_ranks(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(7)
    space_id = await make_space(spaces_registry)
    async with spaces_registry.lease(space_id) as space:
        for i in range(50):
            await space.remember(draft(rng, f"filler {i}"))
        near = vec(rng)
        by_vector, _ = await space.remember(
            memories.Draft(content="close by meaning", embedding=near)
        )
        by_word, _ = await space.remember(draft(rng, "the codeword xylophone"))
        cue = (near + 0.01 * vec(rng)).astype(np.float32)
        hits = await space.recall(
            memories.Query(cue=cue, k=5, mode=memories.HYBRID, text="xylophone")
        )
        ids = [hit.memory.id for hit in hits]
        assert by_vector in ids[:2]
        assert by_word in ids[:2]
        # Each was first in one list, 1 / (60 + 1), plus 1 / (60 + rank) of the other if in it.
        assert all(1 / 61 <= hit.score <= 2 / 61 for hit in hits[:2])
        vector_only = await space.recall(memories.Query(cue=cue, k=5))
        assert by_word not in [hit.memory.id for hit in vector_only]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (keyword(""), "needs a text query"),
        (keyword("x" * (memories.MAX_QUERY_BYTES + 1)), "at most 4096"),
        (
            memories.Query(cue=np.zeros(0, np.float32), mode=memories.HYBRID, text="x"),
            "needs a cue",
        ),
        (memories.Query(cue=np.ones(16, np.float32), mode="fuzzy", text="x"), "mode"),
    ],
)
async def test_bad_keyword_queries_are_refused(
    spaces_registry: registry.Registry, query: memories.Query, message: str
) -> None:
    space_id = await make_space(spaces_registry)
    async with spaces_registry.lease(space_id) as space:
        with pytest.raises(errors.InvalidMemoryError, match=message):
            await space.recall(query)


def test_fusion_sums_reciprocal_ranks() -> None:
    fused = keywords.fuse(
        [[(0.9, "hot", "a"), (0.8, "hot", "b")], [(7.0, "warm", "b"), (3.0, "hot", "c")]], 3
    )
    assert [memory_id for _, _, memory_id in fused] == ["b", "a", "c"]
    assert fused[0][0] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[1][0] == pytest.approx(1 / 61)
