"""Typed views of a MemorySpace: its identity (`SpaceRef`) and its parsed spec (`SpaceSpec`).

The API server has already defaulted and validated the object (design section 2); parsing
still checks what the operator relies on, so an object written around the schema (an older
CRD, say) fails with InvalidSpecError naming the field instead of a KeyError deep inside.
"""

from __future__ import annotations

import dataclasses
import decimal
from collections.abc import Mapping
from typing import Any, Literal, cast

import kubernetes.utils

from memspace_contract import index, spaces, wire
from memspace_contract import models as embedding_models
from memspace_operator import errors, naming

ReclaimPolicy = Literal["Retain", "Delete"]


@dataclasses.dataclass(frozen=True)
class SpaceRef:
    """Which MemorySpace: enough to read, patch and post Events about it."""

    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    def event_target(self) -> dict[str, Any]:
        """A minimal body to post Events about the object (kopf builds the reference from it)."""
        return {
            "apiVersion": naming.API_VERSION,
            "kind": naming.KIND,
            "metadata": {"namespace": self.namespace, "name": self.name, "uid": self.uid},
        }


OFFLOADED = "Offloaded"
"""spec.state Offloaded: the space lives in its final backup, with no volume and no shard."""
SPEC_STATES: tuple[str, ...] = (wire.ACTIVE, wire.INACTIVE, OFFLOADED)
DEFAULT_KEEP = 7


@dataclasses.dataclass(frozen=True)
class BackupPolicy:
    """spec.backup: scheduled backups and the target of scheduled and offload backups."""

    schedule: str | None = None
    """A cron expression (UTC); None: no scheduled backups."""
    keep: int = DEFAULT_KEEP
    """Scheduled backups kept; older ones are deleted (with their manifests)."""
    target: str | None = None
    """The MemorySpaceBackupTarget; None: the default target."""


@dataclasses.dataclass(frozen=True)
class RestoreFrom:
    """spec.restoreFrom: the MemorySpaceBackup a new space's volume is filled from."""

    backup: str
    namespace: str | None = None
    """The backup's namespace when another than the space's (the target must allow it)."""


@dataclasses.dataclass(frozen=True)
class SpaceSpec:
    space_id: spaces.SpaceId
    embedding_dim: int
    size: str
    """The requested volume size, a Kubernetes quantity."""
    storage_class: str | None
    reclaim_policy: ReclaimPolicy
    tiers: index.Tiers
    quota: index.Quota
    state: index.State
    class_name: str | None = None
    """spec.className; None: the default class (if any)."""
    search: index.SearchIndex = dataclasses.field(default_factory=index.SearchIndex)
    """spec.index: exact or approximate (HNSW) search of the warm and cold tiers."""
    volume_name: str | None = None
    """spec.storage.volumeName: a pre-made PersistentVolume to bind (a static PV)."""
    backup: BackupPolicy = dataclasses.field(default_factory=BackupPolicy)
    """spec.backup: schedule, retention and target of backups."""
    restore_from: RestoreFrom | None = None
    """spec.restoreFrom: restore the new space from a backup before it serves."""
    offloaded: bool = False
    """spec.state is Offloaded (`state` then holds the state of the index entry while the final
    backup runs: Active)."""
    embedding: index.Embedding | None = None
    """spec.embedding: the model the shard embeds the space's text with (embedding_dim is then
    the model's); None: the clients send every vector."""
    unset: frozenset[str] = frozenset()
    """The fields a MemorySpaceClass may default that the spec leaves unset (DEFAULTABLE);
    they hold the built-in defaults here, which a class default replaces."""

    @property
    def size_bytes(self) -> decimal.Decimal:
        return quantity(self.size)


@dataclasses.dataclass(frozen=True)
class MemorySpace:
    ref: SpaceRef
    generation: int
    spec: SpaceSpec
    deleting: bool
    status: Mapping[str, Any]


DEFAULTABLE = (
    "hotCapacity",
    "storageSize",
    "storageClassName",
    "maxMemories",
    "maxWritesPerSecond",
    "maxRecallsPerSecond",
)
DEFAULT_HOT_CAPACITY = index.DEFAULT_HOT_CAPACITY
DEFAULT_SIZE = "10Gi"


def quantity(value: str) -> decimal.Decimal:
    """A Kubernetes quantity (`10Gi`, `500M`, `1e9`) in base units."""
    try:
        parsed: decimal.Decimal = kubernetes.utils.parse_quantity(value)  # type: ignore[no-untyped-call]
    except (ValueError, TypeError, decimal.InvalidOperation) as err:
        raise errors.InvalidSpecError(
            f"spec.storage.size {value!r} is not a quantity such as 10Gi"
        ) from err
    return parsed


def _section(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key) or {}
    if not isinstance(value, Mapping):
        raise errors.InvalidSpecError(f"spec.{key} must be an object")
    return value


def _int(doc: Mapping[str, Any], key: str, default: int | None, where: str) -> int | None:
    value = doc.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.InvalidSpecError(f"{where}.{key} must be an integer, got {value!r}")
    return value


def _choice(value: Any, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise errors.InvalidSpecError(f"{where} is {value!r}; allowed: {', '.join(allowed)}")
    return cast("str", value)


def parse_spec(name: str, spec: Mapping[str, Any]) -> SpaceSpec:
    """The spec of MemorySpace `name` (spaceId defaults to the name)."""
    try:
        space_id = spaces.parse_space_id(spec.get("spaceId") or name)
    except spaces.InvalidSpaceIdError as err:
        where = "spec.spaceId" if spec.get("spaceId") else "metadata.name (spaceId not set)"
        raise errors.InvalidSpecError(f"{where}: {err}") from err
    embedding = _embedding(spec)
    dim = _dimension(spec, embedding)
    storage = _section(spec, "storage")
    size = str(storage.get("size") or DEFAULT_SIZE)
    if quantity(size) <= 0:
        raise errors.InvalidSpecError(f"spec.storage.size {size!r} must be above zero")
    storage_class = storage.get("storageClassName") or None
    volume_name = storage.get("volumeName") or None
    if volume_name is not None and not isinstance(volume_name, str):
        raise errors.InvalidSpecError(f"spec.storage.volumeName must be a string: {volume_name!r}")
    reclaim = _choice(storage.get("reclaimPolicy", "Retain"), ("Retain", "Delete"), "reclaimPolicy")
    tiers_doc = _section(spec, "tiers")
    hot = _int(tiers_doc, "hotCapacity", DEFAULT_HOT_CAPACITY, "spec.tiers")
    warm = _int(tiers_doc, "warmCapacity", index.DEFAULT_WARM_CAPACITY, "spec.tiers")
    assert hot is not None
    assert warm is not None
    if hot < 1 or warm < 1:
        raise errors.InvalidSpecError("spec.tiers.hotCapacity and warmCapacity must be at least 1")
    compression = _choice(
        tiers_doc.get("coldCompression", index.DEFAULT_COMPRESSION),
        index.COMPRESSIONS,
        "spec.tiers.coldCompression",
    )
    quota_doc = _section(spec, "quota")
    max_memories = _int(quota_doc, "maxMemories", None, "spec.quota")
    rate = _rate(quota_doc, "maxWritesPerSecond")
    recalls = _rate(quota_doc, "maxRecallsPerSecond")
    if max_memories is not None and max_memories < 1:
        raise errors.InvalidSpecError("spec.quota values must be above zero when set")
    state = _choice(spec.get("state", index.DEFAULT_STATE), SPEC_STATES, "spec.state")
    offloaded = state == OFFLOADED
    if offloaded:
        state = index.DEFAULT_STATE  # the entry's state until the final backup completed
    backup = _backup_policy(_section(spec, "backup"))
    restore_from = _restore_from(_section(spec, "restoreFrom"))
    try:
        search = index.parse_search({"index": spec.get("index") or {}})
    except index.InvalidIndexEntryError as err:
        raise errors.InvalidSpecError(f"spec.{err}") from err
    class_name = spec.get("className") or None
    if class_name is not None and not isinstance(class_name, str):
        raise errors.InvalidSpecError(f"spec.className must be a string, got {class_name!r}")
    given = {
        "hotCapacity": "hotCapacity" in tiers_doc,
        "storageSize": bool(storage.get("size")),
        "storageClassName": bool(storage_class),
        "maxMemories": max_memories is not None,
        "maxWritesPerSecond": rate is not None,
        "maxRecallsPerSecond": recalls is not None,
    }
    return SpaceSpec(
        space_id=space_id,
        embedding_dim=dim,
        size=size,
        storage_class=str(storage_class) if storage_class else None,
        volume_name=volume_name,
        reclaim_policy=cast("ReclaimPolicy", reclaim),
        tiers=index.Tiers(
            hot_capacity=hot,
            warm_capacity=warm,
            cold_compression=cast("index.Compression", compression),
        ),
        quota=index.Quota(
            max_memories=max_memories,
            max_writes_per_second=rate,
            max_recalls_per_second=recalls,
        ),
        state=cast("index.State", state),
        class_name=class_name,
        search=search,
        embedding=embedding,
        unset=frozenset(name for name, present in given.items() if not present),
        backup=backup,
        restore_from=restore_from,
        offloaded=offloaded,
    )


def _backup_policy(doc: Mapping[str, Any]) -> BackupPolicy:
    schedule = doc.get("schedule") or None
    if schedule is not None and not isinstance(schedule, str):
        raise errors.InvalidSpecError(f"spec.backup.schedule must be a string: {schedule!r}")
    keep = _int(doc, "keep", DEFAULT_KEEP, "spec.backup")
    assert keep is not None
    if keep < 1:
        raise errors.InvalidSpecError("spec.backup.keep must be at least 1")
    target = doc.get("target") or None
    if target is not None and not isinstance(target, str):
        raise errors.InvalidSpecError(f"spec.backup.target must be a string: {target!r}")
    return BackupPolicy(schedule=schedule, keep=keep, target=target)


def _restore_from(doc: Mapping[str, Any]) -> RestoreFrom | None:
    if not doc:
        return None
    backup = doc.get("backup")
    if not isinstance(backup, str) or not backup:
        raise errors.InvalidSpecError("spec.restoreFrom.backup must name a MemorySpaceBackup")
    namespace = doc.get("namespace") or None
    if namespace is not None and not isinstance(namespace, str):
        raise errors.InvalidSpecError(f"spec.restoreFrom.namespace must be a string: {namespace!r}")
    return RestoreFrom(backup=backup, namespace=namespace)


def _dimension(spec: Mapping[str, Any], embedding: index.Embedding | None) -> int:
    """spec.embeddingDim: the model's dimension with a model (another is refused), else the
    given one or the default."""
    default_dim = (
        embedding_models.MODELS[embedding.model].dim
        if embedding is not None
        else index.DEFAULT_EMBEDDING_DIM
    )
    dim = _int(spec, "embeddingDim", default_dim, "spec")
    assert dim is not None
    if embedding is not None and dim != default_dim:
        raise errors.InvalidSpecError(
            f"spec.embeddingDim is {dim} but spec.embedding.model {embedding.model!r} makes "
            f"{default_dim}-dimensional vectors: leave spec.embeddingDim unset (or {default_dim})"
        )
    if not 1 <= dim <= index.MAX_EMBEDDING_DIM:
        raise errors.InvalidSpecError(
            f"spec.embeddingDim is {dim}; allowed 1..{index.MAX_EMBEDDING_DIM}"
        )
    return dim


def _embedding(spec: Mapping[str, Any]) -> index.Embedding | None:
    """spec.embedding: a model of the table, or none."""
    section = _section(spec, "embedding")
    name = section.get("model")
    if not name:
        return None
    if not isinstance(name, str) or name not in embedding_models.MODELS:
        known = ", ".join(embedding_models.MODELS)
        raise errors.InvalidSpecError(
            f"spec.embedding.model {name!r} is not a model memspace knows; known: {known}"
        )
    return index.Embedding(model=name)


def _rate(quota_doc: Mapping[str, Any], key: str) -> float | None:
    rate = quota_doc.get(key)
    if rate is None:
        return None
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise errors.InvalidSpecError(f"spec.quota.{key} must be a number: {rate!r}")
    if rate <= 0:
        raise errors.InvalidSpecError("spec.quota values must be above zero when set")
    return rate


def parse(body: Mapping[str, Any]) -> MemorySpace:
    """A MemorySpace body as kopf or the API hands it over."""
    metadata = body.get("metadata") or {}
    ref = SpaceRef(
        namespace=str(metadata.get("namespace", "")),
        name=str(metadata.get("name", "")),
        uid=str(metadata.get("uid", "")),
    )
    return MemorySpace(
        ref=ref,
        generation=int(metadata.get("generation") or 0),
        spec=parse_spec(ref.name, body.get("spec") or {}),
        deleting=bool(metadata.get("deletionTimestamp")),
        status=body.get("status") or {},
    )


def fallback_space_id(body: Mapping[str, Any]) -> spaces.SpaceId | None:
    """The space ID of a body whose spec does not parse (to clean up after it), if any."""
    metadata = body.get("metadata") or {}
    candidate = (body.get("spec") or {}).get("spaceId") or metadata.get("name", "")
    return spaces.parse_space_id(candidate) if spaces.is_valid_space_id(candidate) else None


def index_entry(spec: SpaceSpec, token_sha256: str | None, generation: int) -> index.IndexEntry:
    """What the shard's index says about this space (at the MemorySpace's `generation`)."""
    return index.IndexEntry(
        generation=generation,
        space_id=spec.space_id,
        embedding_dim=spec.embedding_dim,
        token_sha256=token_sha256,
        tiers=spec.tiers,
        quota=spec.quota,
        state=spec.state,
        search=spec.search,
        embedding=spec.embedding,
    )
