"""Health figures that tell the truth: consolidation_rate counts WAL records consolidated (not
demotions between tiers); an unloaded space reports real figures or marks them unknown (after a
crash its WAL holds writes its checkpoint does not count: never 0 memories); a volume refused
as another space's reports nothing of that volume."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from memspace_server import errors
from memspace_server.storage import registry, settings

from .conftest import draft, make_space

COUNTS = {"memories", "tier_memories", "pressure", "wal_lag_ms"}


async def test_consolidation_rate_counts_records_not_demotions(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(1)
    space_id = await make_space(spaces_registry, hot=2, warm=1000)
    async with spaces_registry.lease(space_id) as space:
        for _ in range(10):
            await space.remember(draft(rng))
        await space.consolidate()  # (a hot tier this small consolidates on its own too)
        health = space.health()
    assert health.tier_memories["warm"] >= 8  # demotions happened
    assert health.wal_lag_ms == 0  # every record consolidated
    assert health.consolidation_rate == pytest.approx(10 / 60)


async def test_an_unloaded_space_after_a_crash_marks_its_counts_unknown(
    tmp_path: Path, engine_settings: settings.EngineSettings
) -> None:
    rng = np.random.default_rng(2)
    first = registry.standalone(tmp_path / "data", engine_settings)
    space_id = await make_space(first)
    async with first.lease(space_id) as space:
        for _ in range(5):
            await space.remember(draft(rng))
        await space.close(consolidate=False)  # a crash: the WAL holds the five writes
    first.pools.shutdown()
    first.executor.shutdown(wait=True)

    restarted = registry.standalone(tmp_path / "data", engine_settings)
    try:
        (health,) = await restarted.health(space_id)
        assert set(health.unknown) >= COUNTS, health
        assert "consolidation_rate" in health.unknown  # this server has not watched a minute
        async with restarted.lease(space_id) as space:
            assert space.health().memories == 5  # what loading it shows: the WAL's writes
    finally:
        await restarted.close()


async def test_a_cleanly_unloaded_space_reports_known_figures(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(3)
    space_id = await make_space(spaces_registry)
    async with spaces_registry.lease(space_id) as space:
        for _ in range(6):
            await space.remember(draft(rng))
    assert await spaces_registry.unload(space_id)
    (health,) = await spaces_registry.health(space_id)
    assert health.unknown == ()
    assert health.memories == 6
    assert health.wal_lag_ms == 0
    # The unload consolidated the six records: the minute's rate stays known after it.
    assert health.consolidation_rate == pytest.approx(6 / 60)


async def test_a_refused_volume_reports_none_of_its_counts(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(4)
    alpha = await make_space(spaces_registry, "alpha")
    beta = await make_space(spaces_registry, "beta")
    async with spaces_registry.lease(beta) as space:
        for _ in range(7):
            await space.remember(draft(rng))
    await spaces_registry.unload(beta)
    await spaces_registry.unload(alpha)
    # alpha's volume now holds beta's data (a claim bound to the wrong volume, say).
    alpha_root, beta_root = spaces_registry.volume(alpha), spaces_registry.volume(beta)
    os.rename(alpha_root, alpha_root.with_name("alpha-own"))
    alpha_root.symlink_to(beta_root)
    with pytest.raises(errors.IdentityMismatchError):
        await spaces_registry.load(alpha)
    (health,) = await spaces_registry.health(alpha)
    assert health.state == "Failed"
    assert health.memories == 0
    assert set(health.unknown) >= COUNTS
    (own,) = await spaces_registry.health(beta)
    assert own.memories == 7
