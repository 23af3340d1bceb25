"""The book of spaces the operator tracks, and the one place that writes their status.

Several sources observe a space (the reconciler, the PVC watch, the shard mounter, the health
poller); each updates the space's `Observed` and calls `publish`, which renders the status and
patches the status subresource only when it differs from what was last written (read from the
object when the space is first seen, so a restarted operator does not rewrite it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from memspace_contract import index, spaces
from memspace_operator import errors, kube, models, statuses

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Tracked:
    space: models.MemorySpace
    """The space as served: its spec after its MemorySpaceClass (see `requested`)."""
    observed: statuses.Observed
    written: dict[str, Any]
    """The status as last written (or read): what `publish` compares with."""
    owner: bool = False
    """This MemorySpace holds its space ID (it is not a SpaceIdConflict)."""
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    """Held by reconcile and finalize: one of them at a time per space."""
    publishing: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    flush: asyncio.Task[None] | None = None
    """A publish scheduled by `publish_soon`."""
    handed: index.IndexEntry | None = None
    """The index entry its shard last confirmed it applies (ApplyIndexEntry)."""
    reconciled: bool = False
    """A reconcile has published the space's status: observers may publish it too (before
    that, a half-made status would cost a write of its own)."""
    requested: models.MemorySpace | None = None
    """The space as its object asks for it, before its class applies; None: same as `space`."""

    @property
    def ref(self) -> models.SpaceRef:
        return self.space.ref


def _restore(space: models.MemorySpace) -> statuses.Observed:
    """What the last written status says, so an unchanged space renders an unchanged status."""
    status = space.status
    observed = statuses.Observed(
        space_id=space.spec.space_id, generation=space.generation, state=space.spec.state
    )
    generation = status.get("indexGeneration")
    if isinstance(generation, int) and not isinstance(generation, bool):
        observed.index_generation = generation
    for condition in status.get("conditions") or []:
        if not isinstance(condition, Mapping) or condition.get("type") not in statuses.TYPES:
            continue
        value = statuses.Condition(
            str(condition["type"]),
            condition.get("status", "Unknown"),
            str(condition.get("reason", "")),
            str(condition.get("message", "")),
        )
        setattr(
            observed, {"VolumeBound": "volume", "Mounted": "mount"}.get(value.type, "health"), value
        )
    if status.get("lastHealthTime"):
        tiers = status.get("tierMemories") or {}
        keys = {
            "memories": "memories",
            "pressure": "pressure",
            "wal_lag_ms": "walLagMs",
            "consolidation_rate": "consolidationRate",
            "tier_memories": "tierMemories",
        }
        observed.figures = statuses.Figures(
            memories=int(status.get("memories") or 0),
            pressure=float(status.get("pressure") or 0.0),
            wal_lag_ms=float(status.get("walLagMs") or 0.0),
            consolidation_rate=float(status.get("consolidationRate") or 0.0),
            tier_memories={str(k): int(v) for k, v in tiers.items()},
            unknown=frozenset(name for name, key in keys.items() if key not in status),
            search_index=dict(status["index"]) if isinstance(status.get("index"), dict) else None,
        )
        observed.figures_time = str(status["lastHealthTime"])
    return observed


PUBLISH_DELAY_S = 1.0
"""How long changes to one space's status are gathered into one write."""
BUSY_PUBLISH_DELAY_S = 5.0
"""The same while the operator's API requests queue for a slot (the API server is the
bottleneck, as when 1,000 spaces are applied at once): a space's first status, its health,
and its mount's two steps, which come seconds apart, then make one or two writes rather than
four, and the API server's time goes to binding claims. A status is never held longer."""


class Book:
    def __init__(self, kube_client: kube.Kube) -> None:
        self._kube = kube_client
        self._by_uid: dict[str, Tracked] = {}
        self._owners: dict[spaces.SpaceId, str] = {}
        self._flushes: set[asyncio.Task[None]] = set()

    def track(self, space: models.MemorySpace) -> Tracked:
        """Start tracking a space, or take its newest spec."""
        tracked = self._by_uid.get(space.ref.uid)
        if tracked is None:
            tracked = Tracked(
                space=space,
                observed=_restore(space),
                written={k: v for k, v in space.status.items() if k != "kopf"},
            )
            self._by_uid[space.ref.uid] = tracked
        else:
            tracked.space = space
        tracked.requested = space
        tracked.observed.generation = space.generation
        tracked.observed.state = space.spec.state
        tracked.observed.space_id = space.spec.space_id
        return tracked

    def get(self, uid: str) -> Tracked | None:
        return self._by_uid.get(uid)

    def all(self) -> list[Tracked]:
        return list(self._by_uid.values())

    def set_owner(self, tracked: Tracked, owner: bool) -> None:
        tracked.owner = owner
        space_id = tracked.space.spec.space_id
        if owner:
            self._owners[space_id] = tracked.ref.uid
        elif self._owners.get(space_id) == tracked.ref.uid:
            del self._owners[space_id]

    def owner_of(self, space_id: spaces.SpaceId) -> Tracked | None:
        uid = self._owners.get(space_id)
        return self._by_uid.get(uid) if uid is not None else None

    def forget(self, uid: str) -> None:
        tracked = self._by_uid.pop(uid, None)
        if tracked is not None:
            self.set_owner(tracked, False)

    def publish_soon(self, tracked: Tracked) -> None:
        """Publish shortly, without waiting: the reconciler and the observers (the claim watch,
        the mounter, the health poller) never wait for status writes, and changes that come
        close together (within `PUBLISH_DELAY_S`, or `BUSY_PUBLISH_DELAY_S` while the API
        server is the bottleneck) make one write (a status write failing for a moment is
        retried by the next change or the next re-check)."""
        if tracked.flush is not None and not tracked.flush.done():
            return
        task = asyncio.get_running_loop().create_task(self._publish_later(tracked))
        tracked.flush = task
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _publish_later(self, tracked: Tracked) -> None:
        await asyncio.sleep(BUSY_PUBLISH_DELAY_S if self._kube.busy else PUBLISH_DELAY_S)
        tracked.flush = None  # changes from now on schedule another publish
        try:
            await self.publish(tracked)
        except errors.OperatorError as err:
            log.warning("%s: status not written (%s); the next change retries", tracked.ref, err)

    async def close(self) -> None:
        for task in list(self._flushes):
            task.cancel()
        await asyncio.gather(*self._flushes, return_exceptions=True)

    async def publish(self, tracked: Tracked) -> bool:
        """Write the space's status if it changed; True when it was written."""
        async with tracked.publishing:
            status = statuses.render(tracked.observed, tracked.written)
            if statuses.same(status, tracked.written):
                return False
            patch = {"status": statuses.merge_patch(status, tracked.written)}
            ref = tracked.ref
            try:
                await self._kube.patch(kube.memoryspaces(ref.namespace, ref.name, "status"), patch)
            except errors.NotFoundError:
                return False
            except errors.InvalidError as err:
                log.error("%s: status refused by the API server: %s", ref, err)
                return False
            log.debug("%s: status written: %s", ref, _summary(status))
            tracked.written = status
            return True


def _summary(status: Mapping[str, Any]) -> str:
    """Conditions as Type=Status/Reason, for the debug log."""
    return ", ".join(
        f"{c.get('type')}={c.get('status')}/{c.get('reason')}" for c in status.get("conditions", [])
    )
