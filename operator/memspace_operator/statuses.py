"""A MemorySpace's status, computed from what the operator observed (pure functions).

Conditions follow the Kubernetes API conventions: types VolumeBound, Mounted and Healthy, each
with status, CamelCase reason, message, lastTransitionTime and observedGeneration, summarised in
Ready. Health figures change the status only when they change meaningfully (`Figures.differs`),
so a status is written when something a reader cares about changed, and never at rest.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any, Literal

from memspace_contract import index, wire

ConditionStatus = Literal["True", "False", "Unknown"]
TYPES = ("VolumeBound", "Mounted", "Healthy")
READY = "Ready"

PRESSURE_STEP = 0.01
"""Pressure (hot memories / hotCapacity) is shown to two decimals."""
LAG_FLOOR_MS = 1000.0
RATE_FLOOR = 1.0
RELATIVE_STEP = 0.5
"""WAL lag and consolidation rate are shown again when they change by half (and by more than
a floor): both drift continuously while a space works, and a write per poll per space would
make 1,000 busy spaces a write storm."""


@dataclasses.dataclass(frozen=True)
class Condition:
    type: str
    status: ConditionStatus
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Problem:
    """Why a space cannot progress at all (SpaceIdConflict, ShardsFull, InvalidSpec, ...)."""

    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Figures:
    """Health figures of one space, as the shard's Health RPC reports them."""

    memories: int
    pressure: float
    wal_lag_ms: float
    consolidation_rate: float
    tier_memories: Mapping[str, int]
    unknown: frozenset[str] = frozenset()
    """Figures the shard does not know (Health's `unknown`: a space not loaded since a crash):
    left out of the status rather than shown as 0."""
    search_index: Mapping[str, Any] | None = None
    """status.index: type, configuredType, rowsIndexed, buildState and the measured recall
    (None: the shard did not say, the space not loaded)."""

    def differs(self, shown: Figures | None) -> bool:
        """Whether these figures are worth a status write over the `shown` ones."""
        if shown is None or self.unknown != shown.unknown:
            return True
        if self.memories != shown.memories or dict(self.tier_memories) != dict(shown.tier_memories):
            return True
        if self.search_index != shown.search_index:
            return True
        if abs(self.pressure - shown.pressure) >= PRESSURE_STEP:
            return True
        return _drifted(self.wal_lag_ms, shown.wal_lag_ms, LAG_FLOOR_MS) or _drifted(
            self.consolidation_rate, shown.consolidation_rate, RATE_FLOOR
        )


def _drifted(new: float, old: float, floor: float) -> bool:
    if (new == 0) != (old == 0):
        return True
    change = abs(new - old)
    return change >= floor and change >= RELATIVE_STEP * max(abs(old), abs(new))


@dataclasses.dataclass
class Observed:
    """Everything the operator knows about one space, from every source."""

    space_id: str
    generation: int
    state: str = index.DEFAULT_STATE
    problem: Problem | None = None
    shard: int | None = None
    endpoint: str | None = None
    claim_name: str | None = None
    credentials_secret: str | None = None
    volume: Condition | None = None
    mount: Condition | None = None
    health: Condition | None = None
    figures: Figures | None = None
    figures_time: str | None = None
    confirming: bool = False
    """The operator can ask the shard (it has an admin token): Ready waits for the shard to
    confirm the generation of the space's index entry."""
    index_generation: int = 0
    """The generation of the space's index entry its shard confirmed it applies."""
    index_confirmed_at: float = 0.0
    """When (time.monotonic) the shard last confirmed it directly: a Health answer asked
    before then may be older and does not lower it."""
    hold: Condition | None = None
    """Ready in place of Mounted and Healthy while a backup step stands between the volume and
    serving (Restoring, Offloading)."""
    backup_conditions: dict[str, Condition] = dataclasses.field(default_factory=dict)
    """Conditions of backups, restores and offloads (Restored, Offloaded), after Ready."""
    backup_status: dict[str, Any] = dataclasses.field(default_factory=dict)
    """status.offload and status.restoredFrom."""


TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime(TIME_FORMAT)


def oldest_record_time(figures_time: str, wal_lag_ms: float) -> str | None:
    """When the oldest WAL record not yet consolidated was written: the health report's time
    less the lag it reported; None when nothing waits. `kubectl get msp` shows it as an age that
    stays true between status writes (a lag in milliseconds is stale the moment it is written)."""
    if wal_lag_ms <= 0:
        return None
    reported = datetime.datetime.strptime(figures_time, TIME_FORMAT).replace(tzinfo=datetime.UTC)
    return (reported - datetime.timedelta(milliseconds=wal_lag_ms)).strftime(TIME_FORMAT)


def _pending(type_: str, reason: str, message: str) -> Condition:
    return Condition(type_, "Unknown", reason, message)


def _unconfirmed(observed: Observed) -> Condition | None:
    """Ready while the shard has not confirmed the space's current index entry: it may still
    serve the space as before (Inactive, quota, tiers take effect only once it has)."""
    if not observed.confirming or observed.index_generation >= observed.generation:
        return None
    shard = f"memspace-shard-{observed.shard}"
    if observed.state == wire.INACTIVE:
        return Condition(
            READY,
            "False",
            "Deactivating",
            f"{shard} has not yet confirmed generation {observed.generation} of the index "
            "entry, which makes the space Inactive: until it does, it may still serve it",
        )
    return Condition(
        READY,
        "False",
        "IndexPending",
        f"{shard} has not yet confirmed generation {observed.generation} of the space's "
        f"index entry (it applies generation {observed.index_generation})",
    )


def _ready(observed: Observed, parts: list[Condition]) -> Condition:
    """The summary: a problem first, then the volume, then Inactive (an Inactive space is not
    served on purpose, so its mount and health do not matter), then mount and health."""
    if observed.problem is not None:
        return Condition(READY, "False", observed.problem.reason, observed.problem.message)
    volume, rest = parts[:1], parts[1:]
    for part in volume:
        if part.status != "True":
            return Condition(READY, part.status, part.reason, part.message)
    pending = _unconfirmed(observed) or observed.hold
    if pending is not None:
        return pending
    if observed.state == wire.INACTIVE:
        return Condition(
            READY,
            "False",
            "Inactive",
            "the space is Inactive: its volume is kept and it is unloaded from its shard; "
            "requests get FAILED_PRECONDITION until spec.state is Active",
        )
    for part in rest:
        if part.status != "True":
            return Condition(READY, part.status, part.reason, part.message)
    return Condition(
        READY, "True", "Ready", f"served by memspace-shard-{observed.shard} at {observed.endpoint}"
    )


def conditions(observed: Observed) -> list[Condition]:
    """VolumeBound, Mounted, Healthy and the Ready summary (only Ready for a space that owns
    nothing, such as a SpaceIdConflict)."""
    extra = [observed.backup_conditions[k] for k in sorted(observed.backup_conditions)]
    if observed.problem is not None and observed.claim_name is None:
        return [_ready(observed, []), *extra]
    if observed.hold is not None and observed.claim_name is None:
        return [observed.hold, *extra]
    parts = [
        observed.volume or _pending("VolumeBound", "Provisioning", "the volume is being created"),
        observed.mount or _pending("Mounted", "MountPending", "no shard mounts the volume yet"),
        observed.health or _pending("Healthy", "HealthPending", "the shard has not answered yet"),
    ]
    return [*parts, _ready(observed, parts), *extra]


def render(observed: Observed, previous: Mapping[str, Any]) -> dict[str, Any]:
    """The status document, keeping lastTransitionTime of conditions whose status is unchanged."""
    before = {c.get("type"): c for c in previous.get("conditions") or [] if isinstance(c, dict)}
    stamp = now()
    rendered = []
    for condition in conditions(observed):
        old = before.get(condition.type) or {}
        same = old.get("status") == condition.status
        rendered.append(
            {
                "type": condition.type,
                "status": condition.status,
                "reason": condition.reason,
                "message": condition.message,
                "lastTransitionTime": old.get("lastTransitionTime", stamp) if same else stamp,
                "observedGeneration": observed.generation,
            }
        )
    status: dict[str, Any] = {
        "observedGeneration": observed.generation,
        "conditions": rendered,
        "spaceId": observed.space_id,
    }
    optional = {
        "shard": observed.shard,
        "endpoint": observed.endpoint,
        "claimName": observed.claim_name,
        "credentialsSecret": observed.credentials_secret,
    }
    status.update({key: value for key, value in optional.items() if value is not None})
    status.update({key: dict(value) for key, value in observed.backup_status.items() if value})
    if observed.confirming and observed.index_generation:
        status["indexGeneration"] = observed.index_generation
    figures = observed.figures
    if figures is not None:
        shown = {
            "memories": ("memories", figures.memories),
            "pressure": ("pressure", round(figures.pressure, 4)),
            "wal_lag_ms": ("walLagMs", round(figures.wal_lag_ms, 1)),
            "consolidation_rate": ("consolidationRate", round(figures.consolidation_rate, 3)),
            "tier_memories": (
                "tierMemories",
                {k: int(v) for k, v in sorted(figures.tier_memories.items())},
            ),
        }
        status.update(
            {key: value for name, (key, value) in shown.items() if name not in figures.unknown}
        )
        if figures.search_index is not None:
            status["index"] = dict(figures.search_index)
        if observed.figures_time:
            status["lastHealthTime"] = observed.figures_time
            oldest = oldest_record_time(observed.figures_time, figures.wal_lag_ms)
            if oldest is not None and "wal_lag_ms" not in figures.unknown:
                status["walOldestRecordTime"] = oldest
    return status


def same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Equal statuses for the purpose of writing (kopf's own bookkeeping aside)."""
    return _strip(a) == _strip(b)


def _strip(status: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in status.items() if key != "kopf"}


def merge_patch(new: Mapping[str, Any], old: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning `old` into `new` (removed keys set to null; kopf's own
    `status.kopf` is left alone)."""
    patch: dict[str, Any] = dict(new)
    for key in old:
        if key not in new and key != "kopf":
            patch[key] = None
    return patch
