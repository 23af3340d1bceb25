"""Memories as the storage engine sees them, and the validation every write goes through."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import NewType

import numpy as np
import numpy.typing as npt

from memspace_contract import wire
from memspace_server import errors

MemoryId = NewType("MemoryId", str)
Lsn = wire.Lsn
Vector = npt.NDArray[np.float32]

MAX_CONTENT_BYTES = 64 * 1024
MAX_TAGS = 32
MAX_TAG_KEY = 64
MAX_TAG_VALUE = 256
MAX_ID_LENGTH = 128
MAX_K = 1000
MAX_QUERY_BYTES = 4096
"""A recall's text query, in UTF-8 bytes."""

VECTOR = "vector"
KEYWORD = "keyword"
HYBRID = "hybrid"
MODES = (VECTOR, KEYWORD, HYBRID)
"""How a recall ranks: by cosine of the cue, by BM25 of the query, or both fused (RRF)."""


NO_EMBEDDING: Vector = np.zeros(0, np.float32)
"""The embedding of a memory read without it (read-only, shared)."""
NO_EMBEDDING.flags.writeable = False


@dataclasses.dataclass(frozen=True)
class Memory:
    id: MemoryId
    content: str
    embedding: Vector
    confidence: float
    tags: Mapping[str, str]
    created_at: float
    """Seconds since the epoch."""
    last_recalled_at: float = 0.0
    """Seconds since the epoch; 0 when never recalled."""
    recall_count: int = 0


@dataclasses.dataclass(frozen=True)
class Draft:
    """What a client asks to remember; `id` empty means the server assigns one."""

    content: str
    embedding: Vector
    id: str = ""
    confidence: float = 1.0
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    created_at: float = 0.0
    """0 means now."""


@dataclasses.dataclass(frozen=True)
class Hit:
    memory: Memory
    score: float
    tier: wire.TierName


@dataclasses.dataclass(frozen=True)
class Query:
    cue: Vector
    k: int = 10
    min_score: float = -1.0
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    include_embeddings: bool = False
    exact: bool = False
    """Scan every tier exactly even where the space keeps an approximate index."""
    mode: str = VECTOR
    """One of `MODES`."""
    text: str = ""
    """The text query of a keyword or hybrid recall."""


def new_id() -> MemoryId:
    """128 random bits, hex: unguessable, so an ID says nothing about other memories."""
    return MemoryId(os.urandom(16).hex())


def check_vector(values: object, dim: int, what: str) -> Vector:
    """A float32 vector of exactly `dim` finite values, not all zero, whose norm is finite."""
    try:
        vector = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise errors.InvalidMemoryError(f"{what} must be a list of numbers") from err
    if vector.ndim != 1 or vector.shape[0] != dim:
        got = vector.shape[0] if vector.ndim == 1 else vector.shape
        raise errors.InvalidMemoryError(
            f"{what} has {got} values; this space's embeddings have exactly {dim}"
        )
    square = float(np.dot(vector, vector))
    if square == 0.0 or not math.isfinite(square):
        # The slow path only finds out which rule was broken.
        if not np.isfinite(vector).all():
            raise errors.InvalidMemoryError(f"{what} contains NaN or infinity; only finite values")
        if not vector.any():
            raise errors.InvalidMemoryError(
                f"{what} is a zero vector; cosine similarity needs a norm"
            )
        raise errors.InvalidMemoryError(
            f"{what} is too large or too small to normalise in float32; scale it"
        )
    return np.ascontiguousarray(vector)


def check_id(value: str) -> MemoryId:
    if len(value) > MAX_ID_LENGTH:
        raise errors.InvalidMemoryError(
            f"memory id has {len(value)} characters; at most {MAX_ID_LENGTH}"
        )
    if not value.isprintable() or value.strip() != value:
        raise errors.InvalidMemoryError(
            "memory id must be printable, without control characters or surrounding spaces"
        )
    return MemoryId(value)


def check_tags(tags: Mapping[str, str], what: str = "tags") -> dict[str, str]:
    if len(tags) > MAX_TAGS:
        raise errors.InvalidMemoryError(f"{len(tags)} {what}; at most {MAX_TAGS}")
    for key, value in tags.items():
        if not key or len(key) > MAX_TAG_KEY:
            raise errors.InvalidMemoryError(
                f"tag key {key[:80]!r} has {len(key)} characters; allowed 1..{MAX_TAG_KEY}"
            )
        if len(value) > MAX_TAG_VALUE:
            raise errors.InvalidMemoryError(
                f"tag {key!r} has a value of {len(value)} characters; at most {MAX_TAG_VALUE}"
            )
    return dict(tags)


def validate_draft(draft: Draft, dim: int, now: float) -> Memory:
    """Check a draft against the rules of a space; return the memory to store."""
    content_bytes = len(draft.content.encode("utf-8", "surrogatepass"))
    if content_bytes > MAX_CONTENT_BYTES:
        raise errors.InvalidMemoryError(
            f"content is {content_bytes} bytes; at most {MAX_CONTENT_BYTES} (64 KiB)"
        )
    try:
        draft.content.encode("utf-8")
    except UnicodeEncodeError as err:
        raise errors.InvalidMemoryError("content must be valid UTF-8 text") from err
    confidence = float(draft.confidence)
    if not (math.isfinite(confidence) and 0.0 <= confidence <= 1.0):
        raise errors.InvalidMemoryError(f"confidence is {confidence}; allowed 0..1")
    created = float(draft.created_at) or now
    if not math.isfinite(created) or created < 0:
        raise errors.InvalidMemoryError(f"created_at {created} is not a valid time")
    return Memory(
        id=check_id(draft.id) if draft.id else new_id(),
        content=draft.content,
        embedding=check_vector(draft.embedding, dim, "embedding"),
        confidence=confidence,
        tags=check_tags(draft.tags),
        created_at=created,
    )


def validate_query(query: Query, dim: int) -> Query:
    if not 1 <= query.k <= MAX_K:
        raise errors.InvalidMemoryError(f"k is {query.k}; allowed 1..{MAX_K}")
    if not math.isfinite(query.min_score):
        raise errors.InvalidMemoryError("min_score must be a finite number")
    if query.mode not in MODES:
        raise errors.InvalidMemoryError(f"mode {query.mode!r}; allowed {', '.join(MODES)}")
    size = len(query.text.encode("utf-8", "surrogatepass"))
    if size > MAX_QUERY_BYTES:
        raise errors.InvalidMemoryError(f"query is {size} bytes; at most {MAX_QUERY_BYTES} (4 KiB)")
    if query.mode != VECTOR and not query.text.strip():
        raise errors.InvalidMemoryError(f"{query.mode} recall needs a text query; it is empty")
    if query.mode == KEYWORD:
        cue = np.zeros(0, np.float32)  # not used: a keyword recall ranks by the query alone
    elif query.mode == HYBRID and len(query.cue) == 0:
        raise errors.InvalidMemoryError(
            "hybrid recall needs a cue (this space embeds no text) as well as a query; "
            "send both, or use mode keyword"
        )
    else:
        cue = check_vector(query.cue, dim, "cue")
    return dataclasses.replace(query, cue=cue, tags=check_tags(query.tags, "tag filters"))
