"""RememberBatch in the storage engine: staged in chunks (in RAM, then on the space's volume),
committed to the WAL as a batch marker and its records, applied whole or not at all. A log cut
anywhere inside a committed batch (what a crash mid-commit leaves) recovers without any of it,
and stays appendable."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from memspace_contract import spaces
from memspace_server import errors
from memspace_server.storage import memories, registry, settings, wal

from .conftest import DIM, draft, make_space, vec

BATCH = 1500
CONTENT = "b" * 4096
"""1,500 memories of about 4 KiB: several chunks, past what a stream keeps in RAM."""


async def _count(root: Path, engine_settings: settings.EngineSettings) -> int:
    reg = registry.standalone(root, engine_settings)
    try:
        async with reg.lease(spaces.SpaceId("alpha")) as space:
            return space.count()
    finally:
        await reg.close()


async def test_a_batch_cut_anywhere_by_a_crash_is_recovered_without_any_of_it(
    tmp_path: Path, engine_settings: settings.EngineSettings
) -> None:
    rng = np.random.default_rng(30)
    root = tmp_path / "data"
    reg = registry.standalone(root, engine_settings)
    space_id = await make_space(reg)
    async with reg.lease(space_id) as space:
        for i in range(3):
            await space.remember(draft(rng, f"before {i}"))
        segment = wal.list_segments(space.directory.wal)[-1][1]
        before = segment.stat().st_size
        stage = space.stage_batch(64 * 1024 * 1024, 10_000)
        try:
            for i in range(BATCH):
                await stage.add(draft(rng, f"{i}:{CONTENT}"), 1.0)
            assert stage._file is not None, "the batch should have spilled to its staging file"
            count, last_lsn, ids = await space.commit_batch(stage)
        finally:
            stage.close()
        assert (count, last_lsn, len(ids)) == (BATCH, 3 + BATCH, BATCH)
        assert space.count() == 3 + BATCH
        # The whole batch lies in the one segment, although it is far over the segment size.
        assert wal.list_segments(space.directory.wal)[-1][1] == segment
        after = segment.stat().st_size
        await space.close(consolidate=False)
    await reg.close()
    assert after - before > BATCH * 4096
    volume_segment = segment.relative_to(root)

    cuts = [before + (after - before) * k // 10 for k in range(10)] + [after - 1, after]
    for cut in cuts:
        copy = tmp_path / f"cut-{cut}"
        shutil.copytree(root, copy)
        with (copy / volume_segment).open("r+b") as out:
            out.truncate(cut)
        expected = 3 + BATCH if cut == after else 3
        assert await _count(copy, engine_settings) == expected, f"cut at {cut}"
        # The cut log takes writes again, and they survive the next start.
        again = registry.standalone(copy, engine_settings)
        async with again.lease(space_id) as space:
            await space.remember(draft(rng, "after"))
            await space.close(consolidate=False)
        await again.close()
        assert await _count(copy, engine_settings) == expected + 1, f"cut at {cut}"


async def test_a_stage_refuses_memories_past_its_byte_budget_and_count(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(31)
    space_id = await make_space(spaces_registry)
    async with spaces_registry.lease(space_id) as space:
        stage = space.stage_batch(10_000, 100)
        try:
            await stage.add(draft(rng, "x" * 4000), 1.0)
            await stage.add(draft(rng, "x" * 4000), 1.0)
            with pytest.raises(errors.LimitReachedError, match="at most 10000 bytes"):
                await stage.add(draft(rng, "x" * 4000), 1.0)
        finally:
            stage.close()
        stage = space.stage_batch(1_000_000, 2)
        try:
            for _ in range(2):
                await stage.add(draft(rng), 1.0)
            with pytest.raises(errors.LimitReachedError, match="at most 2 memories"):
                await stage.add(draft(rng), 1.0)
        finally:
            stage.close()
        assert space.count() == 0


async def test_a_bad_memory_in_a_batch_stores_nothing(spaces_registry: registry.Registry) -> None:
    rng = np.random.default_rng(32)
    space_id = await make_space(spaces_registry)
    async with spaces_registry.lease(space_id) as space:
        stage = space.stage_batch(64 * 1024 * 1024, 10_000)
        try:
            for i in range(300):
                await stage.add(draft(rng, f"{i}:{CONTENT}"), 1.0)
            with pytest.raises(errors.InvalidMemoryError):
                await stage.add(
                    memories.Draft(content="bad", embedding=np.zeros(DIM, np.float32)), 1.0
                )
        finally:
            stage.close()
        assert space.count() == 0
        await space.remember(memories.Draft(content="fine", embedding=vec(rng)))
        assert space.count() == 1
