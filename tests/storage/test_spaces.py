"""Operations on one space: validation, upserts, recall across tiers, quotas, feeds, metrics."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from memspace_contract import index, spaces
from memspace_server import errors
from memspace_server.storage import checkpoints, memories, registry, settings, tiers
from tests.conftest import QuotaClock

from .conftest import DIM, draft, make_space, vec


async def test_a_memory_is_stored_recalled_and_forgotten(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(0)
    space_id = await make_space(spaces_registry)
    async with spaces_registry.lease(space_id) as space:
        embedding = vec(rng)
        memory_id, lsn = await space.remember(
            memories.Draft(content="the sky is blue", embedding=embedding, tags={"k": "v"})
        )
        assert len(memory_id) == 32
        assert lsn == 1
        stored = await space.get(memory_id)
        assert stored.content == "the sky is blue"
        assert stored.embedding.tobytes() == embedding.tobytes()
        hits = await space.recall(memories.Query(cue=embedding, k=1))
        assert [h.memory.id for h in hits] == [memory_id]
        assert hits[0].score == pytest.approx(1.0, abs=1e-6)
        assert hits[0].tier == tiers.HOT
        assert hits[0].memory.recall_count == 1
        assert (await space.get(memory_id)).recall_count == 1
        assert await space.forget(memory_id) == (True, 2)
        assert await space.forget(memory_id) == (False, 0)
        with pytest.raises(errors.MemoryNotFoundError):
            await space.get(memory_id)


async def test_remembering_an_existing_id_replaces_it(spaces_registry: registry.Registry) -> None:
    rng = np.random.default_rng(1)
    space_id = await make_space(spaces_registry, hot=4, warm=4)
    async with spaces_registry.lease(space_id) as space:
        await space.remember(memories.Draft(content="old", embedding=vec(rng), id="fact"))
        for i in range(12):
            await space.remember(draft(rng, f"filler {i}"))
        await space.consolidate()
        assert space._locate("fact") is not space.hot
        await space.remember(memories.Draft(content="new", embedding=vec(rng), id="fact"))
        assert space.count() == 13
        assert (await space.get("fact")).content == "new"


BAD_DRAFTS: dict[str, tuple[dict[str, Any], str]] = {
    "wrong length": ({"embedding": np.ones(DIM + 1, np.float32)}, "exactly 16"),
    "NaN": ({"embedding": np.full(DIM, np.nan, np.float32)}, "NaN"),
    "infinity": ({"embedding": np.full(DIM, np.inf, np.float32)}, "NaN or infinity"),
    "zero vector": ({"embedding": np.zeros(DIM, np.float32)}, "zero vector"),
    "content too big": ({"content": "x" * (64 * 1024 + 1)}, "64 KiB"),
    "too many tags": ({"tags": {f"k{i}": "v" for i in range(33)}}, "at most 32"),
    "long tag key": ({"tags": {"k" * 65: "v"}}, "allowed 1..64"),
    "long tag value": ({"tags": {"k": "v" * 257}}, "at most 256"),
    "confidence above 1": ({"confidence": 1.5}, "allowed 0..1"),
    "confidence NaN": ({"confidence": float("nan")}, "allowed 0..1"),
    "control character id": ({"id": "bad\nid"}, "printable"),
    "long id": ({"id": "i" * 129}, "at most 128"),
}


@pytest.mark.parametrize("case", sorted(BAD_DRAFTS))
async def test_a_bad_memory_is_refused_clearly_and_changes_nothing(
    spaces_registry: registry.Registry, case: str
) -> None:
    rng = np.random.default_rng(2)
    space_id = await make_space(spaces_registry)
    fields, message = BAD_DRAFTS[case]
    async with spaces_registry.lease(space_id) as space:
        await space.remember(draft(rng, "keep me", id="keep"))
        before = space.next_lsn
        good: dict[str, Any] = {"content": "c", "embedding": vec(rng)}
        with pytest.raises(errors.InvalidMemoryError, match=message):
            await space.remember(memories.Draft(**{**good, **fields}))
        bad_batch = [draft(rng, "fine"), memories.Draft(**{**good, **fields})]
        with pytest.raises(errors.InvalidMemoryError):
            await space.remember_many(bad_batch)
        assert space.next_lsn == before
        assert space.count() == 1


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"k": 0}, "allowed 1..1000"),
        ({"k": 1001}, "allowed 1..1000"),
        ({"cue": np.ones(3, np.float32)}, "exactly 16"),
        ({"cue": np.zeros(DIM, np.float32)}, "zero vector"),
        ({"min_score": float("nan")}, "finite"),
    ],
)
async def test_a_bad_recall_is_refused_clearly(
    spaces_registry: registry.Registry, query: dict[str, object], message: str
) -> None:
    space_id = await make_space(spaces_registry)
    async with spaces_registry.lease(space_id) as space:
        with pytest.raises(errors.InvalidMemoryError, match=message):
            await space.recall(
                memories.Query(**{"cue": np.ones(DIM, np.float32), **query})  # type: ignore[arg-type]
            )


async def test_recall_matches_brute_force_over_all_three_tiers(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(3)
    space_id = await make_space(spaces_registry, hot=40, warm=80, compression="zstd")
    model: dict[str, tuple[np.ndarray, dict[str, str]]] = {}
    async with spaces_registry.lease(space_id) as space:
        for i in range(300):
            tags = {"group": str(i % 4)}
            memory_id, _ = await space.remember(draft(rng, f"m{i}", tags=tags))
            model[memory_id] = (space.hot.get(memory_id).embedding, tags)  # type: ignore[union-attr]
        await space.consolidate()
        for memory_id in list(model)[::7]:
            await space.forget(memory_id)
            del model[memory_id]
        for memory_id in list(model)[::11]:
            embedding = vec(rng)
            await space.remember(
                memories.Draft(
                    content="new", embedding=embedding, id=memory_id, tags=model[memory_id][1]
                )
            )
            model[memory_id] = (embedding, model[memory_id][1])
        await space.consolidate()
        placement = space.health().tier_memories
        assert all(placement[name] > 0 for name in tiers.NAMES), placement
        ids = list(model)
        matrix = np.stack([model[i][0] for i in ids]).astype(np.float64)
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        for trial in range(10):
            cue = vec(rng)
            scores = matrix @ (cue / np.linalg.norm(cue))
            tag = {"group": str(trial % 4)} if trial % 2 else {}
            allowed = np.array([not tag or model[i][1] == tag for i in ids])
            order = [j for j in np.argsort(-scores) if allowed[j]]
            hits = await space.recall(memories.Query(cue=cue, k=15, tags=tag))
            assert [h.memory.id for h in hits] == [ids[j] for j in order[:15]]
            assert [h.score for h in hits] == pytest.approx(
                [scores[j] for j in order[:15]], abs=1e-5
            )
            threshold = float(scores[order[5]] + scores[order[6]]) / 2
            above = await space.recall(
                memories.Query(cue=cue, k=100, min_score=threshold, tags=tag)
            )
            assert [h.memory.id for h in above] == [ids[j] for j in order[:6]]
        tiers_seen = {h.tier for h in await space.recall(memories.Query(cue=vec(rng), k=200))}
        assert tiers_seen == set(tiers.NAMES)


async def test_a_tag_with_a_value_per_memory_adds_nothing_the_garbage_collector_visits(
    spaces_registry: registry.Registry,
) -> None:
    """A full collection of the cyclic garbage collector stops the whole server, every tenant
    of it, for as long as it takes to visit every tracked object. A tag whose value differs per
    memory (an ID from elsewhere) must not add an object a memory to that walk in any tier,
    and filters on it still find exactly the memories that carry it, alone and with another."""
    rng = np.random.default_rng(11)
    space_id = await make_space(spaces_registry, hot=200, warm=400)

    def tracked() -> int:
        for _ in range(4):  # a tuple is untracked once what it holds is: a level each pass
            gc.collect()
        return len(gc.get_objects())

    async with spaces_registry.lease(space_id) as space:

        async def write(first: int, count: int) -> list[str]:
            ids = []
            for i in range(first, first + count):
                tags = {"src": f"s{i}", "kind": "even" if i % 2 == 0 else "odd"}
                ids.append((await space.remember(draft(rng, tags=tags)))[0])
                if i % 250 == 249:
                    await space.consolidate()
            await space.forget(ids[0])
            await space.recall(memories.Query(cue=vec(rng), k=3, tags={"src": f"s{first + 1}"}))
            return ids

        # The first thousand load and cache whatever a tier's first use does (libraries, a
        # tier's mapped chunk files); the second must not add an object a memory.
        ids = await write(0, 1000)
        before = tracked()
        ids += await write(1000, 1000)
        grown = tracked() - before
        placement = space.health().tier_memories
        assert all(placement[name] > 0 for name in tiers.NAMES), placement
        assert grown < 100, f"{grown} more tracked objects after 1,000 memories tagged apart"
        gone = {0, 1000}
        for i in (0, 1, 2, 499, 1000, 1001, 1998, 1999):
            hits = await space.recall(memories.Query(cue=vec(rng), k=5, tags={"src": f"s{i}"}))
            assert [h.memory.id for h in hits] == ([] if i in gone else [ids[i]])
            both = {"src": f"s{i}", "kind": "odd"}
            hits = await space.recall(memories.Query(cue=vec(rng), k=5, tags=both))
            assert [h.memory.id for h in hits] == ([ids[i]] if i not in gone and i % 2 else [])
        evens = await space.recall(memories.Query(cue=vec(rng), k=1000, tags={"kind": "even"}))
        assert {h.memory.id for h in evens} == set(ids[2::2]) - {ids[1000]}


async def test_include_embeddings_returns_exact_vectors_from_every_tier(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(4)
    space_id = await make_space(spaces_registry, hot=10, warm=10)
    stored: dict[str, bytes] = {}
    async with spaces_registry.lease(space_id) as space:
        for i in range(60):
            d = draft(rng, f"m{i}")
            memory_id, _ = await space.remember(d)
            stored[memory_id] = np.asarray(d.embedding, np.float32).tobytes()
        await space.consolidate()
        hits = await space.recall(memories.Query(cue=vec(rng), k=60, include_embeddings=True))
        assert {h.tier for h in hits} == set(tiers.NAMES)
        for hit in hits:
            assert hit.memory.embedding.tobytes() == stored[hit.memory.id]
        bare = await space.recall(memories.Query(cue=vec(rng), k=5))
        assert all(h.memory.embedding.size == 0 for h in bare)


async def test_max_memories_is_enforced_but_upserts_still_work(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(5)
    space_id = await make_space(spaces_registry, quota=index.Quota(max_memories=3))
    async with spaces_registry.lease(space_id) as space:
        for i in range(3):
            await space.remember(draft(rng, id=f"m{i}"))
        with pytest.raises(errors.QuotaExceededError, match="maxMemories is 3"):
            await space.remember(draft(rng, id="m3"))
        with pytest.raises(errors.QuotaExceededError):
            await space.remember_many([draft(rng, id="m0"), draft(rng, id="m4")])
        await space.remember(draft(rng, "replaced", id="m1"))
        await space.forget("m0")
        await space.remember(draft(rng, id="m3"))
        assert space.count() == 3


async def test_max_writes_per_second_is_a_token_bucket(
    spaces_registry: registry.Registry, quota_clock: QuotaClock
) -> None:
    rng = np.random.default_rng(6)
    space_id = await make_space(spaces_registry, quota=index.Quota(max_writes_per_second=5))
    async with spaces_registry.lease(space_id) as space:
        for _ in range(5):
            await space.remember(draft(rng))
        with pytest.raises(errors.RateLimitedError, match="5 writes per second"):
            await space.remember(draft(rng))
        quota_clock.advance(0.5)
        await space.remember(draft(rng))
        assert space.count() == 6


async def _collect(stream: object, count: int) -> list[object]:
    found = []
    async for event in stream:  # type: ignore[attr-defined]
        found.append(event)
        if len(found) == count:
            break
    return found


async def test_the_change_feed_is_in_lsn_order_and_resumable(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(7)
    space_id = await make_space(spaces_registry)
    async with spaces_registry.lease(space_id) as space:
        live = await space.subscribe(0)
        reader = asyncio.ensure_future(_collect(live, 20))
        await asyncio.sleep(0)
        ids = [(await space.remember(draft(rng)))[0] for _ in range(15)]
        await asyncio.gather(*(space.forget(i) for i in ids[:5]))
        events = await asyncio.wait_for(reader, 30)
        assert [e.lsn for e in events] == list(range(1, 21))  # type: ignore[attr-defined]
        assert [e.type.name for e in events[:15]] == ["REMEMBERED"] * 15  # type: ignore[attr-defined]
        assert {e.id for e in events[15:]} == set(ids[:5])  # type: ignore[attr-defined]
        replay = await space.subscribe(12)
        resumed = await asyncio.wait_for(_collect(replay, 9), 30)
        assert [e.lsn for e in resumed] == list(range(12, 21))  # type: ignore[attr-defined]
        await space.consolidate()
        with pytest.raises(errors.LsnNotRetainedError, match="resubscribe"):
            await space.subscribe(3)


async def test_a_slow_subscriber_is_cut_off_with_the_lsn_to_resume_from(
    tmp_path: Path,
) -> None:
    reg = registry.standalone(tmp_path, settings.EngineSettings(subscriber_buffer=4))
    rng = np.random.default_rng(8)
    try:
        space_id = await make_space(reg)
        async with reg.lease(space_id) as space:
            stream = await space.subscribe(0)
            first = asyncio.ensure_future(_collect(stream, 1))
            await asyncio.sleep(0)
            for _ in range(10):
                await space.remember(draft(rng))
            assert len(await first) == 1
            seen: list[int] = []

            async def drain() -> None:
                async for event in stream:
                    seen.append(event.lsn)

            with pytest.raises(errors.SubscriberTooSlowError) as raised:
                await drain()
            # Event 1 was read; 2..6 waited (the buffer of 4, plus the commit that passed it);
            # 7 found the subscriber more than a buffer behind, and it was cut off there.
            assert seen == [2, 3, 4, 5, 6]
            assert raised.value.resume_lsn == 7
            assert "since_lsn=7" in str(raised.value)
            assert len(space.feed) == 0
            resumed = await space.subscribe(raised.value.resume_lsn)
            assert [e.lsn for e in await _collect(resumed, 4)] == [7, 8, 9, 10]  # type: ignore[attr-defined]
    finally:
        await reg.close()


async def test_a_batch_larger_than_the_buffer_does_not_cut_off_a_reader_keeping_up(
    tmp_path: Path,
) -> None:
    reg = registry.standalone(tmp_path, settings.EngineSettings(subscriber_buffer=10))
    rng = np.random.default_rng(12)
    try:
        space_id = await make_space(reg)
        async with reg.lease(space_id) as space:
            stream = await space.subscribe(0)
            reader = asyncio.ensure_future(_collect(stream, 100))
            await asyncio.sleep(0)
            await space.remember_many([draft(rng) for _ in range(50)])
            await asyncio.sleep(0.05)
            await space.remember_many([draft(rng) for _ in range(50)])
            events = await asyncio.wait_for(reader, 30)
            assert [e.lsn for e in events] == list(range(1, 101))  # type: ignore[attr-defined]
    finally:
        await reg.close()


async def test_health_reports_real_figures(spaces_registry: registry.Registry) -> None:
    rng = np.random.default_rng(9)
    space_id = await make_space(spaces_registry, hot=20, warm=1000)
    async with spaces_registry.lease(space_id) as space:
        for _ in range(10):
            await space.remember(draft(rng))
        await asyncio.sleep(0.05)
        health = space.health()
        assert health.memories == 10
        assert health.pressure == pytest.approx(0.5)
        assert health.wal_lag_ms >= 50
        assert health.consolidation_rate == 0
        assert health.disk_bytes > 0
        assert await space.consolidate() == 10
        after = space.health()
        assert after.wal_lag_ms == 0
        assert after.consolidation_rate == pytest.approx(10 / 60)


async def test_a_volume_holding_another_space_is_refused(
    spaces_registry: registry.Registry,
) -> None:
    alpha = await make_space(spaces_registry, "alpha")
    beta = await make_space(spaces_registry, "beta")
    async with spaces_registry.lease(alpha) as space:
        await space.remember(draft(np.random.default_rng(10)))
    await spaces_registry.unload(alpha)
    identity = spaces_registry.volume(alpha) / "space.json"
    identity.write_text((spaces_registry.volume(beta) / "space.json").read_text())
    with pytest.raises(errors.IdentityMismatchError, match="belongs to space 'beta'"):
        await spaces_registry.load(alpha)
    identity.unlink()
    await asyncio.sleep(0)
    spaces_registry._refused.clear()
    with pytest.raises(errors.IdentityMismatchError, match=r"no space\.json"):
        await spaces_registry.load(alpha)


async def test_a_space_with_a_damaged_log_is_refused_not_emptied(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(11)
    space_id = await make_space(spaces_registry)
    async with spaces_registry.lease(space_id) as space:
        for _ in range(20):
            await space.remember(draft(rng))
    loaded = spaces_registry.loaded()[space_id]
    await loaded.close(consolidate=False)
    segment = sorted((spaces_registry.volume(space_id) / "wal").glob("*.wal"))[0]
    data = bytearray(segment.read_bytes())
    data[40] ^= 0x55
    segment.write_bytes(bytes(data))
    with pytest.raises(errors.CorruptWalError, match="refusing to serve"):
        await spaces_registry.load(space_id)
    health = await spaces_registry.health(space_id)
    assert health[0].state == "Failed"


async def test_index_entries_round_trip_and_reject_bad_fields(tmp_path: Path) -> None:
    entry = index.IndexEntry(
        space_id=spaces.parse_space_id("team-a"),
        embedding_dim=384,
        token_sha256=index.token_sha256("secret"),
        quota=index.Quota(max_memories=10),
    )
    assert index.loads(entry.dumps()) == entry
    for bad, message in [
        ({"spaceId": "A"}, "spaceId"),
        ({"spaceId": "ok-id", "embeddingDim": 0}, "allowed: 1..4096"),
        ({"spaceId": "ok-id", "state": "Paused"}, "allowed: Active, Inactive"),
        ({"spaceId": "ok-id", "tiers": {"coldCompression": "gzip"}}, "zstd, lz4, none"),
        ({"spaceId": "ok-id", "tokenSha256": "xyz"}, "hex"),
    ]:
        with pytest.raises(index.InvalidIndexEntryError, match=message):
            index.loads(json.dumps(bad))
    index.write_entry(tmp_path, entry)
    (tmp_path / "other.json").write_text(entry.dumps())
    entries, problems = index.read_directory(tmp_path)
    assert list(entries) == ["team-a"]
    assert "other.json" in problems


async def test_a_recall_counts_each_hit_once_in_every_tier(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(41)
    space_id = await make_space(spaces_registry, hot=4, warm=4)
    async with spaces_registry.lease(space_id) as space:
        written = [draft(rng, f"m{i}") for i in range(30)]
        _count, _lsn, ids = await space.remember_many(written)
        await space.consolidate()
        by_tier: set[str] = set()
        for memory_id, item in zip(ids, written, strict=True):
            for expected in (1, 2):
                before = time.time()
                (hit,) = await space.recall(memories.Query(cue=item.embedding, k=1))
                assert hit.memory.id == memory_id
                assert hit.memory.recall_count == expected
                assert hit.memory.last_recalled_at >= before
                stored = await space.get(memory_id)
                assert stored.recall_count == expected
                assert stored.last_recalled_at == hit.memory.last_recalled_at
            by_tier.add(hit.tier)
        assert by_tier == set(tiers.NAMES)


async def test_a_checkpoint_keeps_each_hot_memory_with_its_own_recall_counts(
    spaces_registry: registry.Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint saves the hot tier's recall statistics in the order of its rows, which
    forgets reorder (the last row fills the hole), and writes its runs a chunk of rows at a
    time (7 here); after a reload from the checkpoint alone (the WAL it covers dropped) each
    memory still has its own embedding, text and counts."""
    monkeypatch.setattr(checkpoints, "RUN_CHUNK_ROWS", 7)
    rng = np.random.default_rng(12)
    space_id = await make_space(spaces_registry)
    async with spaces_registry.lease(space_id) as space:
        _count, _lsn, ids = await space.remember_many([draft(rng, f"m{i}") for i in range(40)])
        for times, memory_id in enumerate(ids[:10], start=1):
            for _ in range(times):
                await space.recall(memories.Query(cue=(await space.get(memory_id)).embedding, k=1))
        for memory_id in (ids[0], ids[5], ids[20]):
            assert (await space.forget(memory_id))[0]
        await space.consolidate()
        _count, _lsn, more = await space.remember_many([draft(rng, f"n{i}") for i in range(5)])
        await space.recall(memories.Query(cue=(await space.get(more[2])).embedding, k=1))
        await space.forget(ids[1])
        await space.consolidate()
        before = {i: await space.get(i) for i in [*ids, *more] if space._locate(i) is not None}
        assert space._wal.first_retained_lsn() > space.durable_lsn  # the WAL holds nothing
    await spaces_registry.unload(space_id)
    async with spaces_registry.lease(space_id) as space:
        assert space.count() == len(before) == 41
        for memory_id, memory in before.items():
            again = await space.get(memory_id)
            assert again.content == memory.content
            assert again.recall_count == memory.recall_count, memory.content
            assert again.last_recalled_at == memory.last_recalled_at
            assert again.embedding.tobytes() == memory.embedding.tobytes()
        recalled = {m.content: m.recall_count for m in before.values() if m.recall_count}
        assert recalled == {**{f"m{i}": i + 1 for i in (2, 3, 4, 6, 7, 8, 9)}, "n2": 1}


async def test_a_consolidation_writes_the_new_memories_run_while_the_space_serves(
    spaces_registry: registry.Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run of the hot tier's new memories is written before the checkpoint takes the
    space's write lock: writes of new memories and recalls go on meanwhile; a forget, and a
    write replacing a memory, wait until the run is written (they move rows it reads); the
    checkpoint leaves those two out of the run. A reload from it has every memory as last
    written."""
    monkeypatch.setattr(checkpoints, "AHEAD_MIN_ROWS", 8)
    entered, gate = threading.Event(), threading.Event()
    write_run_ahead = checkpoints.Checkpointer.write_run_ahead

    def held(self: checkpoints.Checkpointer, *args: Any) -> checkpoints.Ahead:
        entered.set()
        assert gate.wait(10)
        return write_run_ahead(self, *args)

    monkeypatch.setattr(checkpoints.Checkpointer, "write_run_ahead", held)
    rng = np.random.default_rng(13)
    space_id = await make_space(spaces_registry)
    async with spaces_registry.lease(space_id) as space:
        given = [draft(rng, f"given {i}", id=f"given-{i}") for i in range(20)]
        await space.remember_many(given)
        consolidating = asyncio.create_task(space.consolidate())
        assert await asyncio.to_thread(entered.wait, 10)
        _count, _lsn, meanwhile = await space.remember_many(
            [draft(rng, f"new {i}") for i in range(3)]
        )
        hits = await space.recall(memories.Query(cue=given[19].embedding, k=1))
        assert [h.memory.id for h in hits] == ["given-19"]
        forgetting = asyncio.create_task(space.forget("given-0"))
        replacing = asyncio.create_task(
            space.remember(
                memories.Draft(content="given 5, again", embedding=vec(rng), id="given-5")
            )
        )
        await asyncio.sleep(0.1)
        assert not forgetting.done()
        assert not replacing.done()
        assert not consolidating.done()
        gate.set()
        assert await forgetting == (True, 22 + 2)
        await replacing
        await consolidating
        run = space._checkpointer.manifest.runs
        assert any(name.endswith("-ahead.npz") for name in run)
        expected = {i: await space.get(i) for i in [f"given-{n}" for n in range(1, 20)] + meanwhile}
    await spaces_registry.unload(space_id)
    async with spaces_registry.lease(space_id) as space:
        assert space.count() == 22
        with pytest.raises(errors.MemoryNotFoundError):
            await space.get("given-0")
        for memory_id, memory in expected.items():
            again = await space.get(memory_id)
            assert again.content == memory.content
            assert again.embedding.tobytes() == memory.embedding.tobytes(), memory.content
        assert (await space.get("given-5")).content == "given 5, again"
