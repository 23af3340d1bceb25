"""What the client answers, as typed, frozen values instead of protobuf messages, and how the
client's inputs become request messages: embeddings go in as numpy arrays (or any sequence of
floats) and come out as float32 numpy arrays.

    Memory        a stored memory (`embedding` is None when the call did not ask for it)
    Hit           one Recall result: memory, score in [-1, 1], tier
    Remembered    id and LSN of a stored memory
    Batch         count, last LSN and ids of a RememberBatch
    Forgotten     whether the memory existed, and the LSN of its removal (truthy when it did)
    Event         one Subscribe/watch event: space, kind, id, LSN, time
    SpaceHealth   one space's Health figures (None for a figure the server does not know)
    SearchIndex   how a space searches its warm and cold tiers (exact or an HNSW graph)
    Health        the server's status and its spaces
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from memspace_contract import wire
from memspace_contract.v1 import memspace_pb2 as pb

Vector = npt.NDArray[np.float32]
"""An embedding as the client answers it: a one-dimensional float32 array."""
EmbeddingLike = npt.ArrayLike
"""An embedding as the client takes it: a numpy array or any sequence of floats."""
EventKind = Literal["remembered", "forgotten"]


def vector(values: EmbeddingLike, what: str = "embedding") -> Vector:
    """`values` as a one-dimensional float32 array (ValueError when it is not one)."""
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{what} must be a non-empty one-dimensional vector, got {array.shape}")
    return array


def matrix(values: EmbeddingLike, rows: int) -> npt.NDArray[np.float32]:
    """`values` as a (rows, dim) float32 matrix (ValueError when it is not one)."""
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != rows or array.shape[1] == 0:
        raise ValueError(f"embeddings must be a ({rows}, dim) matrix, got shape {array.shape}")
    return array


def new_id() -> str:
    """A memory ID made by the client (128 random bits, hex, as the server makes them), so that
    a retried Remember replaces its own first attempt instead of storing a second memory."""
    return os.urandom(16).hex()


def _time(stamp: Any, present: bool) -> datetime.datetime | None:
    if not present:
        return None
    moment: datetime.datetime = stamp.ToDatetime(tzinfo=datetime.UTC)
    return moment


@dataclasses.dataclass(frozen=True)
class Memory:
    id: str
    content: str
    embedding: Vector | None = dataclasses.field(compare=False, repr=False)
    """float32, the space's dimension; None when the call did not ask for embeddings."""
    confidence: float = 1.0
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    created_at: datetime.datetime | None = None
    last_recalled_at: datetime.datetime | None = None
    recall_count: int = 0

    @classmethod
    def from_message(cls, message: pb.Memory) -> Memory:
        values = message.embedding
        return cls(
            id=message.id,
            content=message.content,
            embedding=np.array(values, dtype=np.float32) if len(values) else None,
            confidence=message.confidence if message.HasField("confidence") else 1.0,
            tags=dict(message.tags),
            created_at=_time(message.created_at, message.HasField("created_at")),
            last_recalled_at=_time(message.last_recalled_at, message.HasField("last_recalled_at")),
            recall_count=message.recall_count,
        )


@dataclasses.dataclass(frozen=True)
class Hit:
    memory: Memory
    score: float
    """Cosine similarity of the cue and the memory, in [-1, 1]."""
    tier: wire.TierName | str

    @classmethod
    def from_message(cls, message: pb.RecallHit) -> Hit:
        return cls(Memory.from_message(message.memory), message.score, message.tier)


@dataclasses.dataclass(frozen=True)
class Remembered:
    id: str
    lsn: wire.Lsn


@dataclasses.dataclass(frozen=True)
class Batch:
    count: int
    last_lsn: wire.Lsn
    ids: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Forgotten:
    forgotten: bool
    """False when the space had no such memory (then `lsn` is 0)."""
    lsn: wire.Lsn

    def __bool__(self) -> bool:
        return self.forgotten


@dataclasses.dataclass(frozen=True)
class Event:
    space: str
    kind: EventKind
    id: str
    lsn: wire.Lsn
    at: datetime.datetime | None

    @classmethod
    def from_message(cls, message: pb.MemoryEvent) -> Event:
        kind: EventKind = "forgotten" if message.type == pb.EVENT_TYPE_FORGOTTEN else "remembered"
        return cls(
            space=message.space,
            kind=kind,
            id=message.id,
            lsn=wire.Lsn(message.lsn),
            at=_time(message.at, message.HasField("at")),
        )


@dataclasses.dataclass(frozen=True)
class SearchIndex:
    """How a space searches its warm and cold tiers (SpaceHealth.index)."""

    type: str
    """In effect: "exact" or "hnsw"."""
    configured_type: str
    """spec.index.type: "exact", "hnsw" or "auto"."""
    rows_indexed: int
    build_state: str
    """"none", "building", "ready" or "failed"."""
    recall: float | None
    """Measured mean recall@k of sampled approximate recalls; None until one is measured."""

    @classmethod
    def from_message(cls, message: pb.SearchIndexStatus) -> SearchIndex:
        return cls(
            type=message.type,
            configured_type=message.configured_type,
            rows_indexed=message.rows_indexed,
            build_state=message.build_state,
            recall=message.recall if message.HasField("recall") else None,
        )


@dataclasses.dataclass(frozen=True)
class SpaceHealth:
    """One space's figures; a figure the server does not know (an unloaded space after a crash)
    is None, never 0."""

    space: str
    state: str
    memories: int | None
    tier_memories: Mapping[str, int] | None
    pressure: float | None
    wal_lag_ms: float | None
    consolidation_rate: float | None
    disk_bytes: int
    index_generation: int
    index: SearchIndex | None = None
    """The search of the warm and cold tiers; None from a server that does not say."""

    @classmethod
    def from_message(cls, message: pb.SpaceHealth) -> SpaceHealth:
        unknown = set(message.unknown)

        def known(name: str, value: Any) -> Any:
            return None if name in unknown else value

        return cls(
            space=message.space,
            state=message.state,
            memories=known("memories", message.memories),
            tier_memories=known(
                "tier_memories", {tier: message.tier_memories.get(tier, 0) for tier in wire.TIERS}
            ),
            pressure=known("pressure", message.pressure),
            wal_lag_ms=known("wal_lag_ms", message.wal_lag_ms),
            consolidation_rate=known("consolidation_rate", message.consolidation_rate),
            disk_bytes=message.disk_bytes,
            index_generation=message.index_generation,
            index=SearchIndex.from_message(message.index) if message.HasField("index") else None,
        )


@dataclasses.dataclass(frozen=True)
class Health:
    status: str
    """SERVING or DRAINING."""
    spaces: tuple[SpaceHealth, ...]

    @classmethod
    def from_message(cls, message: pb.HealthResponse) -> Health:
        return cls(message.status, tuple(SpaceHealth.from_message(s) for s in message.spaces))


# -- requests --------------------------------------------------------------------------------


def memory_message(
    content: str,
    embedding: EmbeddingLike | None,
    memory_id: str,
    tags: Mapping[str, str] | None,
    confidence: float | None,
) -> pb.Memory:
    """A Memory; without `embedding` the server embeds `content` (a space with a model)."""
    values = vector(embedding).tolist() if embedding is not None else ()
    message = pb.Memory(id=memory_id, content=content, embedding=values, tags=tags)
    if confidence is not None:
        message.confidence = confidence
    return message


def batch_messages(
    contents: Sequence[str],
    embeddings: EmbeddingLike | None,
    ids: Sequence[str] | None,
    tags: Sequence[Mapping[str, str] | None] | Mapping[str, str] | None,
) -> list[pb.RememberRequest]:
    """One RememberRequest per memory: the rows of `embeddings` (a matrix; None: the server
    embeds each content), client-made ids when none are given, `tags` for all or one mapping
    per memory."""
    rows: list[Any] = (
        list(matrix(embeddings, len(contents))) if embeddings is not None else [()] * len(contents)
    )
    chosen = list(ids) if ids is not None else [new_id() for _ in contents]
    if len(chosen) != len(contents):
        raise ValueError(f"{len(chosen)} ids for {len(contents)} memories")
    if tags is None or isinstance(tags, Mapping):
        per_memory: list[Mapping[str, str] | None] = [tags] * len(contents)
    else:
        per_memory = list(tags)
        if len(per_memory) != len(contents):
            raise ValueError(f"{len(per_memory)} tag mappings for {len(contents)} memories")
    return [
        pb.RememberRequest(
            memory=pb.Memory(id=memory_id, content=content, embedding=_values(row), tags=tag)
        )
        for memory_id, content, row, tag in zip(chosen, contents, rows, per_memory, strict=True)
    ]


RECALL_MODES = {
    "vector": pb.RECALL_MODE_VECTOR,
    "keyword": pb.RECALL_MODE_KEYWORD,
    "hybrid": pb.RECALL_MODE_HYBRID,
}
"""How a recall ranks: cosine of the cue, BM25 of the text query, or both fused by rank."""


def _values(row: Any) -> list[float]:
    return row.tolist() if isinstance(row, np.ndarray) else list(row)


def recall_request(
    cue: EmbeddingLike | None,
    k: int,
    min_score: float | None,
    tags: Mapping[str, str] | None,
    include_embeddings: bool,
    *,
    exact: bool = False,
    query: str | None = None,
    mode: str = "vector",
) -> pb.RecallRequest:
    if mode not in RECALL_MODES:
        raise ValueError(f"mode {mode!r}; allowed {', '.join(RECALL_MODES)}")
    request = pb.RecallRequest(
        cue=vector(cue, "cue").tolist() if cue is not None else [],
        k=k,
        tags=tags,
        include_embeddings=include_embeddings,
        exact=exact,
        query=query or "",
        mode=RECALL_MODES[mode],
    )
    if min_score is not None:
        request.min_score = min_score
    return request
