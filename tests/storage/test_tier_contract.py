"""The contract every tier backend keeps: hot (RAM), warm (mapped Zarr) and cold (compressed
Zarr, each codec) answer the same operations with the same results."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from memspace_contract import wire
from memspace_server.storage import hot, memories, tiers, zarr_tiers

from .conftest import DIM

Factory = Callable[[], tiers.TierStore]


def _zarr(path: Path, name: wire.TierName, compression: str) -> Factory:
    return lambda: zarr_tiers.ZarrTier(
        path / name, name, DIM, chunk_rows=16, compression=compression
    )


@pytest.fixture(params=["hot", "warm", "cold-zstd", "cold-lz4", "cold-none"])
def make_tier(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    kind: str = request.param
    if kind == "hot":
        return lambda: hot.HotTier(DIM)
    if kind == "warm":
        return _zarr(tmp_path, tiers.WARM, "none")
    return _zarr(tmp_path, tiers.COLD, kind.removeprefix("cold-"))


def _batch(rng: np.random.Generator, count: int, start: int = 0) -> tiers.Columns:
    return tiers.Columns(
        ids=[f"m{start + i}" for i in range(count)],
        contents=[f"content {start + i} ✓" for i in range(count)],
        embeddings=rng.normal(size=(count, DIM)).astype(np.float32),
        confidence=rng.uniform(0, 1, count).astype(np.float32),
        tags=[{"parity": str((start + i) % 2), "n": str(start + i)} for i in range(count)],
        created_at=np.arange(start, start + count, dtype=np.float64) + 1000.0,
        last_recalled_at=np.zeros(count),
        recall_count=np.zeros(count, np.uint64),
    )


def _brute(batch: tiers.Columns, live: set[str], cue: np.ndarray, k: int) -> list[str]:
    emb = batch.embeddings.astype(np.float64)
    scores = emb @ cue / (np.linalg.norm(emb, axis=1) * np.linalg.norm(cue))
    order = [i for i in np.argsort(-scores) if batch.ids[i] in live]
    return [batch.ids[i] for i in order[:k]]


def test_a_memory_comes_back_exactly_as_stored(make_tier: Factory) -> None:
    tier = make_tier()
    batch = _batch(np.random.default_rng(1), 40)
    tier.add(batch)
    assert len(tier) == 40
    assert "m7" in tier
    assert "m99" not in tier
    assert set(tier.ids()) == set(batch.ids)
    for i in (0, 17, 39):
        memory = tier.get(f"m{i}")
        assert memory is not None
        assert memory.embedding.tobytes() == batch.embeddings[i].tobytes()
        assert memory.content == batch.contents[i]
        assert dict(memory.tags) == batch.tags[i]
        assert memory.confidence == pytest.approx(float(batch.confidence[i]))
        assert memory.created_at == batch.created_at[i]
    assert tier.get("missing") is None


def test_top_k_is_the_exact_cosine_ranking(make_tier: Factory) -> None:
    rng = np.random.default_rng(2)
    tier = make_tier()
    batch = _batch(rng, 70)
    tier.add(batch)
    for _ in range(5):
        cue = rng.normal(size=DIM).astype(np.float32)
        found = tier.top_k(tiers.unit(cue), 10, -1.0, {})
        assert [i for _, i in found] == _brute(batch, set(batch.ids), cue, 10)
        scores = [s for s, _ in found]
        assert scores == sorted(scores, reverse=True)


def test_removed_memories_are_gone_from_every_answer(make_tier: Factory) -> None:
    rng = np.random.default_rng(3)
    tier = make_tier()
    batch = _batch(rng, 50)
    tier.add(batch)
    removed = {f"m{i}" for i in range(0, 50, 3)}
    for memory_id in removed:
        assert tier.remove(memory_id)
    assert not tier.remove("m0")
    live = set(batch.ids) - removed
    assert len(tier) == len(live)
    assert set(tier.ids()) == live
    cue = rng.normal(size=DIM).astype(np.float32)
    found = tier.top_k(tiers.unit(cue), 50, -1.0, {})
    assert [i for _, i in found] == _brute(batch, live, cue, 50)
    assert all(tier.get(i) is None for i in removed)


def test_tag_filters_and_min_score_restrict_the_ranking(make_tier: Factory) -> None:
    rng = np.random.default_rng(4)
    tier = make_tier()
    batch = _batch(rng, 60)
    tier.add(batch)
    tier.remove("m2")
    cue = rng.normal(size=DIM).astype(np.float32)
    even = {i for i, t in zip(batch.ids, batch.tags, strict=True) if t["parity"] == "0"} - {"m2"}
    found = tier.top_k(tiers.unit(cue), 5, -1.0, {"parity": "0"})
    assert [i for _, i in found] == _brute(batch, even, cue, 5)
    assert tier.top_k(tiers.unit(cue), 5, -1.0, {"parity": "0", "n": "3"}) == []
    assert [i for _, i in tier.top_k(tiers.unit(cue), 5, -1.0, {"n": "4"})] == ["m4"]
    above = tier.top_k(tiers.unit(cue), 60, 0.3, {})
    assert above
    assert all(score >= 0.3 for score, _ in above)
    everything = tier.top_k(tiers.unit(cue), 60, -1.0, {})
    assert len(above) == sum(1 for s, _ in everything if s >= 0.3)


def test_touch_counts_recalls_and_least_recent_leave_first(make_tier: Factory) -> None:
    tier = make_tier()
    batch = _batch(np.random.default_rng(5), 30)
    tier.add(batch)
    for i in range(10):
        tier.touch(f"m{i}", 5000.0 + i)
    tier.touch("m0", 6000.0)
    memory = tier.get("m0")
    assert memory is not None
    assert memory.recall_count == 2
    assert memory.last_recalled_at == 6000.0
    taken = tier.take_least_recent(12)
    # m10..m29 were created at 1010..1029 and never recalled: the oldest twelve leave.
    assert sorted(taken.ids) == sorted(f"m{i}" for i in range(10, 22))
    assert len(tier) == 18
    assert all(i not in tier for i in taken.ids)
    assert taken.embeddings.shape == (12, DIM)
    kept = {i: batch.embeddings[int(i[1:])] for i in taken.ids}
    for row, memory_id in enumerate(taken.ids):
        assert taken.embeddings[row].tobytes() == kept[memory_id].tobytes()


def test_hits_are_read_and_counted_as_single_gets_and_touches_would(make_tier: Factory) -> None:
    tier = make_tier()
    batch = _batch(np.random.default_rng(6), 20)
    tier.add(batch)
    tier.touch("m3", 4000.0)
    wanted = ["m3", "m7", "missing", "m12"]
    for with_embedding in (True, False):
        read = tier.get_many(wanted, with_embedding)
        assert sorted(read) == ["m12", "m3", "m7"]
        for memory_id, memory in read.items():
            single = tier.get(memory_id, with_embedding)
            assert single is not None
            assert memory.content == single.content
            assert dict(memory.tags) == dict(single.tags)
            assert memory.confidence == single.confidence
            assert memory.recall_count == single.recall_count
            assert np.array_equal(memory.embedding, single.embedding)
    # As a recall at 5000 returns them: counted once more, recalled then; stored unchanged
    # until the caller touches them.
    hits = tier.get_many(wanted, False, hit_at=5000.0)
    assert {i: (m.recall_count, m.last_recalled_at) for i, m in hits.items()} == {
        "m3": (2, 5000.0),
        "m7": (1, 5000.0),
        "m12": (1, 5000.0),
    }
    stored = tier.get("m7")
    assert stored is not None
    assert (stored.recall_count, stored.last_recalled_at) == (0, 0.0)
    tier.touch_many(["m3", "m7", "missing", "m12"], 5000.0)
    for memory_id, memory in hits.items():
        now = tier.get(memory_id, False)
        assert now is not None
        assert (now.recall_count, now.last_recalled_at) == (
            memory.recall_count,
            memory.last_recalled_at,
        )
    untouched = tier.get("m4")
    assert untouched is not None
    assert untouched.recall_count == 0


def test_a_memory_cannot_be_added_twice(make_tier: Factory) -> None:
    tier = make_tier()
    batch = _batch(np.random.default_rng(6), 3)
    tier.add(batch)
    with pytest.raises(KeyError):
        tier.add(batch)


@pytest.mark.parametrize("compression", ["none", "zstd", "lz4"])
def test_a_zarr_tier_reopens_with_its_rows_and_state(tmp_path: Path, compression: str) -> None:
    rng = np.random.default_rng(7)
    tier = zarr_tiers.ZarrTier(
        tmp_path / "t", tiers.COLD, DIM, chunk_rows=16, compression=compression
    )
    batch = _batch(rng, 37)
    tier.add(batch)
    tier.add(_batch(rng, 5, start=37))
    tier.remove("m3")
    tier.touch("m4", 7000.0)
    state, rows = tier.state(), tier.rows
    tier.close()
    again = zarr_tiers.ZarrTier(
        tmp_path / "t",
        tiers.COLD,
        DIM,
        chunk_rows=16,
        compression=compression,
        rows=rows,
        state=state,
    )
    assert len(again) == 41
    assert "m3" not in again
    m4 = again.get("m4")
    assert m4 is not None
    assert m4.recall_count == 1
    assert m4.embedding.tobytes() == batch.embeddings[4].tobytes()
    assert isinstance(again.get("m40"), memories.Memory)


def test_a_tier_keeps_its_memories_out_of_the_cyclic_collectors_walk(make_tier: Factory) -> None:
    """A full collection of Python's cyclic collector stops every thread while it walks every
    slot of every list, set and dict it tracks: a cache miss per memory held in one. A tier's
    ids and texts live in numpy columns (`tiers.ObjectColumn`), which it does not walk, so the
    pause does not grow with the memories a server holds."""
    tier = make_tier()
    batch = _batch(np.random.default_rng(4), 300)
    tier.add(batch)
    held = {id(value) for value in (*batch.ids, *batch.contents)}
    del batch
    gc.collect()  # a collection lets go of dicts that hold only plain values
    walked = {id(ref) for tracked in gc.get_objects() for ref in gc.get_referents(tracked)}
    assert not held & walked
    assert len(tier) == 300
