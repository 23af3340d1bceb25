"""Protobuf <-> domain conversion, in one place: the servicers call these and the storage engine
never sees a generated message. Checks that need the protobuf form (field presence, ranges of
proto-only fields) live here; everything the engine validates is left to it."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from google.protobuf import timestamp_pb2

from memspace_contract import index, spaces
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_server import errors
from memspace_server.storage import ann, backing_up, feeds, memories, objects
from memspace_server.storage.spaces import Health

MAX_CAPACITY = 2**40

_EVENT_TYPES = {
    feeds.EventType.REMEMBERED: pb.EVENT_TYPE_REMEMBERED,
    feeds.EventType.FORGOTTEN: pb.EVENT_TYPE_FORGOTTEN,
}


# -- time and vectors ---------------------------------------------------------------------------


def set_time(stamp: timestamp_pb2.Timestamp, seconds: float) -> None:
    """Set a Timestamp in place (cheaper than building one and copying it in)."""
    nanos = round(seconds * 1e9)
    stamp.seconds, stamp.nanos = divmod(nanos, 1_000_000_000)


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    set_time(stamp, seconds)
    return stamp


def seconds(stamp: timestamp_pb2.Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def vector(values: Iterable[float]) -> memories.Vector:
    """A float32 array of the repeated field (its length and values are checked by the engine).
    np.array reads protobuf's repeated container as a sequence, 20x faster than np.fromiter."""
    return np.array(values, dtype=np.float32)


# -- memories -------------------------------------------------------------------------------------


def draft(message: pb.RememberRequest) -> memories.Draft:
    if not message.HasField("memory"):
        raise errors.InvalidMemoryError("the request has no memory: set its memory field")
    memory = message.memory
    created = 0.0
    if memory.HasField("created_at"):
        created = seconds(memory.created_at)
        if created <= 0:
            raise errors.InvalidMemoryError(
                "created_at must be after 1970-01-01; leave it unset for now"
            )
    return memories.Draft(
        content=memory.content,
        embedding=vector(memory.embedding),
        id=memory.id,
        confidence=memory.confidence if memory.HasField("confidence") else 1.0,
        tags=dict(memory.tags),
        created_at=created,
    )


def fill_memory(message: pb.Memory, found: memories.Memory) -> None:
    """Write `found` into `message` in place (responses are built without nested copies)."""
    message.id = found.id
    message.content = found.content
    message.confidence = found.confidence
    if found.tags:
        message.tags.update(found.tags)
    set_time(message.created_at, found.created_at)
    message.recall_count = found.recall_count
    if found.embedding.size:
        message.embedding.extend(found.embedding.tolist())
    if found.last_recalled_at:
        set_time(message.last_recalled_at, found.last_recalled_at)


def memory(found: memories.Memory) -> pb.Memory:
    message = pb.Memory()
    fill_memory(message, found)
    return message


_MODES = {
    pb.RECALL_MODE_UNSPECIFIED: memories.VECTOR,
    pb.RECALL_MODE_VECTOR: memories.VECTOR,
    pb.RECALL_MODE_KEYWORD: memories.KEYWORD,
    pb.RECALL_MODE_HYBRID: memories.HYBRID,
}


def query(message: pb.RecallRequest) -> memories.Query:
    mode = _MODES.get(message.mode)
    if mode is None:
        raise errors.InvalidMemoryError(
            f"mode {message.mode} is not known; allowed VECTOR, KEYWORD, HYBRID"
        )
    return memories.Query(
        cue=vector(message.cue),
        k=message.k,
        min_score=message.min_score if message.HasField("min_score") else -1.0,
        tags=dict(message.tags),
        include_embeddings=message.include_embeddings,
        exact=message.exact,
        mode=mode,
        text=message.query,
    )


def recall_response(hits: Iterable[memories.Hit], mode: str = memories.VECTOR) -> pb.RecallResponse:
    """The answer of a recall; scores as the mode defines them (cosine, BM25 or RRF). Built in
    place, field by field (upb's keyword constructors cost several times more), with
    `fill_memory`'s steps inline: it runs once per hit of every Recall."""
    response = pb.RecallResponse()
    add = response.hits.add
    cosine = mode == memories.VECTOR
    for found in hits:
        # float32 rounding makes a stored vector's own cosine 1.00000012: clamp to [-1, 1].
        score = found.score
        hit = add(score=min(1.0, max(-1.0, score)) if cosine else score, tier=found.tier)
        memory = found.memory
        message = hit.memory
        message.id = memory.id
        message.content = memory.content
        message.confidence = memory.confidence
        if memory.tags:
            message.tags.update(memory.tags)
        stamp = message.created_at
        stamp.seconds, stamp.nanos = divmod(round(memory.created_at * 1e9), 1_000_000_000)
        message.recall_count = memory.recall_count
        if memory.embedding.size:
            message.embedding.extend(memory.embedding.tolist())
        if memory.last_recalled_at:
            stamp = message.last_recalled_at
            stamp.seconds, stamp.nanos = divmod(round(memory.last_recalled_at * 1e9), 1_000_000_000)
    return response


HIT_OVERHEAD_BYTES = 64
"""Bytes of a RecallHit besides its content, embedding and tags (ids, numbers, framing)."""

MAX_HIT_BYTES = (
    HIT_OVERHEAD_BYTES
    + memories.MAX_ID_LENGTH
    + memories.MAX_CONTENT_BYTES
    + memories.MAX_TAGS * (memories.MAX_TAG_KEY + memories.MAX_TAG_VALUE + 8)
)
"""What `recall_size` counts at most for a hit without its embedding (the engine refuses larger
memories when they are written)."""


def recall_size_at_most(count: int, dim: int) -> int:
    """What `recall_size` can count at most for `count` hits with embeddings of `dim` values (0:
    without embeddings): an answer surely under a limit needs no count of its own."""
    return count * (MAX_HIT_BYTES + 4 * dim)


def recall_size(hits: Iterable[memories.Hit]) -> int:
    """About the bytes a Recall answer takes on the wire (an upper bound for ASCII text, within
    a few bytes a hit otherwise), computed before the answer is built."""
    size = 0
    for hit in hits:
        found = hit.memory
        size += HIT_OVERHEAD_BYTES + len(found.id) + len(found.content.encode())
        size += 4 * len(found.embedding)
        size += sum(len(k) + len(v) + 8 for k, v in found.tags.items())
    return size


def event(space: str, found: feeds.Event) -> pb.MemoryEvent:
    message = pb.MemoryEvent(space=space, type=_EVENT_TYPES[found.type], id=found.id, lsn=found.lsn)
    set_time(message.at, found.at)
    return message


# -- spaces ---------------------------------------------------------------------------------------


def embedding_dim(message: pb.CreateSpaceRequest) -> int:
    return message.embedding_dim or index.DEFAULT_EMBEDDING_DIM


def token_sha256(message: pb.CreateSpaceRequest) -> str | None:
    digest = message.token_sha256
    if not digest:
        return None
    if not index.is_token_sha256(digest):
        raise errors.InvalidArgumentError(
            "token_sha256 must be the hex SHA-256 of the space's token: 64 lower-case hex "
            "digits (or empty for a space without a token of its own)"
        )
    return digest


def _capacity(value: int, name: str, default: int) -> int:
    if value > MAX_CAPACITY:
        raise errors.InvalidArgumentError(f"tiers.{name} is {value}; at most {MAX_CAPACITY}")
    return value or default


def tiers(message: pb.CreateSpaceRequest) -> index.Tiers:
    defaults = index.Tiers()
    given = message.tiers
    compression = given.cold_compression or defaults.cold_compression
    if compression not in index.COMPRESSIONS:
        raise errors.InvalidArgumentError(
            f"tiers.cold_compression is {compression!r}; allowed: {', '.join(index.COMPRESSIONS)}"
        )
    return index.Tiers(
        hot_capacity=_capacity(given.hot_capacity, "hot_capacity", defaults.hot_capacity),
        warm_capacity=_capacity(given.warm_capacity, "warm_capacity", defaults.warm_capacity),
        cold_compression=compression,
    )


def quota(message: pb.CreateSpaceRequest) -> index.Quota:
    given = message.quota
    rate = given.max_writes_per_second
    if not math.isfinite(rate) or rate < 0:
        raise errors.InvalidArgumentError(
            f"quota.max_writes_per_second is {rate}; allowed: above 0, or 0 for unlimited"
        )
    return index.Quota(
        max_memories=given.max_memories or None,
        max_writes_per_second=rate or None,
    )


def search_index(message: pb.CreateSpaceRequest) -> index.SearchIndex:
    given = message.index
    doc = {
        "type": given.type or index.DEFAULT_INDEX_TYPE,
        "autoThreshold": given.auto_threshold or index.DEFAULT_AUTO_THRESHOLD,
        "m": given.m or index.DEFAULT_HNSW_M,
        "efConstruction": given.ef_construction or index.DEFAULT_EF_CONSTRUCTION,
        "efSearch": given.ef_search or index.DEFAULT_EF_SEARCH,
    }
    try:
        return index.parse_search({"index": doc})
    except index.InvalidIndexEntryError as err:
        raise errors.InvalidArgumentError(str(err)) from err


def space(entry: index.IndexEntry, created: bool = False) -> pb.Space:
    return pb.Space(
        space=entry.space_id,
        embedding_dim=entry.embedding_dim,
        state=entry.state,
        tiers=pb.SpaceTiers(
            hot_capacity=entry.tiers.hot_capacity,
            warm_capacity=entry.tiers.warm_capacity,
            cold_compression=entry.tiers.cold_compression,
        ),
        quota=pb.SpaceQuota(
            max_memories=entry.quota.max_memories or 0,
            max_writes_per_second=entry.quota.max_writes_per_second or 0.0,
        ),
        created=created,
        index=pb.SpaceIndex(
            type=entry.search.type,
            auto_threshold=entry.search.auto_threshold,
            m=entry.search.m,
            ef_construction=entry.search.ef_construction,
            ef_search=entry.search.ef_search,
        ),
        embedding_model=entry.embedding.model if entry.embedding is not None else "",
    )


def space_health(found: Health) -> pb.SpaceHealth:
    return pb.SpaceHealth(
        space=found.space,
        state=found.state,
        memories=found.memories,
        pressure=found.pressure,
        wal_lag_ms=found.wal_lag_ms,
        consolidation_rate=found.consolidation_rate,
        tier_memories=dict(found.tier_memories.items()),
        disk_bytes=found.disk_bytes,
        index_generation=found.index_generation,
        unknown=found.unknown,
        index=search_index_status(found.index) if found.index is not None else None,
    )


def search_index_status(status: ann.Status) -> pb.SearchIndexStatus:
    message = pb.SearchIndexStatus(
        type=status.type,
        configured_type=status.configured,
        rows_indexed=status.rows,
        build_state=status.state,
        recall_samples=status.samples,
    )
    if status.recall is not None:
        message.recall = status.recall
    return message


# -- backups -----------------------------------------------------------------------------------


def backup_target(target: pb.BackupTarget, store_timeout_s: float) -> objects.TargetConfig:
    """The object-store target an admin call names (its credentials travel in the call)."""
    if not target.url:
        raise errors.InvalidArgumentError(
            "the backup target needs a url: s3://BUCKET[/PREFIX] (with endpoint and "
            "credentials for S3-compatible stores), or a directory on the server"
        )
    if "://" not in target.url and not target.url.startswith("/"):
        raise errors.InvalidArgumentError(
            f"backup target {target.url[:200]!r}: a directory on the server must be an absolute "
            "path (or use s3://BUCKET[/PREFIX])"
        )
    if bool(target.access_key_id) != bool(target.secret_access_key):
        raise errors.InvalidArgumentError(
            "give both access_key_id and secret_access_key of the backup target, or neither"
        )
    return objects.TargetConfig(
        url=target.url,
        endpoint=target.endpoint or None,
        region=target.region or "us-east-1",
        access_key_id=target.access_key_id or None,
        secret_access_key=target.secret_access_key or None,
        retry_timeout_s=store_timeout_s,
        connect_timeout_s=min(5.0, store_timeout_s),
    )


def source_space(name: str) -> spaces.SpaceId | None:
    if not name:
        return None
    try:
        return spaces.parse_space_id(name)
    except spaces.InvalidSpaceIdError as err:
        raise errors.InvalidSpaceIdError(f"source_space: {err}") from err


def backup_response(taken: backing_up.Taken) -> pb.BackupSpaceResponse:
    response = pb.BackupSpaceResponse(
        backup_id=taken.manifest.backup_id,
        lsn=taken.manifest.lsn,
        memories=taken.manifest.memories,
        bytes=taken.manifest.bytes,
        bytes_uploaded=taken.bytes_uploaded,
    )
    set_time(response.started, taken.started.timestamp())
    set_time(response.completed, taken.completed.timestamp())
    return response
