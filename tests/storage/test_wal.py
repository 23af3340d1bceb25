"""The write-ahead log on real files: framing, group commit, torn tails and corruption."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from memspace_server import errors
from memspace_server.storage import memories, records, wal


@pytest.fixture
def executor() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        yield pool


def _memory(i: int) -> memories.Memory:
    return memories.Memory(
        id=memories.MemoryId(f"m{i}"),
        content=f"content {i}",
        embedding=np.full(4, i + 1, np.float32),
        confidence=0.5,
        tags={"i": str(i)},
        created_at=100.0 + i,
    )


def _remember(i: int) -> Callable[[int], tuple[bytes, int]]:
    return lambda lsn: (records.encode_remember(lsn, 1.0, _memory(i)), lsn)


async def _write(
    directory: Path,
    executor: concurrent.futures.Executor,
    count: int,
    start: int = 1,
    group: int = 5,
) -> wal.Wal[int]:
    """Append `count` records, `group` concurrent writers at a time."""
    log: wal.Wal[int] = wal.Wal(directory, start, executor, lambda events: None, 1024)
    for first in range(0, count, group):
        futures = [log.submit(_remember(i))[1] for i in range(first, min(count, first + group))]
        await asyncio.gather(*futures)
    return log


def _replay(directory: Path, floor: int = 0) -> tuple[list[records.Record], wal.Recovered]:
    found: list[records.Record] = []
    recovered = wal.recover(directory, floor, lambda payload: found.append(records.decode(payload)))
    return found, recovered


async def test_records_come_back_in_lsn_order_with_their_contents(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    log = await _write(tmp_path, executor, 50)
    await log.close()
    found, recovered = _replay(tmp_path)
    assert [r.lsn for r in found] == list(range(1, 51))
    assert recovered.next_lsn == 51
    first = found[7]
    assert isinstance(first, records.Remembered)
    assert first.memory.id == "m7"
    assert first.memory.embedding.tolist() == [8.0] * 4
    assert dict(first.memory.tags) == {"i": "7"}
    assert len(wal.list_segments(tmp_path)) > 1, "1 KiB segments must have rolled"


async def test_concurrent_writers_share_fsyncs(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    log = await _write(tmp_path, executor, 200, group=200)
    assert 1 <= log.syncs < 20
    await log.close()


async def test_a_torn_final_record_is_truncated_and_appends_continue(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    log = await _write(tmp_path, executor, 10)
    await log.close()
    last = wal.list_segments(tmp_path)[-1][1]
    intact = last.stat().st_size
    with last.open("ab") as out:
        out.write(wal.frame(records.encode_forget(11, 1.0, "m1"))[:-3])
    found, recovered = _replay(tmp_path)
    assert len(found) == 10
    assert recovered.truncated_bytes > 0
    assert last.stat().st_size == intact
    log = await _write(tmp_path, executor, 3, start=recovered.next_lsn)
    await log.close()
    assert [r.lsn for r in _replay(tmp_path)[0]] == list(range(1, 14))


async def test_zeros_left_at_the_tail_by_a_crash_are_truncated(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    log = await _write(tmp_path, executor, 4)
    await log.close()
    last = wal.list_segments(tmp_path)[-1][1]
    with last.open("ab") as out:
        out.write(bytes(100))
    found, recovered = _replay(tmp_path)
    assert len(found) == 4
    assert recovered.truncated_bytes == 100


async def test_a_damaged_record_before_the_tail_refuses_the_log(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    log = await _write(tmp_path, executor, 40)
    await log.close()
    first = wal.list_segments(tmp_path)[0][1]
    data = bytearray(first.read_bytes())
    data[len(wal.MAGIC) + 20] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(errors.CorruptWalError, match="checksum mismatch"):
        _replay(tmp_path)


async def test_a_missing_segment_in_the_middle_refuses_the_log(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    log = await _write(tmp_path, executor, 60)
    await log.close()
    segments = wal.list_segments(tmp_path)
    assert len(segments) >= 3
    segments[1][1].unlink()
    with pytest.raises(errors.CorruptWalError, match="expected"):
        _replay(tmp_path)


async def test_dropped_segments_leave_only_unconsolidated_records(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    log = await _write(tmp_path, executor, 30)
    await log.roll()
    log.drop_through(30)
    # Only an empty segment naming the next LSN is left.
    assert [first for first, _ in wal.list_segments(tmp_path)] == [31]
    await log.close()
    log = await _write(tmp_path, executor, 5, start=31)
    await log.close()
    found, recovered = _replay(tmp_path, floor=30)
    assert [r.lsn for r in found] == [31, 32, 33, 34, 35]
    assert recovered.next_lsn == 36
    assert [r.lsn for r in wal.read_range(tmp_path, 32, 34)] == [33, 34]
