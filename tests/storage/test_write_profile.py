"""The write profile (`benchmarks/write_profile.py`) times what it says it times, on the engine
and the floor alike, and leaves the engine as it found it."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks import write_profile
from memspace_server.storage import hot, validating, wal


async def test_the_profile_accounts_each_side_by_thread_and_step(tmp_path: Path) -> None:
    originals = [getattr(owner, name) for owner, name, _label in write_profile.STEPS]
    medians = await write_profile.profile(rounds=1, seconds=0.3, root=tmp_path)
    assert [getattr(owner, name) for owner, name, _label in write_profile.STEPS] == originals
    assert validating.validate is originals[0]
    assert hot.HotTier.add is originals[2]
    assert wal.Wal._frames is originals[4]
    assert os.writev is originals[5]
    assert not os.listdir(tmp_path)  # each side's files removed
    engine, floor = medians["engine"], medians["floor"]
    for side in (engine, floor):
        for key in ("memories_per_s", "thread loop", "thread writer"):
            assert side[key] > 0, key
        for key in ("writer: fdatasync (wall)", "writer: writev (wall)"):
            assert side[key] > 0, key
        assert side["records_per_fsync"] >= 1
    loop_steps = [
        engine[f"{label} (cpu)"]
        for _o, _n, label in write_profile.STEPS
        if label.startswith("loop")
    ]
    assert all(step > 0 for step in loop_steps)
    # The steps run on the loop thread: together no more than its CPU time (rounding aside).
    assert sum(loop_steps) <= engine["thread loop"] * 1.05 + 1
    assert engine["writer: the frame, encoded and CRC'd (cpu)"] > 0
    assert "loop: validation into columns (cpu)" not in floor  # the floor has no such step
    table = write_profile.table(medians)
    assert "thread loop" in table
    assert "memories_per_s" in table
