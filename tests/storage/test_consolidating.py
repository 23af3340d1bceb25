"""The pieces of consolidation: how much a full tier gives away, what waits, how fast it went."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memspace_contract import wire
from memspace_server.storage import consolidating, tiers, zarr_tiers

DIM = 8


@pytest.mark.parametrize(
    ("size", "capacity", "slack", "moving"),
    [(100, 100, 0.1, 0), (99, 100, 0.1, 0), (101, 100, 0.1, 11), (250, 100, 0.0, 150)],
)
def test_a_tier_over_capacity_gives_away_its_excess_and_the_slack(
    size: int, capacity: int, slack: float, moving: int
) -> None:
    assert consolidating.overflow(size, capacity, slack) == moving


def test_the_backlog_keeps_the_oldest_record_until_cleared() -> None:
    backlog = consolidating.Backlog()
    assert not backlog.due(1.0, now=100.0)
    assert backlog.lag_ms(100.0) == 0.0
    backlog.note(3, now=100.0)
    backlog.note(2, now=150.0)
    assert backlog.records == 5
    assert backlog.lag_ms(100.5) == pytest.approx(500.0)
    assert backlog.due(30.0, now=131.0)
    assert not backlog.due(30.0, now=129.0)
    assert backlog.clear() == 5
    assert (backlog.records, backlog.oldest) == (0, None)


def test_the_rate_is_a_sum_over_the_window() -> None:
    rate = consolidating.Rate()
    assert rate.per_second() == 0.0
    rate.note(120)
    rate.note(60)
    assert rate.per_second() == pytest.approx(180 / consolidating.RATE_WINDOW_S)


@pytest.mark.parametrize(("name", "compression"), [(tiers.WARM, "none"), (tiers.COLD, "zstd")])
def test_a_compacted_tier_keeps_its_live_rows_and_sweeps_its_old_generation(
    tmp_path: Path, name: wire.TierName, compression: str
) -> None:
    rng = np.random.default_rng(5)
    count = 200
    batch = tiers.Columns(
        ids=[f"m{i}" for i in range(count)],
        contents=[f"content {i}" for i in range(count)],
        embeddings=rng.normal(size=(count, DIM)).astype(np.float32),
        confidence=np.ones(count, np.float32),
        tags=[{"n": str(i)} for i in range(count)],
        created_at=np.arange(count, dtype=np.float64),
        last_recalled_at=np.zeros(count),
        recall_count=np.zeros(count, np.uint64),
    )
    old = zarr_tiers.ZarrTier(tmp_path / name, name, DIM, chunk_rows=16, compression=compression)
    old.add(batch)
    for i in range(0, count, 3):
        old.remove(f"m{i}")
    live = {f"m{i}" for i in range(count) if i % 3}
    fresh = old.compacted(compression)
    assert fresh.generation == old.generation + 1
    assert set(fresh.ids()) == live
    assert fresh.tombstones() == 0
    memory = fresh.get("m100")
    assert memory is not None
    assert memory.embedding.tobytes() == batch.embeddings[100].tobytes()
    assert old.path.is_dir(), "the old generation stays until a checkpoint names the new one"
    fresh.sweep_generations()
    assert not old.path.exists()
    assert fresh.path.is_dir()
    fresh.close()
