"""The write ablation (`benchmarks/write_ablation.py`) measures every side, switches off only
what a side names, and leaves the engine as it found it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from benchmarks import write_ablation
from memspace_server.storage import hot, keywords, memories, registry, validating

from .conftest import draft, make_space


async def test_each_side_is_measured_and_the_engine_is_put_back(tmp_path: Path) -> None:
    originals = (hot.HotTier.add, keywords.KeywordIndex.add, validating.validate)
    medians = await write_ablation.ablation(rounds=1, seconds=0.3, root=tmp_path)
    assert (hot.HotTier.add, keywords.KeywordIndex.add, validating.validate) == originals
    assert not os.listdir(tmp_path)  # each side's files removed
    assert list(medians) == list(write_ablation.SIDES)
    for side, figures in medians.items():
        assert figures["memories_per_s"] > 0, side
    assert medians["floor"]["vs_floor"] == 1.0
    assert "rows and ids" in write_ablation.table(medians)


async def test_a_side_switches_off_what_it_names_and_nothing_else(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    reg = registry.standalone(tmp_path / "data")
    try:
        space_id = await make_space(reg)
        async with reg.lease(space_id) as space:
            with write_ablation.switched_off("rows and ids"):
                ids = (await space.remember_many([draft(rng, "kept") for _ in range(3)]))[2]
                # The ids reach the index and the rows, not the other columns.
                assert set(space.hot.present(ids)) == set(ids)
                assert len(space.hot._contents) == 0
                assert validating.validate is not write_ablation._floor_checks
            with write_ablation.switched_off("bare"):
                refused = [memories.Draft(content="x", embedding=np.zeros(16, np.float32))] * 2
                with pytest.raises(ValueError, match="not zero"):
                    await space.remember_many(refused)
    finally:
        await reg.close()
