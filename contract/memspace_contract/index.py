"""The spaces index: one JSON document per space, written by the operator (or by a standalone
server for itself) and read by the server. The format is a contract between the two sides.

    {"spaceId": "team-a", "tokenSha256": "<hex>", "embeddingDim": 768,
     "tiers": {"hotCapacity": 100000, "warmCapacity": 1000000, "coldCompression": "zstd"},
     "quota": {"maxMemories": null, "maxWritesPerSecond": null, "maxRecallsPerSecond": null},
     "state": "Active", "generation": 3,
     "index": {"type": "auto", "autoThreshold": 200000, "m": 32, "efConstruction": 100,
               "efSearch": 96}}

`generation` (an addition; absent: 0) is the MemorySpace's metadata.generation the entry was
written for. The operator hands a changed entry to its shard directly as well (SpaceService's
ApplyIndexEntry); the shard keeps, per space, the entry of the higher generation of the two ways
in, and reports the generation it applied in Health, which the operator's Ready waits for.

`index` (an addition; absent: every default) is how the space searches its warm and cold tiers:
`exact` scans, `hnsw` keeps an approximate HNSW graph, `auto` (the default) is exact until the
warm and cold tiers together hold `autoThreshold` rows and HNSW from there.

`state` (docs/backup.md, "On the server"):
- `Active`: served. `Inactive`: kept on its volume, not served (FAILED_PRECONDITION).
- `Offloaded` (an addition): the space lives in a backup, taken by a final BackupSpace. The
  server unloads it (no memory, no open files; its volume may be unmounted and deleted) and
  refuses its calls with FAILED_PRECONDITION "space X is Offloaded". Back to `Active` (or
  `Restoring`) on a new, empty volume, a RestoreSpace brings its data back.
- `Restoring` (an addition): the space's volume is being filled from a backup by RestoreSpace;
  its calls get UNAVAILABLE (retry). Writing the entry as `Restoring` before the RestoreSpace
  and `Active` after it keeps a tenant from writing into the empty space meanwhile; a
  RestoreSpace into an `Active` space works as well (the space is then refused UNAVAILABLE for
  the length of the call, and served as soon as it returns).

`embedding` (an addition; absent or null: none) names the model the server embeds the space's
text with, `{"model": "wordllama-l2-256"}` (`memspace_contract.models`); `embeddingDim` is then
that model's dimension. Without it the client sends every vector, as before the addition.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

from memspace_contract import durable, models, spaces, wire

SUFFIX = ".json"
MAX_EMBEDDING_DIM = 4096

Compression = Literal["zstd", "lz4", "none"]
COMPRESSIONS: Final[tuple[Compression, ...]] = ("zstd", "lz4", "none")
State = Literal["Active", "Inactive", "Offloaded", "Restoring"]
"""A space's state in the index (and in MemorySpace spec.state, which offers a subset)."""
STATES: Final[tuple[State, ...]] = (wire.ACTIVE, wire.INACTIVE, wire.OFFLOADED, wire.RESTORING)

# The defaults of an entry, of a MemorySpace spec and of CreateSpace alike (design section 2).
DEFAULT_EMBEDDING_DIM: Final = 768
DEFAULT_HOT_CAPACITY: Final = 100_000
DEFAULT_WARM_CAPACITY: Final = 1_000_000
DEFAULT_COMPRESSION: Final[Compression] = "zstd"
DEFAULT_STATE: Final[State] = wire.ACTIVE
IndexType = Literal["exact", "hnsw", "auto"]
INDEX_TYPES: Final[tuple[IndexType, ...]] = ("exact", "hnsw", "auto")
DEFAULT_INDEX_TYPE: Final[IndexType] = "auto"
DEFAULT_AUTO_THRESHOLD: Final = 200_000
DEFAULT_HNSW_M: Final = 32
DEFAULT_EF_CONSTRUCTION: Final = 100
DEFAULT_EF_SEARCH: Final = 96


class InvalidIndexEntryError(ValueError):
    """An index document that does not follow the format; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Tiers:
    hot_capacity: int = DEFAULT_HOT_CAPACITY
    """Memories kept in RAM before the least recently recalled move to warm."""
    warm_capacity: int = DEFAULT_WARM_CAPACITY
    """Memories kept in the uncompressed, memory-mapped warm tier before moving to cold."""
    cold_compression: Compression = DEFAULT_COMPRESSION
    """Lossless codec of the cold tier."""


@dataclasses.dataclass(frozen=True)
class Quota:
    max_memories: int | None = None
    """Most memories the space may hold; None: bounded only by its volume."""
    max_writes_per_second: float | None = None
    """Sustained Remember/Forget rate (token bucket, burst of one second); None: unlimited."""
    max_recalls_per_second: float | None = None
    """Sustained Recall rate (token bucket, burst of one second); None: unlimited. Entries
    written before this field existed have no `maxRecallsPerSecond` key and parse as None."""


@dataclasses.dataclass(frozen=True)
class SearchIndex:
    """How a space searches its warm and cold tiers (the hot tier is always scanned exactly).
    The defaults reach recall@10 >= 0.95 on the ANN bench (benchmarks/ann_bench.py)."""

    type: IndexType = DEFAULT_INDEX_TYPE
    """exact: always scan; hnsw: an HNSW graph per tier; auto: exact below auto_threshold."""
    auto_threshold: int = DEFAULT_AUTO_THRESHOLD
    """Warm plus cold rows from which `auto` searches approximately."""
    m: int = DEFAULT_HNSW_M
    """Neighbours per node of the graph: more is better recall, more memory, slower builds."""
    ef_construction: int = DEFAULT_EF_CONSTRUCTION
    """Candidates kept while inserting a row: more is a better graph, slower builds."""
    ef_search: int = DEFAULT_EF_SEARCH
    """Candidates kept while searching (at least k): more is better recall, slower queries."""

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "autoThreshold": self.auto_threshold,
            "m": self.m,
            "efConstruction": self.ef_construction,
            "efSearch": self.ef_search,
        }


@dataclasses.dataclass(frozen=True)
class Embedding:
    """spec.embedding: the server embeds the space's text with this model."""

    model: str
    """A name of `memspace_contract.models.MODELS`."""

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model}


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    space_id: spaces.SpaceId
    embedding_dim: int
    token_sha256: str | None = None
    tiers: Tiers = Tiers()
    quota: Quota = Quota()
    state: State = DEFAULT_STATE
    generation: int = 0
    """The MemorySpace generation this entry was written for (0: not known)."""
    search: SearchIndex = SearchIndex()
    """spec.index: exact or approximate search of the warm and cold tiers."""
    embedding: Embedding | None = None
    """spec.embedding: the model the server embeds text with; None: the client sends vectors."""

    def to_json(self) -> dict[str, Any]:
        doc = self._core_json()
        if self.embedding is not None:
            doc["embedding"] = self.embedding.to_json()
        return doc

    def _core_json(self) -> dict[str, Any]:
        return {
            "spaceId": self.space_id,
            "tokenSha256": self.token_sha256,
            "embeddingDim": self.embedding_dim,
            "tiers": {
                "hotCapacity": self.tiers.hot_capacity,
                "warmCapacity": self.tiers.warm_capacity,
                "coldCompression": self.tiers.cold_compression,
            },
            "quota": {
                "maxMemories": self.quota.max_memories,
                "maxWritesPerSecond": self.quota.max_writes_per_second,
                "maxRecallsPerSecond": self.quota.max_recalls_per_second,
            },
            "state": self.state,
            "generation": self.generation,
            "index": self.search.to_json(),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


def token_sha256(token: str) -> str:
    """The hex SHA-256 of a token: the only form in which a token leaves its Secret."""
    return hashlib.sha256(token.encode()).hexdigest()


def is_token_sha256(value: object) -> bool:
    """`value` has the form of token_sha256's result: 64 lower-case hex digits."""
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def token_opens(digest: str, trusted_sha256: str | None) -> bool:
    """Whether a presented token (as its `token_sha256` digest) is the trusted one, compared in
    constant time; a space without a trusted hash is opened by no token of its own."""
    return trusted_sha256 is not None and hmac.compare_digest(digest, trusted_sha256)


def _int(doc: Mapping[str, Any], key: str, default: int, low: int, high: int | None) -> int:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidIndexEntryError(f"{key} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f"{low}..{high}" if high is not None else f"at least {low}"
        raise InvalidIndexEntryError(f"{key} is {value}; allowed: {allowed}")
    return value


def _section(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key) or {}
    if not isinstance(value, Mapping):
        raise InvalidIndexEntryError(f"{key} must be an object, got {value!r}")
    return value


def _rate(quota_doc: Mapping[str, Any], key: str) -> float | None:
    """A per-second rate of the quota section: a number above 0, or absent/null (unlimited)."""
    rate = quota_doc.get(key)
    if rate is None:
        return None
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise InvalidIndexEntryError(f"quota.{key} must be a number, got {rate!r}")
    if not rate > 0 or rate == float("inf"):
        raise InvalidIndexEntryError(f"quota.{key} is {rate}; allowed: a finite number above 0")
    return rate


def parse_search(doc: Mapping[str, Any]) -> SearchIndex:
    """The `index` section of an entry (absent: every default)."""
    section = _section(doc, "index")
    kind = section.get("type", DEFAULT_INDEX_TYPE)
    if kind not in INDEX_TYPES:
        raise InvalidIndexEntryError(f"index.type is {kind!r}; allowed: {', '.join(INDEX_TYPES)}")
    try:
        return SearchIndex(
            type=kind,
            auto_threshold=_int(section, "autoThreshold", DEFAULT_AUTO_THRESHOLD, 1, None),
            m=_int(section, "m", DEFAULT_HNSW_M, 4, 128),
            ef_construction=_int(section, "efConstruction", DEFAULT_EF_CONSTRUCTION, 8, 4096),
            ef_search=_int(section, "efSearch", DEFAULT_EF_SEARCH, 8, 4096),
        )
    except InvalidIndexEntryError as err:
        raise InvalidIndexEntryError(f"index.{err}") from err


def parse_embedding(doc: Mapping[str, Any], dim: int) -> Embedding | None:
    """The `embedding` section of an entry (absent or null: none), checked against the entry's
    dimension."""
    if doc.get("embedding") is None:
        return None
    section = _section(doc, "embedding")
    name = section.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidIndexEntryError(f"embedding.model must be a model name, got {name!r}")
    model = models.MODELS.get(name)
    if model is None:
        known = ", ".join(models.MODELS)
        raise InvalidIndexEntryError(f"embedding.model {name[:80]!r} is unknown; known: {known}")
    if model.dim != dim:
        raise InvalidIndexEntryError(
            f"embeddingDim is {dim} but embedding model {name!r} makes {model.dim}-dimensional "
            "vectors"
        )
    return Embedding(model=name)


def parse_entry(doc: Any) -> IndexEntry:
    """Parse one index document, raising InvalidIndexEntryError naming the bad field."""
    if not isinstance(doc, Mapping):
        raise InvalidIndexEntryError("an index entry must be a JSON object")
    try:
        space_id = spaces.parse_space_id(doc.get("spaceId", ""))
    except spaces.InvalidSpaceIdError as err:
        raise InvalidIndexEntryError(f"spaceId: {err}") from err
    dim = _int(doc, "embeddingDim", DEFAULT_EMBEDDING_DIM, 1, MAX_EMBEDDING_DIM)
    token = doc.get("tokenSha256")
    if token is not None and not is_token_sha256(token):
        raise InvalidIndexEntryError("tokenSha256 must be 64 lower-case hex digits or null")
    tiers_doc = _section(doc, "tiers")
    compression = tiers_doc.get("coldCompression", DEFAULT_COMPRESSION)
    if compression not in COMPRESSIONS:
        raise InvalidIndexEntryError(
            f"tiers.coldCompression is {compression!r}; allowed: {', '.join(COMPRESSIONS)}"
        )
    tiers = Tiers(
        hot_capacity=_int(tiers_doc, "hotCapacity", DEFAULT_HOT_CAPACITY, 1, None),
        warm_capacity=_int(tiers_doc, "warmCapacity", DEFAULT_WARM_CAPACITY, 1, None),
        cold_compression=compression,
    )
    quota_doc = _section(doc, "quota")
    max_memories = quota_doc.get("maxMemories")
    if max_memories is not None:
        max_memories = _int(quota_doc, "maxMemories", 0, 1, None)
    write_rate = _rate(quota_doc, "maxWritesPerSecond")
    recall_rate = _rate(quota_doc, "maxRecallsPerSecond")
    state = doc.get("state", DEFAULT_STATE)
    if state not in STATES:
        raise InvalidIndexEntryError(f"state is {state!r}; allowed: {', '.join(STATES)}")
    return IndexEntry(
        space_id=space_id,
        embedding_dim=dim,
        token_sha256=token,
        tiers=tiers,
        quota=Quota(
            max_memories=max_memories,
            max_writes_per_second=write_rate,
            max_recalls_per_second=recall_rate,
        ),
        state=state,
        generation=_int(doc, "generation", 0, 0, None),
        search=parse_search(doc),
        embedding=parse_embedding(doc, dim),
    )


def loads(text: str | bytes) -> IndexEntry:
    try:
        doc = json.loads(text)
    except ValueError as err:
        raise InvalidIndexEntryError(f"not valid JSON: {err}") from err
    return parse_entry(doc)


def entry_filename(space_id: spaces.SpaceId) -> str:
    return f"{space_id}{SUFFIX}"


def read_directory(directory: Path) -> tuple[dict[spaces.SpaceId, IndexEntry], dict[str, str]]:
    """Read every `<spaceId>.json` in `directory`. Returns the valid entries and, per bad file,
    why it was skipped (a file whose name and spaceId disagree is bad: it could shadow a space)."""
    entries: dict[spaces.SpaceId, IndexEntry] = {}
    problems: dict[str, str] = {}
    if not directory.is_dir():
        return entries, problems
    for path in sorted(directory.iterdir()):
        # Kubernetes projects Secret keys through symlinks and `..data` directories.
        if path.name.startswith(".") or not path.name.endswith(SUFFIX):
            continue
        try:
            entry = loads(path.read_bytes())
        except (OSError, InvalidIndexEntryError) as err:
            problems[path.name] = str(err)
            continue
        if path.name != entry_filename(entry.space_id):
            problems[path.name] = f"file name does not match spaceId {entry.space_id!r}"
            continue
        entries[entry.space_id] = entry
    return entries, problems


def write_entry(directory: Path, entry: IndexEntry) -> None:
    """Write one entry atomically (temporary file, fsync, rename), readable by its owner only."""
    directory.mkdir(parents=True, exist_ok=True)
    durable.atomic_write(directory / entry_filename(entry.space_id), entry.dumps(), mode=0o600)


def remove_entry(directory: Path, space_id: spaces.SpaceId) -> bool:
    try:
        (directory / entry_filename(space_id)).unlink()
    except FileNotFoundError:
        return False
    return True
