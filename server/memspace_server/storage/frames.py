"""WAL batch frames (format 2): many records with consecutive LSNs, column by column.

One frame holds one write (a RememberBatch, a Remember, a Forget): its records are validated,
encoded and CRC'd as columns, and replay reads them back as `np.frombuffer` views, never a record
at a time. Layout (little-endian; every section starts at a multiple of 8 bytes of the payload):

    head        mark "MSB2" type:u8 (3) first_lsn:u64 at:f64 count:u32 dim:u32 remembers:u32
                (type 4 with nothing after the head: a batch marker, see `MARKER`)
    kinds       u8[count]          1 remember, 2 forget
    created     f64[count]         created_at (0 for a forget)
    confidence  f32[count]
    id_ends     u32[count]         end offset of each id in the ids blob (start: the previous end)
    text_ends   u32[count]         end offset of each content in the contents blob
    tag_ends    u32[count]         end offset of each tags JSON in the tags blob ("" for none)
    embeddings  f32[remembers x dim]   the remember records' rows, in record order
    ids, contents, tags            UTF-8 blobs

The record at position i has LSN first_lsn + i. Legacy segments (format 1, see `records`) hold
one record per frame and still replay.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from memspace_server.storage import memories, records, tiers

MARK = b"MSB2"
BATCH = 3
MARKER = 4
"""A batch marker: `count` is the records of the frames that follow it, which recovery applies
all together or not at all; it takes no LSN of its own (`first_lsn` is the batch's first)."""
_HEAD = struct.Struct("<4sBQdIII")
"""mark, type, first LSN, time, records, embedding size, remember records."""
_STAMP = struct.Struct("<Qd")
_STAMP_AT = 5
"""Where the first LSN and the time lie in the head."""


def _pad(size: int) -> int:
    return (size + 7) & ~7


@dataclasses.dataclass
class Frame:
    """The columns of one decoded frame; arrays are views into the payload."""

    first_lsn: int
    at: float
    dim: int
    kinds: npt.NDArray[np.uint8]
    created: npt.NDArray[np.float64]
    confidence: npt.NDArray[np.float32]
    embeddings: npt.NDArray[np.float32]
    """Rows of the remember records only."""
    embedding_row: npt.NDArray[np.int64]
    """For each record, its row of `embeddings` (-1 for a forget)."""
    ids: list[str]
    _contents: memoryview
    _text_ends: npt.NDArray[np.uint32]
    _tags: memoryview
    _tag_ends: npt.NDArray[np.uint32]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def last_lsn(self) -> int:
        return self.first_lsn + len(self.ids) - 1

    def content(self, i: int) -> str:
        start = int(self._text_ends[i - 1]) if i else 0
        return str(self._contents[start : int(self._text_ends[i])], "utf-8")

    def tags(self, i: int) -> dict[str, str]:
        start = int(self._tag_ends[i - 1]) if i else 0
        end = int(self._tag_ends[i])
        if start == end:
            return {}
        found: dict[str, str] = json.loads(bytes(self._tags[start:end]))
        return found

    def columns(self, rows: npt.NDArray[np.int64]) -> tiers.Columns:
        """The remember records at positions `rows` (ascending), as a batch of columns: text
        cut from each blob decoded once, embeddings a view where the rows are one run."""
        count = rows.shape[0]
        whole = count == len(self.ids) and (count == 0 or int(rows[-1]) == count - 1)
        embedding_rows = self.embedding_row[rows]
        first = int(embedding_rows[0]) if count else 0
        if count and int(embedding_rows[-1]) - first == count - 1:
            embeddings = self.embeddings[first : first + count]
        else:
            embeddings = self.embeddings[embedding_rows]
        try:
            contents = _texts(self._contents, self._text_ends, rows, whole)
            tag_texts = _texts(self._tags, self._tag_ends, rows, whole)
            tags = (
                [json.loads(t) if t else {} for t in tag_texts]
                if any(tag_texts)
                else [{} for _ in range(count)]
            )
        except ValueError as err:  # UnicodeDecodeError and JSONDecodeError among them
            raise records.RecordFormatError(f"unreadable frame text: {err}") from err
        return tiers.Columns(
            ids=list(self.ids) if whole else [self.ids[r] for r in rows.tolist()],
            contents=contents,
            embeddings=embeddings,
            confidence=self.confidence[rows],
            tags=tags,
            created_at=self.created[rows],
            last_recalled_at=np.zeros(count, np.float64),
            recall_count=np.zeros(count, np.uint64),
        )

    def records(self) -> list[records.Record]:
        """Each record as an object (for change-feed replay, which sends them one by one)."""
        found: list[records.Record] = []
        for i, memory_id in enumerate(self.ids):
            lsn = memories.Lsn(self.first_lsn + i)
            if self.kinds[i] == records.FORGET:
                found.append(
                    records.Forgotten(lsn=lsn, at=self.at, id=memories.MemoryId(memory_id))
                )
                continue
            memory = memories.Memory(
                id=memories.MemoryId(memory_id),
                content=self.content(i),
                embedding=self.embeddings[self.embedding_row[i]],
                confidence=float(self.confidence[i]),
                tags=self.tags(i),
                created_at=float(self.created[i]),
            )
            found.append(records.Remembered(lsn=lsn, at=self.at, memory=memory))
        return found


def _texts(
    blob: memoryview, ends: npt.NDArray[np.uint32], rows: npt.NDArray[np.int64], whole: bool
) -> list[str]:
    """The texts at positions `rows` of a blob cut at `ends`: the blob is decoded once and cut
    by character offsets where it is ASCII (the usual), else each text is decoded alone."""
    if not len(blob):
        return ["" for _ in range(rows.shape[0])]
    stops = ends.astype(np.int64)
    starts = np.empty_like(stops)
    starts[0] = 0
    starts[1:] = stops[:-1]
    if not whole:
        starts, stops = starts[rows], stops[rows]
    text = str(blob, "utf-8")
    if len(text) == len(blob):
        return [text[a:b] for a, b in zip(starts.tolist(), stops.tolist(), strict=True)]
    return [str(blob[a:b], "utf-8") for a, b in zip(starts.tolist(), stops.tolist(), strict=True)]


def _blob(texts: Sequence[str]) -> tuple[bytes, npt.NDArray[np.uint32]]:
    """The texts as one UTF-8 blob and the end offset of each: one encode of the whole where
    it is ASCII (the usual; `str.isascii` is O(1)), else one a text."""
    joined = "".join(texts)
    if joined.isascii():
        data = joined.encode("ascii")
        lengths = map(len, texts)
    else:
        parts = [t.encode() for t in texts]
        data = b"".join(parts)
        lengths = map(len, parts)
    if len(data) >= 1 << 32:
        raise ValueError("a frame's text columns exceed 4 GiB")
    return data, np.fromiter(itertools.accumulate(lengths), "<u4", len(texts))


@dataclasses.dataclass(frozen=True)
class Write:
    """One write's records, not encoded yet: its remember records (`batch`), then its forgets.
    The WAL's writer encodes the writes of one group commit into one frame (`parts`)."""

    batch: tiers.Columns | None
    forgotten: Sequence[str] = ()

    def __len__(self) -> int:
        return (len(self.batch) if self.batch is not None else 0) + len(self.forgotten)


def bound(batch: tiers.Columns, dim: int, each: bool = False) -> npt.NDArray[np.int64] | int:
    """An upper bound of the bytes each memory of `batch` takes in a frame (UTF-8 takes at
    most 4 a character), or of them all (an int) where that is quick and below FRAME_BYTES
    (unless `each`)."""
    count = len(batch)
    fixed = 4 * dim + 64
    tagged = any(batch.tags)
    if not tagged and not each:
        total = count * fixed + 4 * (sum(map(len, batch.ids)) + sum(map(len, batch.contents)))
        if total <= FRAME_BYTES:
            return total
    sizes = fixed + 4 * (
        np.fromiter(map(len, batch.ids), np.int64, count)
        + np.fromiter(map(len, batch.contents), np.int64, count)
    )
    if tagged:
        sizes += [sum(4 * (len(k) + len(v)) + 8 for k, v in t.items()) for t in batch.tags]
    return sizes


FRAME_BYTES = 16 * 1024 * 1024
"""The most one frame is made to hold: a larger write takes several behind a batch marker, a
group commit of several writes several frames."""
_JOIN_EMBEDDINGS = 16
"""Writes in one frame past which their embedding rows are copied into one part (many small
parts cost more in calls than the copy)."""

Buffer = bytes | memoryview
"""A part of an encoded frame: bytes, or a flat byte view of a write's embedding rows."""


@dataclasses.dataclass
class _Gathered:
    """The columns of a frame's writes, gathered in record order."""

    kinds: list[bytes] = dataclasses.field(default_factory=list)
    created: list[npt.NDArray[np.float64]] = dataclasses.field(default_factory=list)
    confidence: list[npt.NDArray[np.float32]] = dataclasses.field(default_factory=list)
    rows: list[npt.NDArray[np.float32]] = dataclasses.field(default_factory=list)
    ids: list[str] = dataclasses.field(default_factory=list)
    contents: list[str] = dataclasses.field(default_factory=list)
    tags: list[Sequence[Mapping[str, str]]] = dataclasses.field(default_factory=list)
    tagged: bool = False

    def remembered(self, batch: tiers.Columns, dim: int) -> None:
        count = len(batch)
        matrix = np.ascontiguousarray(batch.embeddings, "<f4")
        if matrix.shape != (count, dim):
            raise ValueError(f"a frame of {count} memories of {dim} values got {matrix.shape}")
        self.rows.append(matrix)
        self.kinds.append(bytes((records.REMEMBER,)) * count)
        self.created.append(np.asarray(batch.created_at, "<f8"))
        self.confidence.append(np.asarray(batch.confidence, "<f4"))
        self.ids.extend(batch.ids)
        self.contents.extend(batch.contents)
        self.tags.append(batch.tags)
        self.tagged = self.tagged or any(batch.tags)

    def forgotten(self, ids: Sequence[str]) -> None:
        count = len(ids)
        self.kinds.append(bytes((records.FORGET,)) * count)
        self.created.append(np.zeros(count, "<f8"))
        self.confidence.append(np.zeros(count, "<f4"))
        self.ids.extend(ids)
        self.contents.extend([""] * count)
        self.tags.append([{}] * count)


def parts(first_lsn: int, at: float, dim: int, writes: Sequence[Write]) -> list[Buffer]:
    """One frame of `writes` (records with LSNs from first_lsn on, write after write), as its
    parts in order: the head and fixed-width columns, each write's embedding rows as a view of
    its matrix (not copied), then the text blobs. A frame holds whole writes, so a torn frame
    loses whole writes; its time is `at` (the first write's)."""
    columns = _Gathered()
    for write in writes:
        if write.batch is not None and len(write.batch):
            columns.remembered(write.batch, dim)
        if write.forgotten:
            columns.forgotten(write.forgotten)
    count = len(columns.ids)
    remembers = sum(matrix.shape[0] for matrix in columns.rows)
    id_blob, id_ends = _blob(columns.ids)
    text_blob, text_ends = _blob(columns.contents)
    if columns.tagged:
        tag_blob, tag_ends = _blob(
            [
                json.dumps(dict(t), separators=(",", ":")) if t else ""
                for run in columns.tags
                for t in run
            ]
        )
    else:
        tag_blob, tag_ends = b"", np.zeros(count, "<u4")
    head = _HEAD.pack(MARK, BATCH, first_lsn, at, count, dim, remembers)
    front: list[bytes | memoryview] = []
    size = 0
    for section in (
        head,
        b"".join(columns.kinds),
        _joined(columns.created),
        _joined(columns.confidence),
        id_ends.data,
        text_ends.data,
        tag_ends.data,
    ):
        front.append(section)
        size += section.nbytes if isinstance(section, memoryview) else len(section)
        padding = _pad(size) - size
        if padding:
            front.append(b"\0" * padding)
            size += padding
    found: list[Buffer] = [b"".join(front)]
    rows = columns.rows
    if len(rows) > _JOIN_EMBEDDINGS:
        rows = [np.concatenate(rows)]
    found.extend(matrix.reshape(-1).view(np.uint8).data for matrix in rows)
    tail = 4 * dim * remembers % 8
    found.append(b"".join((b"\0" * (8 - tail) if tail else b"", id_blob, text_blob, tag_blob)))
    return found


def _joined(arrays: list[npt.NDArray[Any]]) -> bytes:
    if len(arrays) == 1:
        return arrays[0].tobytes()
    return b"".join(a.tobytes() for a in arrays)


def encode(
    first_lsn: int,
    at: float,
    dim: int,
    remembered: Sequence[memories.Memory] | tiers.Columns,
    forgotten: Sequence[str] = (),
) -> bytes:
    """One frame: the remember records (LSNs from first_lsn on, in order), then the forgets."""
    batch = (
        remembered if isinstance(remembered, tiers.Columns) else tiers.Columns.of(remembered, dim)
    )
    return b"".join(parts(first_lsn, at, dim, [Write(batch, forgotten)]))


def restamp(payload: bytearray, first_lsn: int, at: float) -> None:
    """Set the first LSN and the time of an encoded frame in place (a staged batch gets them
    only when it commits)."""
    mark, kind = _HEAD.unpack_from(payload)[:2]
    if mark != MARK or kind != BATCH:
        raise records.RecordFormatError("not a batch frame")
    _STAMP.pack_into(payload, _STAMP_AT, first_lsn, at)


def encode_marker(first_lsn: int, at: float, count: int) -> bytes:
    """The marker opening a batch of `count` records in the frames right after it."""
    return _HEAD.pack(MARK, MARKER, first_lsn, at, count, 0, 0)


def peek(payload: bytes | memoryview) -> tuple[int, int, int | None]:
    """(first LSN, records, None) of a frame, (first LSN of its batch, 0, records of the batch)
    of a batch marker, without decoding the rest."""
    try:
        mark, kind, first_lsn, _at, count, _dim, _rem = _HEAD.unpack_from(payload)
    except struct.error as err:
        raise records.RecordFormatError(f"unreadable frame: {err}") from err
    if mark == MARK and kind == MARKER and len(payload) == _HEAD.size:
        return int(first_lsn), 0, int(count)
    if mark != MARK or kind != BATCH or count == 0:
        raise records.RecordFormatError("not a batch frame")
    return int(first_lsn), int(count), None


def decode(payload: bytes | bytearray | memoryview) -> Frame:
    """The frame's columns as views into `payload` (which must stay referenced)."""
    try:
        mark, kind, first_lsn, at, count, dim, remembers = _HEAD.unpack_from(payload)
        if mark != MARK or kind != BATCH or count == 0:
            raise records.RecordFormatError("not a batch frame")
        pos = _pad(_HEAD.size)

        def take(dtype: str, items: int) -> npt.NDArray[np.generic]:
            nonlocal pos
            array: npt.NDArray[np.generic] = np.frombuffer(payload, dtype, items, pos)
            pos = _pad(pos + array.nbytes)
            return array

        kinds = take("u1", count)
        created = take("<f8", count)
        confidence = take("<f4", count)
        id_ends = take("<u4", count)
        text_ends = take("<u4", count)
        tag_ends = take("<u4", count)
        embeddings = take("<f4", remembers * dim).reshape(remembers, dim)
        view = memoryview(payload)
        blobs = []
        for ends in (id_ends, text_ends, tag_ends):
            size = int(ends[-1])
            if size < 0 or pos + size > len(view):
                raise records.RecordFormatError("a frame's text runs past its end")
            blobs.append(view[pos : pos + size])
            pos += size
        if pos != len(view):
            raise records.RecordFormatError("a frame has trailing bytes")
        is_remember = kinds == records.REMEMBER
        if int(np.count_nonzero(is_remember)) != remembers or not np.all(
            is_remember | (kinds == records.FORGET)
        ):
            raise records.RecordFormatError("a frame's record kinds do not add up")
        if np.any(np.diff(id_ends.astype(np.int64), prepend=0) < 0):
            raise records.RecordFormatError("a frame's id offsets go backwards")
        id_text = str(blobs[0], "utf-8")
        if len(id_text) == len(blobs[0]):  # ASCII ids (the usual): offsets are characters
            starts = [0, *id_ends[:-1].tolist()]
            ids = [id_text[s:e] for s, e in zip(starts, id_ends.tolist(), strict=True)]
        else:
            starts = [0, *id_ends[:-1].tolist()]
            raw = blobs[0]
            ids = [str(raw[s:e], "utf-8") for s, e in zip(starts, id_ends.tolist(), strict=True)]
    except (struct.error, UnicodeDecodeError, ValueError) as err:
        raise records.RecordFormatError(f"unreadable frame: {err}") from err
    embedding_row = np.cumsum(is_remember, dtype=np.int64) - 1
    embedding_row[~is_remember] = -1
    return Frame(
        first_lsn=int(first_lsn),
        at=float(at),
        dim=int(dim),
        kinds=kinds,  # type: ignore[arg-type]
        created=created,  # type: ignore[arg-type]
        confidence=confidence,  # type: ignore[arg-type]
        embeddings=embeddings,  # type: ignore[arg-type]
        embedding_row=embedding_row,
        ids=ids,
        _contents=blobs[1],
        _text_ends=text_ends,  # type: ignore[arg-type]
        _tags=blobs[2],
        _tag_ends=tag_ends,  # type: ignore[arg-type]
    )
