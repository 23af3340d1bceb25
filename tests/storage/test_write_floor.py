"""The write floor of the storage benchmark (`benchmarks/write_floor.py`) stores what it is
given and logs it durably: a figure measured against it means something only if it does the
work it stands for."""

from __future__ import annotations

from pathlib import Path

import crc32c
import numpy as np
import pytest

from benchmarks import write_floor
from memspace_server.storage import memories

DIM = 16


async def test_the_floor_stores_each_batch_and_logs_it_with_a_valid_crc(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    floor = write_floor.WriteFloor(tmp_path / "floor.bin", DIM)
    matrix = rng.normal(size=(30, DIM)).astype(np.float32)
    try:
        ids = []
        for start in (0, 10, 20):
            drafts = [
                memories.Draft(content=f"note {i}", embedding=matrix[i])
                for i in range(start, start + 10)
            ]
            ids += await floor.remember_many(drafts)
        with pytest.raises(ValueError, match="finite"):
            await floor.remember_many(
                [memories.Draft(content="bad", embedding=np.full(DIM, np.nan, np.float32))]
            )
    finally:
        floor.close()
    assert len(set(ids)) == 30
    assert floor.count == 30
    for row, memory_id in enumerate(ids):
        assert floor.rows[memory_id] == row
        assert np.array_equal(floor.blocks.row(row), matrix[row])
    data = (tmp_path / "floor.bin").read_bytes()
    offset, frames = 0, 0
    while offset < len(data):
        crc, length, _at, count = write_floor.HEAD.unpack_from(data, offset)
        body = data[offset + write_floor.HEAD.size : offset + write_floor.HEAD.size + length]
        assert len(body) == length
        assert crc32c.crc32c(body) == crc
        assert body[: 32 * count].decode() == "".join(ids[10 * frames : 10 * frames + count])
        assert body.endswith(matrix[10 * frames : 10 * frames + count].tobytes())
        offset += write_floor.HEAD.size + length
        frames += 1
    assert frames == 3
