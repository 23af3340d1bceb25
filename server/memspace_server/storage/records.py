"""WAL record payloads: what a Remember or a Forget writes, in a compact binary form.

payload  = type:u8 lsn:u64 at:f64 body
remember = id_len:u16 content_len:u32 confidence:f32 created_at:f64 tags_len:u16 dim:u32
           id content tags_json embedding(dim x float32 little-endian)
forget   = id_len:u16 id
batch    = count:u32        the next `count` records are one batch: all or nothing (`wal`)
"""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np

from memspace_contract.wire import Lsn
from memspace_server.storage import memories, tiers

REMEMBER = 1
FORGET = 2
BATCH = 3

_HEAD = struct.Struct("<BQd")
_REMEMBER = struct.Struct("<HIfdHI")
_FORGET = struct.Struct("<H")
_BATCH = struct.Struct("<I")


class RecordFormatError(ValueError):
    """A payload whose CRC matched but whose contents do not parse: a bug or a foreign file."""


@dataclasses.dataclass(frozen=True)
class Remembered:
    lsn: memories.Lsn
    at: float
    memory: memories.Memory


@dataclasses.dataclass(frozen=True)
class Forgotten:
    lsn: memories.Lsn
    at: float
    id: memories.MemoryId


Record = Remembered | Forgotten


def encode_remember(lsn: int, at: float, memory: memories.Memory) -> bytes:
    mid = memory.id.encode()
    content = memory.content.encode()
    tags = json.dumps(dict(memory.tags), separators=(",", ":")).encode() if memory.tags else b""
    embedding = memory.embedding.astype("<f4", copy=False)
    return b"".join(
        (
            _HEAD.pack(REMEMBER, lsn, at),
            _REMEMBER.pack(
                len(mid),
                len(content),
                memory.confidence,
                memory.created_at,
                len(tags),
                embedding.shape[0],
            ),
            mid,
            content,
            tags,
            embedding.tobytes(),
        )
    )


def encode_forget(lsn: int, at: float, memory_id: str) -> bytes:
    mid = memory_id.encode()
    return _HEAD.pack(FORGET, lsn, at) + _FORGET.pack(len(mid)) + mid


def encode_batch(lsn: int, at: float, count: int) -> bytes:
    """The marker that opens a batch of `count` records (they follow it at once)."""
    return _HEAD.pack(BATCH, lsn, at) + _BATCH.pack(count)


def batch_count(payload: bytes | memoryview) -> int | None:
    """The record count of a batch marker; None for any other record."""
    if len(payload) != _HEAD.size + _BATCH.size or payload[0] != BATCH:
        return None
    return int(_BATCH.unpack_from(payload, _HEAD.size)[0])


def peek_lsn(payload: bytes | memoryview) -> Lsn:
    return Lsn(_HEAD.unpack_from(payload)[1])


def peek(payload: memoryview) -> tuple[int, str, float]:
    """(type, memory ID, time) of a record without decoding the rest: replay keeps only the
    last record of each memory and decodes just those."""
    try:
        kind, _, at = _HEAD.unpack_from(payload)
        (id_len,) = _FORGET.unpack_from(payload, _HEAD.size)
        start = _HEAD.size + (_REMEMBER.size if kind == REMEMBER else _FORGET.size)
        return kind, str(payload[start : start + id_len], "utf-8"), at
    except (struct.error, UnicodeDecodeError) as err:
        raise RecordFormatError(f"unreadable record: {err}") from err


_RememberFields = tuple[str, str, float, float, dict[str, str], np.ndarray]


def _remember_fields(payload: bytes | memoryview) -> _RememberFields:
    """(id, content, confidence, created_at, tags, embedding) of a remember record: the one
    decoder of its body. The embedding is a read-only view into the record (no copy until the
    memory is placed in a tier)."""
    id_len, content_len, confidence, created, tags_len, dim = _REMEMBER.unpack_from(
        payload, _HEAD.size
    )
    pos = _HEAD.size + _REMEMBER.size
    view = memoryview(payload)
    memory_id = str(view[pos : pos + id_len], "utf-8")
    pos += id_len
    content = str(view[pos : pos + content_len], "utf-8")
    pos += content_len
    tags = json.loads(view[pos : pos + tags_len].tobytes()) if tags_len else {}
    pos += tags_len
    if pos + 4 * dim != len(view):
        raise RecordFormatError("remember record has a wrong length")
    embedding = np.frombuffer(payload, dtype=np.float32, count=dim, offset=pos)
    return memory_id, content, confidence, created, tags, embedding


def columns(payloads: list[memoryview], dim: int) -> tiers.Columns:
    """Decode remember records straight into a batch of columns (replay's fast path)."""
    count = len(payloads)
    ids: list[str] = []
    contents: list[str] = []
    tags: list[dict[str, str]] = []
    confidence = np.empty(count, np.float32)
    created = np.empty(count, np.float64)
    embeddings = np.empty((count, dim), np.float32)
    try:
        for row, payload in enumerate(payloads):
            memory_id, content, confidence[row], created[row], tagged, embedding = _remember_fields(
                payload
            )
            if embedding.shape[0] != dim:
                raise RecordFormatError(
                    f"a record holds {embedding.shape[0]} values, the space {dim}"
                )
            ids.append(memory_id)
            contents.append(content)
            tags.append(tagged)
            embeddings[row] = embedding
    except (struct.error, UnicodeDecodeError, ValueError) as err:
        raise RecordFormatError(f"unreadable record: {err}") from err
    return tiers.Columns(
        ids=ids,
        contents=contents,
        embeddings=embeddings,
        confidence=confidence,
        tags=tags,
        created_at=created,
        last_recalled_at=np.zeros(count, np.float64),
        recall_count=np.zeros(count, np.uint64),
    )


def decode(payload: bytes | memoryview) -> Record:
    try:
        kind, lsn, at = _HEAD.unpack_from(payload)
        pos = _HEAD.size
        if kind == REMEMBER:
            memory_id, content, confidence, created, tags, embedding = _remember_fields(payload)
            memory = memories.Memory(
                id=memories.MemoryId(memory_id),
                content=content,
                embedding=embedding,
                confidence=confidence,
                tags=tags,
                created_at=created,
            )
            return Remembered(lsn=Lsn(lsn), at=at, memory=memory)
        if kind == FORGET:
            (id_len,) = _FORGET.unpack_from(payload, pos)
            pos += _FORGET.size
            if pos + id_len != len(payload):
                raise RecordFormatError("forget record has a wrong length")
            mid = bytes(payload[pos : pos + id_len]).decode()
            return Forgotten(lsn=Lsn(lsn), at=at, id=memories.MemoryId(mid))
    except (struct.error, UnicodeDecodeError, ValueError) as err:
        raise RecordFormatError(f"unreadable record: {err}") from err
    raise RecordFormatError(f"unknown record type {kind}")
