"""The write-ahead log of one space: segmented files of CRC32C-framed records with consecutive
LSNs, appended by a group commit (concurrent writers share one write and one fsync).

    segment  = magic(8) frame*          named <first LSN, 20 digits>.wal
    frame    = length:u32 crc32c:u32 payload(length)

Recovery reads every segment, checks every CRC and LSN, truncates a torn final record (a crash
mid-append), and refuses with CorruptWalError anything damaged before the tail.

A batch (RememberBatch) is a marker record naming a count, followed at once by that many
records, all in one segment. The marker carries the LSN of the batch's first record and takes no
LSN of its own (nothing else is appended while a batch is written, and a segment is
not rolled in its middle). It may take several appends; recovery applies its records only once
all are there, and cuts an incomplete batch at the tail off the log like a torn record, so a
batch is replayed whole or not at all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import mmap
import os
import struct
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Generic, TypeVar

import crc32c

from memspace_contract import durable
from memspace_contract.wire import Lsn
from memspace_server import errors
from memspace_server.storage import records

log = logging.getLogger(__name__)

MAGIC = b"MSWAL01\n"
SUFFIX = ".wal"
_FRAME = struct.Struct("<II")
MAX_RECORD = 16 * 1024 * 1024

T = TypeVar("T")


def segment_name(first_lsn: int) -> str:
    return f"{first_lsn:020d}{SUFFIX}"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.glob(f"*{SUFFIX}"):
        stem = path.name[: -len(SUFFIX)]
        if stem.isdigit():
            found.append((int(stem), path))
    return sorted(found)


def frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), crc32c.crc32c(payload)) + payload


@dataclasses.dataclass
class _Scan:
    """What reading one segment found."""

    end: int
    """Offset just past the last valid record."""
    torn: bool
    """The bytes after `end` are an incomplete or damaged final record."""
    last_lsn: int


def _intact_record_after(data: bytes, pos: int, lsn: int, horizon: int = 64) -> int | None:
    """The offset of an intact frame after `pos` holding one of the next `horizon` LSNs, if
    any. A torn append leaves one cut-off frame at the end of the file and nothing after it;
    a damaged length field in the middle of the log leaves intact records after it. (Each
    payload starts with type:u8 lsn:u64, see `records`: the LSN is what is searched for.)"""
    size = len(data)
    for wanted in range(lsn + 1, lsn + 1 + horizon):
        needle = struct.pack("<Q", wanted)
        hit = data.find(needle, pos + _FRAME.size + 2)
        while hit != -1:
            at = hit - 1 - _FRAME.size
            length, crc = _FRAME.unpack_from(data, at)
            end = at + _FRAME.size + length
            payload = memoryview(data)[at + _FRAME.size : end]
            if 0 < length <= MAX_RECORD and end <= size and crc32c.crc32c(payload) == crc:
                return at
            hit = data.find(needle, hit + 1)
    return None


def _scan_segment(
    path: Path, data: bytes, expect_lsn: int, on_record: Callable[[int, memoryview, int], None]
) -> _Scan:
    """Check every frame of one segment, calling on_record(lsn, payload, offset) for each valid
    one."""
    if data[: len(MAGIC)] != MAGIC:
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
            return _Scan(end=0, torn=True, last_lsn=expect_lsn - 1)
        raise errors.CorruptWalError(f"WAL segment {path.name} does not start with the WAL magic")
    view = memoryview(data)
    pos = len(MAGIC)
    size = len(data)
    lsn = expect_lsn - 1
    while pos < size:
        if size - pos < _FRAME.size:
            return _Scan(end=pos, torn=True, last_lsn=lsn)
        length, crc = _FRAME.unpack_from(data, pos)
        end = pos + _FRAME.size + length
        if length == 0 or length > MAX_RECORD or end > size:
            # A frame that runs past the end of the file, or zeros left by a crash, can only be
            # a torn final write; anything else here is damage. So is a length running past the
            # end with intact records after it: a damaged length field, not a torn append.
            if not any(view[pos:]) or (end > size and _intact_record_after(data, pos, lsn) is None):
                return _Scan(end=pos, torn=True, last_lsn=lsn)
            raise errors.CorruptWalError(
                f"WAL segment {path.name}: bad record length {length} at offset {pos} before the "
                "tail; refusing to serve a space whose log is damaged"
            )
        payload = view[pos + _FRAME.size : end]
        if crc32c.crc32c(payload) != crc:
            if end == size:
                return _Scan(end=pos, torn=True, last_lsn=lsn)
            raise errors.CorruptWalError(
                f"WAL segment {path.name}: checksum mismatch at offset {pos} before the tail; "
                "refusing to serve a space whose log is damaged"
            )
        record_lsn = records.peek_lsn(payload)
        if record_lsn != lsn + 1:
            raise errors.CorruptWalError(
                f"WAL segment {path.name}: LSN {record_lsn} at offset {pos}, expected {lsn + 1}"
            )
        if records.batch_count(payload) is None:  # a batch marker takes no LSN of its own
            lsn = record_lsn
        on_record(record_lsn, payload, pos)
        pos = end
    return _Scan(end=pos, torn=False, last_lsn=lsn)


@dataclasses.dataclass
class _OpenBatch:
    """A batch marker met during recovery whose records are not all read yet."""

    segment: int
    offset: int
    lsn: int
    remaining: int
    payloads: list[memoryview] = dataclasses.field(default_factory=list)


class _Replay:
    """Hands each record after the floor LSN to `apply`, and a batch's records only once the
    whole batch has been read."""

    def __init__(self, floor_lsn: int, apply: Callable[[memoryview], None]) -> None:
        self.floor_lsn = floor_lsn
        self.apply = apply
        self.replayed = 0
        self.segment = 0
        self.batch: _OpenBatch | None = None

    def record(self, lsn: int, payload: memoryview, offset: int) -> None:
        batch = self.batch
        if batch is not None:
            if lsn > self.floor_lsn:
                batch.payloads.append(payload)
            batch.remaining -= 1
            if batch.remaining == 0:
                for held in batch.payloads:
                    self.apply(held)
                self.replayed += len(batch.payloads)
                self.batch = None
            return
        count = records.batch_count(payload)
        if count is not None:
            if count:  # the marker holds the LSN of the batch's first record
                self.batch = _OpenBatch(self.segment, offset, lsn, count)
            return
        if lsn > self.floor_lsn:
            self.apply(payload)
            self.replayed += 1


@dataclasses.dataclass(frozen=True)
class Recovered:
    next_lsn: int
    replayed: int
    truncated_bytes: int


def recover(directory: Path, floor_lsn: int, apply: Callable[[memoryview], None]) -> Recovered:
    """Replay the payload of every record after `floor_lsn` (the checkpoint's LSN) through
    `apply` (`records.decode` reads one; the view is valid while it is referenced), truncate a
    torn tail, and return where appends continue. Blocking: call it from a worker thread."""
    directory.mkdir(parents=True, exist_ok=True)
    segments = list_segments(directory)
    expect = segments[0][0] if segments else floor_lsn + 1
    if expect > floor_lsn + 1:
        raise errors.CorruptWalError(
            f"WAL starts at LSN {expect} but the checkpoint ends at {floor_lsn}: "
            "records are missing"
        )
    truncated = 0
    replay = _Replay(floor_lsn, apply)
    on_record = replay.record

    for index, (first, path) in enumerate(segments):
        replay.segment = index
        if first != expect:
            raise errors.CorruptWalError(
                f"WAL segment {path.name} starts at LSN {first}, expected {expect}"
            )
        data = path.read_bytes()
        try:
            scan = _scan_segment(path, data, first, on_record)
        except records.RecordFormatError as err:
            raise errors.CorruptWalError(f"WAL segment {path.name}: {err}") from err
        last = index == len(segments) - 1
        if scan.torn:
            if not last:
                raise errors.CorruptWalError(
                    f"WAL segment {path.name} ends in a damaged record but is not the last segment"
                )
            truncated = len(data) - scan.end
            log.warning(
                "truncating a torn record at the tail of WAL segment %s (%d bytes)",
                path,
                truncated,
            )
            with path.open("r+b") as out:
                if scan.end < len(MAGIC):
                    out.write(MAGIC)
                    out.truncate(len(MAGIC))
                else:
                    out.truncate(scan.end)
            durable.fsync_file(path)
        expect = scan.last_lsn + 1
    if replay.batch is not None:
        truncated += _cut_incomplete_batch(segments, replay.batch)
        expect = replay.batch.lsn
    return Recovered(
        next_lsn=max(expect, floor_lsn + 1), replayed=replay.replayed, truncated_bytes=truncated
    )


def _cut_incomplete_batch(segments: list[tuple[int, Path]], batch: _OpenBatch) -> int:
    """A batch cut off by a crash (or a failed append) midway: none of it was acknowledged. It
    can only be the end of the log; cut it off like a torn record. Returns the bytes cut."""
    if batch.segment != len(segments) - 1:
        raise errors.CorruptWalError(
            f"WAL segment {segments[batch.segment][1].name}: a batch at LSN {batch.lsn} is "
            "incomplete but is not at the end of the log"
        )
    path = segments[batch.segment][1]
    log.warning(
        "cutting an incomplete batch (LSN %d on, %d records missing) off the tail of WAL "
        "segment %s",
        batch.lsn,
        batch.remaining,
        path,
    )
    cut = path.stat().st_size - batch.offset
    durable.truncate(path, batch.offset)
    return cut


def read_range(
    directory: Path, after_lsn: int, through_lsn: int
) -> Generator[records.Record, None, None]:
    """Records with after_lsn < LSN <= through_lsn, for change-feed replay (read-only). Lazy:
    each segment is memory-mapped and its records read one at a time, so a reader that stops
    midway (a slow subscriber) holds one record, never the log."""
    segments = list_segments(directory)
    for index, (first, path) in enumerate(segments):
        following = segments[index + 1][0] if index + 1 < len(segments) else None
        if following is not None and following <= after_lsn + 1:
            continue
        if first > through_lsn:
            return
        try:
            with path.open("rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size <= len(MAGIC):
                    continue
                data = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ)
        except FileNotFoundError as err:
            raise errors.LsnNotRetainedError(
                f"the WAL no longer holds LSN {after_lsn + 1}; subscribe from a later LSN"
            ) from err
        try:
            yield from _read_segment(path, data, first, after_lsn, through_lsn)
        finally:
            data.close()


def _read_segment(
    path: Path, data: mmap.mmap, first: int, after_lsn: int, through_lsn: int
) -> Iterator[records.Record]:
    """The records of one segment in the range; every record up to through_lsn is durable, so
    a frame that is not whole before it is damage."""
    if data[: len(MAGIC)] != MAGIC:
        raise errors.CorruptWalError(f"WAL segment {path.name} does not start with the WAL magic")
    pos = len(MAGIC)
    size = len(data)
    lsn = first - 1
    while pos < size and lsn < through_lsn:
        length, crc = _FRAME.unpack_from(data, pos) if size - pos >= _FRAME.size else (0, 0)
        end = pos + _FRAME.size + length
        if length == 0 or length > MAX_RECORD or end > size:
            raise errors.CorruptWalError(
                f"WAL segment {path.name}: bad record length {length} at offset {pos}"
            )
        if data[pos + _FRAME.size] == records.BATCH:
            pos = end  # a batch marker: no LSN, no event
            continue
        lsn += 1
        if lsn > after_lsn:
            payload = data[pos + _FRAME.size : end]
            if crc32c.crc32c(payload) != crc or records.peek_lsn(payload) != lsn:
                raise errors.CorruptWalError(
                    f"WAL segment {path.name}: damaged record at offset {pos} (LSN {lsn})"
                )
            yield records.decode(payload)
        pos = end


@dataclasses.dataclass
class _Waiter(Generic[T]):
    lsn: int
    """The last LSN of the waiter's records."""
    count: int
    """How many records (LSNs) it submitted."""
    future: asyncio.Future[None]
    events: list[T]


class Wal(Generic[T]):
    """Appends to the WAL of one space with group commit. Writers call `submit` on the event loop
    (which fixes their LSN and order) and await the returned future: it resolves once the record
    is on disk and fsynced, after `on_durable` has seen the writer's event in LSN order."""

    def __init__(
        self,
        directory: Path,
        next_lsn: int,
        executor: concurrent.futures.Executor,
        on_durable: Callable[[list[T]], None],
        segment_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.directory = directory
        self._next_lsn = next_lsn
        self._durable_lsn = next_lsn - 1
        self._executor = executor
        self._on_durable = on_durable
        self._segment_bytes = segment_bytes
        self._pending: list[bytes] = []
        self._waiters: list[_Waiter[T]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._failure: errors.MemspaceError | None = None
        self._fd: int | None = None
        self._size = 0
        self._roll_requested = False
        self.syncs = 0
        self.holding_segment = False
        """Set while a batch is written in several appends: the segment is not rolled for size
        in its middle (a batch always lies in one segment)."""
        self.appended_bytes = 0
        """Bytes appended since the last consolidation (`mark_consolidated`)."""
        segments = list_segments(directory)
        if segments:
            _first, path = segments[-1]
            self._open_segment(path, create=False)

    @property
    def next_lsn(self) -> Lsn:
        return Lsn(self._next_lsn)

    @property
    def durable_lsn(self) -> Lsn:
        return Lsn(self._durable_lsn)

    @property
    def failure(self) -> errors.MemspaceError | None:
        return self._failure

    def mark_consolidated(self) -> None:
        """Everything appended so far is in a checkpoint: count appended bytes from zero again
        (they decide when the next consolidation is due). Call on the event loop."""
        self.appended_bytes = 0

    def first_retained_lsn(self) -> Lsn:
        segments = list_segments(self.directory)
        return Lsn(segments[0][0] if segments else self._next_lsn)

    def submit(self, build: Callable[[Lsn], tuple[bytes, T]]) -> tuple[Lsn, asyncio.Future[None]]:
        """Reserve the next LSN, frame the payload `build(lsn)` makes and queue it for the next
        group commit, with the event `on_durable` gets once it is on disk."""
        return self.submit_many([build])

    def submit_many(
        self, builds: Sequence[Callable[[Lsn], tuple[bytes, T]]], batch: bool = False
    ) -> tuple[Lsn, asyncio.Future[None]]:
        """`submit` for several records at once: consecutive LSNs, one future for them all.
        With `batch`, they go behind a batch marker: recovery replays all of them or none.
        Returns the last LSN."""
        if self._failure is not None:
            raise self._failure
        frames = []
        events = []
        lsn = self._next_lsn
        if batch:
            frames.append(frame(records.encode_batch(lsn, time.time(), len(builds))))
        for offset, build in enumerate(builds):
            payload, event = build(Lsn(lsn + offset))
            if len(payload) > MAX_RECORD:
                raise errors.InvalidMemoryError(
                    f"a record of {len(payload)} bytes exceeds the WAL limit of {MAX_RECORD}"
                )
            frames.append(frame(payload))
            events.append(event)
        return self.submit_frames(frames, len(builds), events)

    def submit_frames(
        self, frames: list[bytes], lsns: int, events: list[T]
    ) -> tuple[Lsn, asyncio.Future[None]]:
        """Queue framed records made for the `lsns` LSNs from `next_lsn` on (batch markers
        among them take none); the caller holds what keeps anyone else from submitting
        meanwhile, the space's write lock. `on_durable` gets `events` once they are on disk.
        Returns the last LSN."""
        if self._failure is not None:
            raise self._failure
        last = self._next_lsn + lsns - 1
        self._next_lsn = last + 1
        self.appended_bytes += sum(len(f) for f in frames)
        self._pending.extend(frames)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiters.append(_Waiter(last, lsns, future, events))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_loop())
        return Lsn(last), future

    async def flush(self) -> None:
        """Wait until everything submitted so far is durable."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
        if self._failure is not None:
            raise self._failure

    async def roll(self) -> None:
        """Start a new segment with the next append, so older segments can be dropped whole.
        An open segment without records already starts at the next LSN and is kept: a second
        segment of the same name cannot be created."""
        await self.flush()
        if self._fd is not None and self._size > len(MAGIC):
            self._roll_requested = True

    def drop_through(self, lsn: int) -> int:
        """Delete segments whose records all have LSN <= lsn. Blocking (unlink)."""
        segments = list_segments(self.directory)
        dropped = 0
        whole = bool(segments) and self._roll_requested and segments[-1][0] <= lsn
        if whole:
            # The open segment is complete and entirely consolidated too. Its successor is made
            # now, not at the next append, so the log always names the LSN it continues from:
            # a lost checkpoint is then refused (records missing), never read as an empty space.
            self._open_segment(self.directory / segment_name(lsn + 1), create=True)
            self._roll_requested = False
        for index, (_, path) in enumerate(segments[:-1]):
            if segments[index + 1][0] <= lsn + 1:
                path.unlink(missing_ok=True)
                dropped += 1
        if whole:
            segments[-1][1].unlink(missing_ok=True)
            dropped += 1
        return dropped

    async def close(self) -> None:
        try:
            await self.flush()
        finally:
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open_segment(self, path: Path, create: bool) -> None:
        self._close_fd()
        flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o640)
        if create:
            os.write(fd, MAGIC)
            durable.fsync_dir(self.directory)
        self._fd = fd
        self._size = os.fstat(fd).st_size

    def _write(self, data: bytes, first_lsn: int) -> None:
        """Blocking: append one batch and fsync it (runs in the executor)."""
        full = self._size >= self._segment_bytes and not self.holding_segment
        if self._fd is None or self._roll_requested or full:
            self._open_segment(self.directory / segment_name(first_lsn), create=True)
            self._roll_requested = False
        assert self._fd is not None
        start = self._size
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fdatasync(self._fd)
        except OSError:
            # Leave no partial batch behind for the next append to follow.
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                log.exception("could not cut a failed WAL append back in %s", self.directory)
            raise
        self._size = start + len(data)
        self.syncs += 1

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            waiters, self._waiters = self._waiters, []
            try:
                first = waiters[0].lsn - waiters[0].count + 1
                await loop.run_in_executor(self._executor, self._write, b"".join(batch), first)
            except Exception as err:  # every waiter must hear of any failure, not hang
                self._fail(err, waiters)
                return
            self._durable_lsn = waiters[-1].lsn
            try:
                self._on_durable([e for w in waiters for e in w.events])
            finally:
                for waiter in waiters:
                    if not waiter.future.done():
                        waiter.future.set_result(None)

    def _fail(self, err: Exception, waiters: list[_Waiter[T]]) -> None:
        if durable.is_disk_full(err):
            failure: errors.MemspaceError = errors.DiskFullError(
                "the space's volume is full; the write was not stored. Free space or grow the "
                "volume (storage.size), then retry"
            )
        else:
            reason = os.strerror(err.errno or 0) if isinstance(err, OSError) else "internal error"
            failure = errors.UnavailableError(
                f"the space's log could not be written ({reason}); the write was not stored, "
                "retry shortly"
            )
        log.error("WAL append failed in %s: %s", self.directory, err)
        self._failure = failure
        waiters = waiters + self._waiters
        self._waiters = []
        self._pending = []
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_exception(failure)
