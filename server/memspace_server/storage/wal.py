"""The write-ahead log of one space: segmented files of CRC32C-framed payloads with consecutive
LSNs, appended by a group commit (concurrent writers share one write and one fsync).

    segment  = magic(8) frame*          named <first LSN, 20 digits>.wal
    frame    = length:u32 crc32c:u32 payload(length)

Format 2 (magic "MSWAL02\n", every segment written now): each payload is a batch frame holding
one write's records as columns, or a batch marker (`frames`). Format 1 ("MSWAL01\n", older
servers): each payload is one record or a batch marker (`records`); such segments still replay,
and appends continue in a new segment.
Recovery reads every segment, checks every CRC and LSN, truncates a torn final frame (a crash
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
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Generic, TypeVar

import crc32c
import numpy as np

from memspace_contract import durable
from memspace_contract.wire import Lsn
from memspace_server import errors, spans
from memspace_server.storage import frames, records

log = logging.getLogger(__name__)

MAGIC = b"MSWAL02\n"
MAGIC_V1 = b"MSWAL01\n"
SUFFIX = ".wal"
_FRAME = struct.Struct("<II")
MAX_RECORD = 16 * 1024 * 1024
"""Largest payload of a format-1 segment (one record)."""
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16
"""Most buffers one writev takes."""
MAX_FRAME = 64 * 1024 * 1024
"""Largest payload of a format-2 segment (one batch frame); a larger write is split."""
WRITER_TURN_S = 0.02
"""How long a space's writer goes on taking its next groups before it lets the other spaces'
appends waiting for the pool go first."""
WRITER_GATHER_S = 0.01
"""The most a writer waits after a sync, when fewer writes are queued than it just made
durable, for the event loop to run the writers it woke (who often write again at once): their
writes join the next group instead of making small groups of their own (64 single writers in
one process made groups of 4 to 23 where they made 64 before the writer was pipelined)."""
GATHER_RECORDS = 4
"""A group of writes with at most this many records each on average is one of small writes
(`WRITER_GATHER_S`); larger writes are not waited for: the loop's work on them is what overlaps
the sync (batches of 100 lost a fifth of their rate when waited for)."""

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


def frame(payload: bytes | bytearray) -> bytes:
    return b"".join(frame_parts(payload))


def frame_parts(payload: bytes | bytearray) -> tuple[bytes, bytes | bytearray]:
    """A frame as its head and its payload, not joined (appends hand both to one writev)."""
    return _FRAME.pack(len(payload), crc32c.crc32c(payload)), payload


@dataclasses.dataclass
class _Scan:
    """What reading one segment found."""

    end: int
    """Offset just past the last valid record."""
    torn: bool
    """The bytes after `end` are an incomplete or damaged final record."""
    last_lsn: int


def _intact_record_after(
    data: bytes | mmap.mmap, pos: int, lsn: int, horizon: int = 64
) -> int | None:
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


def _intact_frame_after(data: bytes | mmap.mmap, pos: int) -> int | None:
    """The offset of an intact format-2 frame after `pos`, if any: every batch frame starts
    with the frame mark, and a CRC that matches tells a frame from bytes that look like one."""
    size = len(data)
    hit = data.find(frames.MARK, pos + _FRAME.size + 1)
    while hit != -1:
        at = hit - _FRAME.size
        length, crc = _FRAME.unpack_from(data, at)
        end = at + _FRAME.size + length
        intact = 0 < length <= MAX_FRAME and end <= size
        if intact and crc32c.crc32c(memoryview(data)[hit:end]) == crc:
            return at
        hit = data.find(frames.MARK, hit + 1)
    return None


OnPayload = Callable[[memoryview, bool, int], None]
"""Replay's callback: (payload, is a format-2 batch frame, leading records to skip)."""


@dataclasses.dataclass(frozen=True)
class _Found:
    """One valid frame a segment scan found."""

    first: int
    """Its first LSN (a batch marker: the batch's first)."""
    count: int
    """Its records (0 for a batch marker)."""
    marker: int | None
    """A batch marker's record count; None for any other frame."""
    payload: memoryview
    v2: bool
    offset: int


OnFrame = Callable[[_Found], None]


def _version(data: bytes | mmap.mmap) -> int:
    head = data[: len(MAGIC)]
    if head == MAGIC:
        return 2
    if head == MAGIC_V1:
        return 1
    return 0


def _scan_segment(path: Path, data: bytes | mmap.mmap, expect_lsn: int, on_frame: OnFrame) -> _Scan:
    """Check every frame of one segment, calling on_frame for each valid one."""
    version = _version(data)
    if version == 0:
        if len(data) < len(MAGIC) and (MAGIC.startswith(data) or MAGIC_V1.startswith(data)):
            return _Scan(end=0, torn=True, last_lsn=expect_lsn - 1)
        raise errors.CorruptWalError(f"WAL segment {path.name} does not start with the WAL magic")
    limit = MAX_FRAME if version == 2 else MAX_RECORD
    view = memoryview(data)
    pos = len(MAGIC)
    size = len(data)
    lsn = expect_lsn - 1
    while pos < size:
        if size - pos < _FRAME.size:
            return _Scan(end=pos, torn=True, last_lsn=lsn)
        length, crc = _FRAME.unpack_from(data, pos)
        end = pos + _FRAME.size + length
        if length == 0 or length > limit or end > size:
            # A frame that runs past the end of the file, or zeros left by a crash, can only be
            # a torn final write; anything else here is damage. So is a length running past the
            # end with intact frames after it: a damaged length field, not a torn append.
            intact = (
                _intact_frame_after(data, pos)
                if version == 2
                else _intact_record_after(data, pos, lsn)
            )
            if not any(view[pos:]) or (end > size and intact is None):
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
        if version == 2:
            first, count, marker = frames.peek(payload)
        else:
            first, marker = records.peek_lsn(payload), records.batch_count(payload)
            count = 0 if marker is not None else 1
        if first != lsn + 1:
            raise errors.CorruptWalError(
                f"WAL segment {path.name}: LSN {first} at offset {pos}, expected {lsn + 1}"
            )
        # A batch marker takes no LSN of its own.
        on_frame(_Found(first, count, marker, payload, version == 2, pos))
        lsn += count
        pos = end
    return _Scan(end=pos, torn=False, last_lsn=lsn)


@dataclasses.dataclass
class _OpenBatch:
    """A batch marker met during recovery whose records are not all read yet."""

    segment: int
    offset: int
    lsn: int
    remaining: int
    held: list[tuple[memoryview, bool, int]] = dataclasses.field(default_factory=list)


class _Replay:
    """Hands each frame holding records after the floor LSN to `apply`, and a batch's frames
    only once the whole batch has been read."""

    def __init__(self, floor_lsn: int, apply: OnPayload) -> None:
        self.floor_lsn = floor_lsn
        self.apply = apply
        self.replayed = 0
        self.segment = 0
        self.batch: _OpenBatch | None = None

    def frame(self, found: _Found) -> None:
        batch = self.batch
        first, count, marker, payload, v2 = (
            found.first,
            found.count,
            found.marker,
            found.payload,
            found.v2,
        )
        last = first + count - 1
        skip = max(0, self.floor_lsn - first + 1)
        if batch is not None:
            if marker is not None:
                raise records.RecordFormatError(
                    f"a batch marker inside the batch at LSN {batch.lsn}"
                )
            if last > self.floor_lsn:
                batch.held.append((payload, v2, skip))
            batch.remaining -= count
            if batch.remaining < 0:
                raise records.RecordFormatError(f"the batch at LSN {batch.lsn} overruns its count")
            if batch.remaining == 0:
                for held in batch.held:
                    self._apply(*held)
                self.batch = None
            return
        if marker is not None:
            if marker:  # the marker holds the LSN of the batch's first record
                self.batch = _OpenBatch(self.segment, found.offset, first, marker)
            return
        if last > self.floor_lsn:
            self._apply(payload, v2, skip)

    def _apply(self, payload: memoryview, v2: bool, skip: int) -> None:
        self.apply(payload, v2, skip)
        self.replayed += (frames.peek(payload)[1] if v2 else 1) - skip


@dataclasses.dataclass(frozen=True)
class Recovered:
    next_lsn: int
    replayed: int
    truncated_bytes: int


def recover(directory: Path, floor_lsn: int, apply: OnPayload) -> Recovered:
    """Replay every payload holding records after `floor_lsn` (the checkpoint's LSN) through
    `apply(payload, v2, skip)`: a format-2 batch frame (`frames.decode` reads it; its first
    `skip` records are at or below the floor) or a format-1 record (`records.decode`); the view
    is valid while it is referenced. A batch's frames come only once all of them were read; an
    incomplete batch or a torn frame at the tail is cut off. Returns where appends continue.
    Blocking: call it from a worker thread."""
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

    for index, (first, path) in enumerate(segments):
        replay.segment = index
        if first != expect:
            raise errors.CorruptWalError(
                f"WAL segment {path.name} starts at LSN {first}, expected {expect}"
            )
        data = _map(path)
        try:
            scan = _scan_segment(path, data, first, replay.frame)
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


def _map(path: Path) -> bytes | mmap.mmap:
    """A segment's bytes for recovery: mapped and read ahead in one call (no copy, and few
    page faults); the views `apply` keeps hold the mapping. Bytes cut off the tail later are
    never among them. A file too short to hold a frame is just read."""
    with path.open("rb") as source:
        size = os.fstat(source.fileno()).st_size
        if size <= len(MAGIC) + _FRAME.size:
            return source.read()
        return mmap.mmap(
            source.fileno(),
            size,
            flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
            prot=mmap.PROT_READ,
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
    version = _version(data)
    if version == 0:
        raise errors.CorruptWalError(f"WAL segment {path.name} does not start with the WAL magic")
    limit = MAX_FRAME if version == 2 else MAX_RECORD
    pos = len(MAGIC)
    size = len(data)
    lsn = first - 1
    while pos < size and lsn < through_lsn:
        length, crc = _FRAME.unpack_from(data, pos) if size - pos >= _FRAME.size else (0, 0)
        end = pos + _FRAME.size + length
        if length == 0 or length > limit or end > size:
            raise errors.CorruptWalError(
                f"WAL segment {path.name}: bad frame length {length} at offset {pos}"
            )
        marks = data[pos + _FRAME.size : pos + _FRAME.size + 5]
        if marks[:1] == bytes((records.BATCH,)) or marks == frames.MARK + bytes((frames.MARKER,)):
            pos = end  # a batch marker: no LSN, no event
            continue
        if version == 1:
            lsn += 1
            if lsn > after_lsn:
                payload = data[pos + _FRAME.size : end]
                if crc32c.crc32c(payload) != crc or records.peek_lsn(payload) != lsn:
                    raise errors.CorruptWalError(
                        f"WAL segment {path.name}: damaged record at offset {pos} (LSN {lsn})"
                    )
                yield records.decode(payload)
        else:
            (count,) = struct.unpack_from("<I", data, pos + _FRAME.size + 21)
            if lsn + count > after_lsn:
                payload = data[pos + _FRAME.size : end]
                yield from _frame_records(
                    path, payload, crc, pos, lsn=lsn, after_lsn=after_lsn, through_lsn=through_lsn
                )
            lsn += count
        pos = end


def _frame_records(
    path: Path, payload: bytes, crc: int, pos: int, *, lsn: int, after_lsn: int, through_lsn: int
) -> list[records.Record]:
    """The records of a format-2 frame (after `lsn`) within the range, checked."""
    try:
        first, _count, _marker = frames.peek(payload)
        found = frames.decode(payload).records()
    except records.RecordFormatError as err:
        raise errors.CorruptWalError(f"WAL segment {path.name}: {err}") from err
    if crc32c.crc32c(payload) != crc or first != lsn + 1:
        raise errors.CorruptWalError(
            f"WAL segment {path.name}: damaged frame at offset {pos} (LSN {lsn + 1})"
        )
    return [r for r in found if after_lsn < r.lsn <= through_lsn]


@dataclasses.dataclass
class _Waiter(Generic[T]):
    lsn: int
    """The last LSN of the waiter's records."""
    count: int
    """How many records (LSNs) it submitted."""
    future: asyncio.Future[None]
    events: list[T]


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One submission waiting for the writer: a write's columns, or frames made already."""

    first: int
    """Its first LSN."""
    lsns: int
    write: frames.Write | None
    framed: Sequence[frames.Buffer | bytearray] = ()
    bound: int = 0
    """An upper bound of the bytes of `write` in a frame."""
    at: float = 0.0
    dim: int = 0
    parent: spans.Context | None = None


class Wal(Generic[T]):
    """Appends to the WAL of one space with group commit. Writers call `append` (or `submit`)
    on the event loop, which fixes their LSN and order, and await the returned future: it
    resolves once the records are on disk and fsynced, after `on_durable` has seen the
    writer's events in LSN order.

    The writing runs on a thread of `executor` while the space has writes queued (at most one
    at a time): it takes every write queued, encodes the column writes among them into one
    frame (`frames.parts`; several past `frames.FRAME_BYTES`), appends them in one writev and
    fdatasyncs, then takes what was queued meanwhile at once, without waiting for the event
    loop: the loop validates and applies the next writes while the previous ones sync."""

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
        self._waiters: collections.deque[_Waiter[T]] = collections.deque()
        self._failure: errors.MemspaceError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Shared with the writer thread, under `_lock`:
        self._lock = threading.Lock()
        # Set by the event loop once it has run the writers the last sync woke.
        self._woken_ran = threading.Event()
        self._queue: list[_Entry] = []
        self._writing = False
        self._broken = False
        # The writer thread's own (and the loop's while nothing is being written):
        self._fd: int | None = None
        self._size = 0
        self._roll_requested = False
        self.syncs = 0
        self.last_fsync_s = 0.0
        """Seconds the last append's fdatasync took (for its span)."""
        self.holding_segment = False
        """Set while a batch is written in several appends: the segment is not rolled for size
        in its middle (a batch always lies in one segment)."""
        self.appended_bytes = 0
        """Bytes appended since the last consolidation (`mark_consolidated`)."""
        segments = list_segments(directory)
        if segments:
            _first, path = segments[-1]
            self._adopt_segment(path)
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
        """The first LSN the log can still replay. With no segment yet, the first LSN after
        what is durable: LSNs reserved by writes in flight are not lost, only not on disk yet."""
        segments = list_segments(self.directory)
        return Lsn(segments[0][0] if segments else self._durable_lsn + 1)

    def append(
        self, write: frames.Write, at: float, dim: int, events: list[T]
    ) -> tuple[Lsn, asyncio.Future[None]]:
        """Queue one write's records (its remembers, then its forgets) at the next LSNs, to be
        encoded as columns by the writer with the writes queued beside it; `on_durable` gets
        `events` once they are on disk. A write past `frames.FRAME_BYTES` is encoded at once,
        in several frames behind a batch marker (replayed all or none). Returns the last LSN."""
        count = len(write)
        if count < 1:
            raise ValueError("a WAL write holds at least one record")
        batch = write.batch
        sizes = frames.bound(batch, dim) if batch is not None else 0
        size = sizes if isinstance(sizes, int) else int(sizes.sum())
        size += sum(64 + 4 * len(memory_id) for memory_id in write.forgotten)
        if size <= frames.FRAME_BYTES:
            entry = _Entry(self._next_lsn, count, write, (), size, at, dim)
            return self._enqueue(entry, count, events)
        assert batch is not None
        if isinstance(sizes, int):
            sizes = frames.bound(batch, dim, each=True)
        ends = np.cumsum(sizes)
        step = frames.FRAME_BYTES
        cuts = np.searchsorted(ends, np.arange(step, int(ends[-1]), step), "right")
        bounds = sorted({0, *cuts.tolist(), len(batch)})
        first = self._next_lsn
        pieces = [batch.slice(a, b) for a, b in itertools.pairwise(bounds) if b > a]
        payloads = [
            frames.encode(first + start, at, dim, piece)
            for start, piece in zip(bounds, pieces, strict=False)
        ]
        if write.forgotten:
            payloads.append(frames.encode(first + len(batch), at, dim, (), write.forgotten))
        return self.submit(count, lambda _first: (payloads, events))

    def submit(
        self, count: int, build: Callable[[Lsn], tuple[Sequence[bytes], list[T]]]
    ) -> tuple[Lsn, asyncio.Future[None]]:
        """Reserve the next `count` LSNs; `build(first LSN)` makes the batch frames holding
        those records in order (`frames.encode`) and the events `on_durable` gets once they are
        on disk. Several frames go behind a batch marker: recovery replays all or none. One
        future for them all; returns the last LSN."""
        if self._failure is not None:
            raise self._failure
        if count < 1:
            raise ValueError("a WAL write holds at least one record")
        first = self._next_lsn
        payloads, events = build(Lsn(first))
        framed: list[bytes | bytearray] = []
        if len(payloads) > 1:
            framed.extend(frame_parts(frames.encode_marker(first, time.time(), count)))
        for payload in payloads:
            if len(payload) > MAX_FRAME:
                raise errors.InvalidMemoryError(
                    f"a WAL frame of {len(payload)} bytes exceeds the limit of {MAX_FRAME}"
                )
            framed.extend(frame_parts(payload))
        return self.submit_frames(framed, count, events)

    def submit_frames(
        self, framed: Sequence[bytes | bytearray], lsns: int, events: list[T]
    ) -> tuple[Lsn, asyncio.Future[None]]:
        """Queue framed records made for the `lsns` LSNs from `next_lsn` on (batch markers
        among them take none), as whole frames or their parts in order; the caller holds what
        keeps anyone else from submitting meanwhile, the space's write lock. `on_durable` gets
        `events` once they are on disk. Returns the last LSN."""
        return self._enqueue(_Entry(self._next_lsn, lsns, None, framed), lsns, events)

    def _enqueue(
        self, entry: _Entry, lsns: int, events: list[T]
    ) -> tuple[Lsn, asyncio.Future[None]]:
        if self._failure is not None:
            raise self._failure
        loop = asyncio.get_running_loop()
        self._loop = loop
        last = self._next_lsn + lsns - 1
        self._next_lsn = last + 1
        future: asyncio.Future[None] = loop.create_future()
        self._waiters.append(_Waiter(last, lsns, future, events))
        if spans.ENABLED:
            entry = dataclasses.replace(entry, parent=spans.current())
        with self._lock:
            self._queue.append(entry)
            start = not self._writing
            self._writing = True
        if start:
            try:
                self._executor.submit(self._drain)
            except RuntimeError as err:  # the executor was shut down: the server is stopping
                with self._lock:
                    self._writing = False
                self._failed(err)
                raise
        return Lsn(last), future

    async def flush(self) -> None:
        """Wait until everything submitted so far is durable (or failed)."""
        if self._waiters:
            await asyncio.wait([self._waiters[-1].future])
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

    def _adopt_segment(self, path: Path) -> None:
        """Appends continue in format 2: after a format-1 segment that holds records, in a new
        segment; an empty one (only its magic, which has the same length) is turned into a
        format-2 segment in place, as its name already is the next LSN."""
        with path.open("rb") as source:
            head = source.read(len(MAGIC))
        if head != MAGIC_V1:
            return
        if path.stat().st_size > len(MAGIC_V1):
            self._roll_requested = True
            return
        durable.atomic_write(path, MAGIC, 0o640)

    def _open_segment(self, path: Path, create: bool) -> None:
        self._close_fd()
        flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o640)
        if create:
            os.write(fd, MAGIC)
            durable.fsync_dir(self.directory)
        self._fd = fd
        self._size = os.fstat(fd).st_size

    # -- the writer thread ---------------------------------------------------------------------

    def _drain(self) -> None:
        """Blocking, on a writer thread: write and sync what is queued; tell the event loop
        which LSNs are durable; if fewer writes were queued meanwhile than it just made
        durable, wait (up to `WRITER_GATHER_S`) for the loop to run the writers it woke; if
        anything is queued then, go on at once (no hand-off to another thread), for up to
        `WRITER_TURN_S`, then behind the other spaces' appends
        waiting for the pool: a space that never stops writing does not keep a thread from
        them."""
        loop = self._loop
        assert loop is not None
        turn_ends = time.monotonic() + WRITER_TURN_S
        while True:
            with self._lock:
                entries, self._queue = self._queue, []
                if not entries or self._broken:
                    self._writing = False
                    return
            try:
                size = self._commit(entries)
            except Exception as err:  # every waiter must hear of any failure, not hang
                with self._lock:
                    self._broken = True  # nothing after a failed append is written
                    self._queue = []
                    self._writing = False
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(self._failed, err)
                return
            last = entries[-1].first + entries[-1].lsns - 1
            self._woken_ran.clear()
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._written, last, size)
            # Small writes (Remembers): the writers just woken may write again at once, their
            # next writes cost the loop little: wait for them to group with them. Large ones
            # (batches) go on at once: the loop's work on them overlaps the next sync.
            small = sum(entry.lsns for entry in entries) <= GATHER_RECORDS * len(entries)
            with self._lock:
                gather = small and len(self._queue) < len(entries) and not self._broken
            if gather:
                self._woken_ran.wait(WRITER_GATHER_S)
            with self._lock:
                if not self._queue or self._broken:
                    self._writing = False
                    return
            if time.monotonic() < turn_ends:
                continue
            try:
                self._executor.submit(self._drain)
            except RuntimeError:  # the pool is shutting down: finish here
                continue
            return

    def _commit(self, entries: list[_Entry]) -> int:
        """Blocking: encode, append and sync one group; returns its bytes."""
        # Parented on the call whose write started the group; the writes it groups with that
        # call's are counted in `memspace.wal.writers`.
        with spans.span("memspace.wal.commit", parent=entries[0].parent) as span:
            parts = self._frames(entries)
            size = self._write(parts, entries[0].first)
            if span is not None:
                span.set_attributes(
                    {
                        "memspace.wal.records": sum(e.lsns for e in entries),
                        "memspace.wal.bytes": size,
                        "memspace.wal.writers": len(entries),
                        "memspace.wal.first_lsn": entries[0].first,
                        "memspace.wal.fsync_ms": self.last_fsync_s * 1000,
                    }
                )
        return size

    def _frames(self, entries: list[_Entry]) -> list[frames.Buffer | bytearray]:
        """The group's frames as parts in order: each run of column writes as few frames as
        `frames.FRAME_BYTES` allows (whole writes each), frames made already as they are."""
        out: list[frames.Buffer | bytearray] = []
        run: list[_Entry] = []
        run_bytes = 0
        for entry in [*entries, None]:
            if entry is not None and entry.write is not None:
                if run and run_bytes + entry.bound > frames.FRAME_BYTES:
                    out.extend(self._frame_of(run))
                    run, run_bytes = [], 0
                run.append(entry)
                run_bytes += entry.bound
                continue
            if run:
                out.extend(self._frame_of(run))
                run, run_bytes = [], 0
            if entry is not None:
                out.extend(entry.framed)
        return out

    def _frame_of(self, run: list[_Entry]) -> list[frames.Buffer]:
        writes = [entry.write for entry in run if entry.write is not None]
        payload = frames.parts(run[0].first, run[0].at, run[0].dim, writes)
        crc = 0
        length = 0
        for part in payload:
            crc = crc32c.crc32c(part, crc)
            length += len(part)
        if length > MAX_FRAME:
            raise errors.InvalidMemoryError(
                f"a WAL frame of {length} bytes exceeds the limit of {MAX_FRAME}"
            )
        return [_FRAME.pack(length, crc), *payload]

    def _write(self, parts: Sequence[frames.Buffer | bytearray], first_lsn: int) -> int:
        """Blocking: append one group (its frames' parts, in one writev where the system
        takes them all) and fsync it; returns its bytes."""
        full = self._size >= self._segment_bytes and not self.holding_segment
        if self._fd is None or self._roll_requested or full:
            self._open_segment(self.directory / segment_name(first_lsn), create=True)
            self._roll_requested = False
        assert self._fd is not None
        start = self._size
        size = sum(len(part) for part in parts)
        try:
            written = os.writev(self._fd, parts) if len(parts) <= _IOV_MAX else 0
            if written < size:  # a short write (or too many parts): the rest in plain writes
                view = memoryview(b"".join(parts))[written:]
                while view:
                    view = view[os.write(self._fd, view) :]
            synced = time.perf_counter()
            os.fdatasync(self._fd)
            self.last_fsync_s = time.perf_counter() - synced
        except OSError:
            # Leave no partial batch behind for the next append to follow.
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                log.exception("could not cut a failed WAL append back in %s", self.directory)
            raise
        self._size = start + size
        self.syncs += 1
        return size

    # -- back on the event loop ----------------------------------------------------------------

    def _written(self, last_lsn: int, size: int) -> None:
        """Records through `last_lsn` are durable: publish their events, wake their writers."""
        if self._failure is not None:
            return
        self._durable_lsn = max(self._durable_lsn, last_lsn)
        self.appended_bytes += size
        done: list[_Waiter[T]] = []
        while self._waiters and self._waiters[0].lsn <= last_lsn:
            done.append(self._waiters.popleft())
        try:
            self._on_durable([e for w in done for e in w.events])
        finally:
            for waiter in done:
                if not waiter.future.done():
                    waiter.future.set_result(None)
            # After the steps of the writers woken above (the loop runs callbacks in order):
            # what they write at once is queued by then (`WRITER_GATHER_S`).
            asyncio.get_running_loop().call_soon(self._woken_ran.set)

    def _failed(self, err: BaseException) -> None:
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
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_exception(failure)
