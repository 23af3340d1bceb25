"""The write-ahead log on real files: framing, group commit, torn tails and corruption."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from memspace_server import errors
from memspace_server.storage import frames, memories, records, tiers, wal


@pytest.fixture
def executor() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        yield pool


def _memory(i: int, dim: int = 4) -> memories.Memory:
    return memories.Memory(
        id=memories.MemoryId(f"m{i}"),
        content=f"content {i}",
        embedding=np.full(dim, i + 1, np.float32),
        confidence=0.5,
        tags={"i": str(i)},
        created_at=100.0 + i,
    )


def _remember(i: int) -> Callable[[int], tuple[list[bytes], list[int]]]:
    return lambda lsn: ([frames.encode(lsn, 1.0, 4, [_memory(i)])], [lsn])


def _remember_batch(
    first: int, count: int, dim: int = 4
) -> Callable[[int], tuple[list[bytes], list[int]]]:
    batch = [_memory(i, dim) for i in range(first, first + count)]
    return lambda lsn: (
        [frames.encode(lsn, 1.0, dim, batch)],
        list(range(lsn, lsn + count)),
    )


async def _write(
    directory: Path,
    executor: concurrent.futures.Executor,
    count: int,
    start: int = 1,
    group: int = 5,
) -> wal.Wal[int]:
    """Append `count` records, `group` concurrent writers at a time, one record a write."""
    log: wal.Wal[int] = wal.Wal(directory, start, executor, lambda events: None, 1024)
    for first in range(0, count, group):
        futures = [log.submit(1, _remember(i))[1] for i in range(first, min(count, first + group))]
        await asyncio.gather(*futures)
    return log


def _decode(payload: memoryview, batch: bool, skip: int) -> list[records.Record]:
    if batch:
        return frames.decode(payload).records()[skip:]
    return [records.decode(payload)]


def _replay(directory: Path, floor: int = 0) -> tuple[list[records.Record], wal.Recovered]:
    found: list[records.Record] = []
    recovered = wal.recover(
        directory, floor, lambda payload, batch, skip: found.extend(_decode(payload, batch, skip))
    )
    return found, recovered


def _write_legacy(directory: Path, first: int, count: int) -> Path:
    """A format-1 segment as an older server wrote it: one record per frame."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / wal.segment_name(first)
    body = b"".join(
        wal.frame(records.encode_remember(lsn, 1.0, _memory(lsn)))
        for lsn in range(first, first + count)
    )
    path.write_bytes(wal.MAGIC_V1 + body)
    return path


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


@pytest.mark.parametrize("iov_max", [1, 1024], ids=["plain-writes", "one-writev"])
async def test_a_group_commit_appends_every_frame_whole_in_order(
    tmp_path: Path,
    executor: concurrent.futures.Executor,
    monkeypatch: pytest.MonkeyPatch,
    iov_max: int,
) -> None:
    # Each frame goes to the system as its head and payload; more parts than one writev takes
    # are joined and written plainly.
    monkeypatch.setattr(wal, "_IOV_MAX", iov_max)
    log = await _write(tmp_path, executor, 30, group=10)
    await log.close()
    found, recovered = _replay(tmp_path)
    assert [r.lsn for r in found] == list(range(1, 31))
    assert recovered.truncated_bytes == 0
    assert [r.memory.content for r in found if isinstance(r, records.Remembered)] == [
        f"content {i}" for i in range(30)
    ]


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
        out.write(wal.frame(frames.encode(11, 1.0, 4, (), ("m1",)))[:-3])
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


async def test_one_write_is_one_frame_and_replays_record_by_record(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    log: wal.Wal[int] = wal.Wal(tmp_path, 1, executor, lambda events: None)
    last, future = log.submit(300, _remember_batch(0, 300, dim=8))
    await future
    assert last == 300
    assert log.syncs == 1
    await log.close()
    (segment,) = wal.list_segments(tmp_path)
    assert segment[1].read_bytes()[: len(wal.MAGIC)] == wal.MAGIC
    found, recovered = _replay(tmp_path)
    assert [r.lsn for r in found] == list(range(1, 301))
    assert recovered.next_lsn == 301
    sample = found[41]
    assert isinstance(sample, records.Remembered)
    assert sample.memory.id == "m41"
    assert sample.memory.content == "content 41"
    assert dict(sample.memory.tags) == {"i": "41"}
    assert sample.memory.created_at == 141.0
    assert sample.memory.embedding.tolist() == [42.0] * 8
    # A floor inside the frame replays only the records after it.
    found, recovered = _replay(tmp_path, floor=250)
    assert [r.lsn for r in found] == list(range(251, 301))
    assert recovered.replayed == 50
    assert [r.lsn for r in wal.read_range(tmp_path, 97, 103)] == [98, 99, 100, 101, 102, 103]


def test_a_frame_mixes_remembers_and_forgets_and_non_ascii_text() -> None:
    memory = dataclasses.replace(_memory(1), id=memories.MemoryId("ключ"), content="žluť 🐍")
    payload = frames.encode(7, 2.5, 4, [memory, _memory(2)], ["gone"])
    frame = frames.decode(payload)
    assert frames.peek(payload) == (7, 3, None)
    assert frame.ids == ["ключ", "m2", "gone"]
    assert [r.lsn for r in frame.records()] == [7, 8, 9]
    first, _, gone = frame.records()
    assert isinstance(first, records.Remembered)
    assert first.memory.content == "žluť 🐍"
    assert isinstance(gone, records.Forgotten)
    assert gone.id == "gone"
    columns = frame.columns(np.array([1], np.int64))
    assert columns.ids == ["m2"]
    assert columns.embeddings.tolist() == [[3.0] * 4]


@pytest.mark.parametrize("content", ["plain", "žluť 🐍"])
def test_a_frames_columns_match_its_records_for_any_rows(content: str) -> None:
    written = [dataclasses.replace(_memory(i), content=f"{content} {i}") for i in range(6)]
    written[2] = dataclasses.replace(written[2], tags={})
    payload = frames.encode(40, 2.0, 4, written, ["gone"])
    frame = frames.decode(payload)
    for rows in ([0, 1, 2, 3, 4, 5], [1, 2, 3], [0, 3, 5], [4]):
        columns = frame.columns(np.array(rows, np.int64))
        assert columns.ids == [f"m{r}" for r in rows]
        assert columns.contents == [f"{content} {r}" for r in rows]
        assert columns.tags == [{} if r == 2 else {"i": str(r)} for r in rows]
        assert columns.embeddings.tolist() == [[r + 1.0] * 4 for r in rows]
        assert columns.created_at.tolist() == [100.0 + r for r in rows]


def test_a_staged_frame_takes_its_lsn_and_time_when_it_commits() -> None:
    payload = bytearray(frames.encode(0, 0.0, 4, [_memory(1), _memory(2)]))
    frames.restamp(payload, 90, 7.5)
    frame = frames.decode(payload)
    assert (frame.first_lsn, frame.at, frame.ids) == (90, 7.5, ["m1", "m2"])
    with pytest.raises(records.RecordFormatError):
        frames.restamp(bytearray(frames.encode_marker(1, 1.0, 2)), 5, 1.0)


def test_a_frame_with_trailing_or_missing_bytes_is_unreadable() -> None:
    payload = frames.encode(1, 1.0, 4, [_memory(1)])
    for damaged in (payload + b"x", payload[:-1], payload[:40]):
        with pytest.raises(records.RecordFormatError):
            frames.decode(damaged)


async def test_a_torn_final_frame_is_truncated(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    log: wal.Wal[int] = wal.Wal(tmp_path, 1, executor, lambda events: None)
    await log.submit(20, _remember_batch(0, 20))[1]
    await log.close()
    (segment,) = wal.list_segments(tmp_path)
    intact = segment[1].stat().st_size
    torn = wal.frame(frames.encode(21, 1.0, 4, [_memory(n) for n in range(30)]))
    for cut in (3, len(torn) // 2, len(torn) - 1):
        with segment[1].open("ab") as out:
            out.write(torn[:cut])
        found, recovered = _replay(tmp_path)
        assert [r.lsn for r in found] == list(range(1, 21))
        assert recovered.truncated_bytes == cut
        assert segment[1].stat().st_size == intact


async def test_a_bit_flip_in_a_frame_refuses_the_log_unless_it_is_the_tail(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    log: wal.Wal[int] = wal.Wal(tmp_path, 1, executor, lambda events: None)
    await log.submit(20, _remember_batch(0, 20))[1]
    await log.submit(20, _remember_batch(20, 20))[1]
    await log.close()
    (segment,) = wal.list_segments(tmp_path)
    clean = segment[1].read_bytes()
    first_frame = wal._FRAME.unpack_from(clean, len(wal.MAGIC))[0] + wal._FRAME.size
    for offset in (len(wal.MAGIC) + 30, len(wal.MAGIC) + first_frame // 2):
        data = bytearray(clean)
        data[offset] ^= 0x10
        segment[1].write_bytes(bytes(data))
        with pytest.raises(errors.CorruptWalError, match="checksum mismatch"):
            _replay(tmp_path)
    # A damaged length field in the first frame, with an intact frame after it: damage too.
    data = bytearray(clean)
    data[len(wal.MAGIC) + 2] ^= 0x40
    segment[1].write_bytes(bytes(data))
    with pytest.raises(errors.CorruptWalError):
        _replay(tmp_path)
    # The same flip in the last frame is a torn final write: it goes, the first frame stays.
    data = bytearray(clean)
    data[-5] ^= 0x10
    segment[1].write_bytes(bytes(data))
    found, recovered = _replay(tmp_path)
    assert [r.lsn for r in found] == list(range(1, 21))
    assert recovered.truncated_bytes == len(clean) - len(wal.MAGIC) - first_frame


async def test_an_old_format_wal_replays_and_appends_continue_in_the_new_format(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    _write_legacy(tmp_path, 1, 10)
    _write_legacy(tmp_path, 11, 5)
    found, recovered = _replay(tmp_path)
    assert [r.lsn for r in found] == list(range(1, 16))
    assert recovered.next_lsn == 16
    log: wal.Wal[int] = wal.Wal(tmp_path, 16, executor, lambda events: None)
    await log.submit(10, _remember_batch(16, 10))[1]
    await log.close()
    segments = wal.list_segments(tmp_path)
    assert [first for first, _ in segments] == [1, 11, 16]
    assert segments[-1][1].read_bytes()[: len(wal.MAGIC)] == wal.MAGIC
    found, recovered = _replay(tmp_path)
    assert [r.lsn for r in found] == list(range(1, 26))
    assert recovered.next_lsn == 26
    assert [r.lsn for r in wal.read_range(tmp_path, 13, 18)] == [14, 15, 16, 17, 18]
    legacy = found[3]
    assert isinstance(legacy, records.Remembered)
    assert legacy.memory.content == "content 4"


async def test_an_empty_old_format_segment_takes_the_new_format_in_place(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    _write_legacy(tmp_path, 1, 4)
    empty = _write_legacy(tmp_path, 5, 0)
    log: wal.Wal[int] = wal.Wal(tmp_path, 5, executor, lambda events: None)
    await log.submit(3, _remember_batch(5, 3))[1]
    await log.close()
    assert [first for first, _ in wal.list_segments(tmp_path)] == [1, 5]
    assert empty.read_bytes()[: len(wal.MAGIC)] == wal.MAGIC
    assert [r.lsn for r in _replay(tmp_path)[0]] == list(range(1, 8))


async def test_a_write_of_several_frames_replays_whole_or_not_at_all(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    log: wal.Wal[int] = wal.Wal(tmp_path, 1, executor, lambda events: None)
    await log.submit(5, _remember_batch(0, 5))[1]

    def two_frames(first: int) -> tuple[list[bytes], list[int]]:
        batch = [_memory(i) for i in range(5, 25)]
        return (
            [
                frames.encode(first, 1.0, 4, batch[:12]),
                frames.encode(first + 12, 1.0, 4, batch[12:]),
            ],
            list(range(first, first + 20)),
        )

    last, future = log.submit(20, two_frames)
    await future
    assert last == 25
    await log.close()
    (segment,) = wal.list_segments(tmp_path)
    found, recovered = _replay(tmp_path)
    assert [r.lsn for r in found] == list(range(1, 26))
    assert [r.lsn for r in wal.read_range(tmp_path, 3, 9)] == [4, 5, 6, 7, 8, 9]
    # Torn inside its last frame: the whole write goes, its first frame and marker too.
    data = segment[1].read_bytes()
    segment[1].write_bytes(data[:-10])
    found, recovered = _replay(tmp_path)
    assert [r.lsn for r in found] == list(range(1, 6))
    assert recovered.next_lsn == 6
    first_write = wal._FRAME.size + wal._FRAME.unpack_from(data, len(wal.MAGIC))[0]
    assert segment[1].stat().st_size == len(wal.MAGIC) + first_write


async def test_lsns_of_a_write_in_flight_are_still_retained(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    # The writer's one thread is kept busy until the checks are done.
    writer = concurrent.futures.ThreadPoolExecutor(1)
    gate = threading.Event()
    writer.submit(gate.wait)
    log: wal.Wal[int] = wal.Wal(tmp_path, 1, writer, lambda events: None)
    _last, future = log.submit(2, _remember_batch(0, 2))
    # Not on disk yet (no segment exists): a subscriber from LSN 1 must not be told that LSN 1
    # is gone.
    assert wal.list_segments(tmp_path) == []
    assert log.next_lsn == 3
    assert log.first_retained_lsn() == 1
    gate.set()
    await future
    writer.shutdown()
    assert log.first_retained_lsn() == 1
    await log.close()


def _frame_offsets(path: Path) -> list[int]:
    """Where each frame of a segment starts."""
    data = path.read_bytes()
    offsets, pos = [], len(wal.MAGIC)
    while pos < len(data):
        offsets.append(pos)
        pos += wal._FRAME.size + wal._FRAME.unpack_from(data, pos)[0]
    return offsets


def _columns(first: int, count: int, dim: int = 4) -> frames.Write:
    return frames.Write(
        tiers.Columns.of([_memory(i, dim) for i in range(first, first + count)], dim)
    )


async def test_writes_queued_together_are_one_frame_and_replay_write_by_write(
    tmp_path: Path,
) -> None:
    # The writer's one thread is busy until every write is queued: they form one group.
    writer = concurrent.futures.ThreadPoolExecutor(1)
    gate = threading.Event()
    writer.submit(gate.wait)
    seen: list[int] = []
    log: wal.Wal[int] = wal.Wal(tmp_path, 1, writer, seen.extend)
    futures = [
        log.append(_columns(0, 3), 1.0, 4, [1])[1],
        log.append(frames.Write(None, ("m1",)), 2.0, 4, [2])[1],
        log.append(_columns(10, 2), 3.0, 4, [3])[1],
    ]
    assert log.next_lsn == 7
    gate.set()
    await asyncio.gather(*futures)
    assert log.syncs == 1
    assert seen == [1, 2, 3]
    assert log.durable_lsn == 6
    await log.close()
    writer.shutdown()
    ((_, path),) = wal.list_segments(tmp_path)
    assert len(_frame_offsets(path)) == 1
    found, recovered = _replay(tmp_path)
    assert recovered.next_lsn == 7
    assert [r.lsn for r in found] == [1, 2, 3, 4, 5, 6]
    assert [type(r).__name__ for r in found] == ["Remembered"] * 3 + ["Forgotten"] + [
        "Remembered"
    ] * 2
    last = found[5]
    assert isinstance(last, records.Remembered)
    assert last.memory.id == "m11"
    assert last.memory.content == "content 11"
    assert last.memory.embedding.tolist() == [12.0] * 4
    assert dict(last.memory.tags) == {"i": "11"}
    # A floor inside the group replays only the records after it.
    found, _ = _replay(tmp_path, floor=4)
    assert [r.lsn for r in found] == [5, 6]


async def test_single_writers_woken_by_a_sync_group_with_each_other_in_the_next(
    tmp_path: Path, executor: concurrent.futures.Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 32 writers of one memory each, each writing again as soon as its write is durable after
    # 0.2 ms of work on the loop (a Remember's validation and tiers): the writer waits for the
    # ones a sync woke before the next group. Taking the next group right after each sync,
    # it made 36 to 56 groups of these 640 writes; waiting, 21 to 24. The wait's bound (10 ms)
    # is for a quiet loop: a loaded machine's loop took longer for the 6.4 ms of the woken
    # writers' work (51 groups at load 8), so here the bound is long and the test sees the wait.
    monkeypatch.setattr(wal, "WRITER_GATHER_S", 5.0)
    log: wal.Wal[int] = wal.Wal(tmp_path, 1, executor, lambda events: None)
    writers, rounds = 32, 20

    async def writer(w: int) -> None:
        for i in range(rounds):
            busy_until = time.perf_counter() + 0.0002
            while time.perf_counter() < busy_until:
                pass
            await log.append(_columns(w * rounds + i, 1), 1.0, 4, [])[1]

    await asyncio.gather(*(writer(w) for w in range(writers)))
    assert log.durable_lsn == writers * rounds
    assert log.syncs <= 30
    await log.close()
    found, _ = _replay(tmp_path)
    assert [r.lsn for r in found] == list(range(1, writers * rounds + 1))


async def test_a_torn_group_frame_loses_only_its_unacknowledged_writes(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    log: wal.Wal[int] = wal.Wal(tmp_path, 1, executor, lambda events: None)
    await log.append(_columns(0, 2), 1.0, 4, [])[1]
    writer = concurrent.futures.ThreadPoolExecutor(1)
    gate = threading.Event()
    writer.submit(gate.wait)
    log._executor = writer
    group = [log.append(_columns(i, 3), 1.0, 4, [])[1] for i in (10, 20)]
    gate.set()
    await asyncio.gather(*group)
    await log.close()
    writer.shutdown()
    ((_, path),) = wal.list_segments(tmp_path)
    second = _frame_offsets(path)[1]
    # A crash mid-append: the group's frame is cut short (it was never acknowledged).
    with path.open("r+b") as out:
        out.truncate(path.stat().st_size - 7)
    found, recovered = _replay(tmp_path)
    assert [r.lsn for r in found] == [1, 2]
    assert recovered.next_lsn == 3
    assert path.stat().st_size == second


async def test_a_write_larger_than_a_frame_goes_behind_a_marker(
    tmp_path: Path, executor: concurrent.futures.Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(frames, "FRAME_BYTES", 4 * 4 + 64 + 4 * 24)
    log: wal.Wal[int] = wal.Wal(tmp_path, 1, executor, lambda events: None)
    last, future = log.append(_columns(0, 5), 1.0, 4, [])
    await future
    assert last == 5
    await log.close()
    ((_, path),) = wal.list_segments(tmp_path)
    offsets = _frame_offsets(path)
    assert len(offsets) > 2  # a marker and the frames of the write behind it
    payload = path.read_bytes()[offsets[0] + wal._FRAME.size : offsets[1]]
    assert frames.peek(payload) == (1, 0, 5)
    found, _ = _replay(tmp_path)
    assert [r.lsn for r in found] == [1, 2, 3, 4, 5]


async def test_a_failed_append_fails_every_write_queued_and_writes_nothing_after_it(
    tmp_path: Path, executor: concurrent.futures.Executor
) -> None:
    log: wal.Wal[int] = wal.Wal(tmp_path, 1, executor, lambda events: None)
    await log.append(_columns(0, 1), 1.0, 4, [])[1]
    assert log._fd is not None
    os.close(log._fd)  # the next write fails (EBADF)
    first = log.append(_columns(1, 1), 1.0, 4, [])[1]
    second = log.append(_columns(2, 1), 1.0, 4, [])[1]
    for future in (first, second):
        with pytest.raises(errors.UnavailableError):
            await future
    assert isinstance(log.failure, errors.UnavailableError)
    with pytest.raises(errors.UnavailableError):
        log.append(_columns(3, 1), 1.0, 4, [])
    log._fd = None
    found, _ = _replay(tmp_path)
    assert [r.lsn for r in found] == [1]
