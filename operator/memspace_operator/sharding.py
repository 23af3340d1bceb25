"""Which shard serves which space: assignment, sticky once made (design section 3), into the
one shard taking new spaces (the intake shard) and never into a sealed one.

A pod's volumes cannot change in place, so mounting a new space restarts its shard. New spaces
therefore go only to the intake shard, which is sealed once it is full or `intake_window_s`
after it opened; a sealed shard never mounts another space, so its tenants are never bounced
by others coming. Removals are deferred: a deleted or Inactive space keeps its volume in the
template until the shard restarts anyway (see `mounting`).

A shard's load, what counts toward `max_spaces_per_shard`, is the spaces its template mounts
plus the active spaces assigned to it: a deleted or Inactive space stops counting once
unmounted. A space still mounted somewhere is assigned there again (no restart, and a
ReadWriteOnce volume is never wanted by two pods). The durable record is the label
`memspace.dev/shard` on the space's PVC plus the shard StatefulSets' annotations (opened at,
sealed): this in-memory table is rebuilt from them at start-up, and every change to it is made
between two awaits, so concurrent reconciles never overfill a shard.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable

from memspace_contract import spaces
from memspace_contract.wire import ShardNumber


@dataclasses.dataclass(frozen=True)
class Assignment:
    shard: ShardNumber
    owner_uid: str
    """The MemorySpace holding the space ID (the PVC's owner-uid annotation)."""


class Shards:
    def __init__(
        self, max_spaces_per_shard: int, max_shards: int, intake_window_s: float = 600.0
    ) -> None:
        self.max_spaces_per_shard = max_spaces_per_shard
        self.max_shards = max_shards
        self.intake_window_s = intake_window_s
        self._assigned: dict[spaces.SpaceId, Assignment] = {}
        self._by_shard: dict[ShardNumber, set[spaces.SpaceId]] = {}
        """`_assigned` by shard: the health rounds, the mounter and every assignment read a
        shard's spaces, which scanning every assignment made quadratic at 10,000 spaces."""
        self._inactive: set[spaces.SpaceId] = set()
        self._offloaded: set[spaces.SpaceId] = set()
        """Inactive spaces that live in a backup: their delete-pending claims may go although
        they stay assigned (their index entry answers for them)."""
        self._known: set[ShardNumber] = set()
        self._mounted: dict[ShardNumber, frozenset[spaces.SpaceId]] = {}
        self._mounted_by: dict[spaces.SpaceId, set[ShardNumber]] = {}
        """`_mounted` by space: which shards' templates mount it."""
        self._opened: dict[ShardNumber, float] = {}
        self._sealed: set[ShardNumber] = set()
        self._closing: set[ShardNumber] = set()
        self._described: set[ShardNumber] = set()
        """Shards whose StatefulSet was seen (or written)."""

    # -- reading ---------------------------------------------------------------------------

    def get(self, space_id: spaces.SpaceId) -> Assignment | None:
        return self._assigned.get(space_id)

    def spaces_of(self, shard: int) -> frozenset[spaces.SpaceId]:
        """Every space assigned to the shard, Active or Inactive."""
        return frozenset(self._by_shard.get(ShardNumber(shard), ()))

    def wanted(self, shard: int) -> frozenset[spaces.SpaceId]:
        """The spaces the shard's pod must mount: its Active assigned spaces."""
        return frozenset(self._by_shard.get(ShardNumber(shard), ())) - self._inactive

    def mounted(self, shard: int) -> frozenset[spaces.SpaceId]:
        """The spaces the shard's pod template mounts (as the mounter last wrote or read it)."""
        return self._mounted.get(ShardNumber(shard), frozenset())

    def mounted_on(self, space_id: spaces.SpaceId) -> ShardNumber | None:
        found = self._mounted_by.get(space_id)
        return min(found) if found else None

    def count(self, shard: int) -> int:
        """The shard's load: mounted spaces and Active assigned ones."""
        return len(self.wanted(shard) | self.mounted(shard))

    def is_sealed(self, shard: int) -> bool:
        return shard in self._sealed

    def is_closing(self, shard: int) -> bool:
        """Being scaled to zero and removed: takes nothing, not even a space mounted on it."""
        return shard in self._closing

    def opened_at(self, shard: int) -> float | None:
        return self._opened.get(ShardNumber(shard))

    def takes_new(
        self, shard: int, now: float | None = None, joining: spaces.SpaceId | None = None
    ) -> bool:
        """Whether the shard may take a new space (`joining`, counted once if already
        assigned there): not sealed, not full, still young."""
        number = ShardNumber(shard)
        if number in self._sealed or number in self._closing:
            return False
        load = self.wanted(number) | self.mounted(number)
        if len(load - {joining} if joining is not None else load) >= self.max_spaces_per_shard:
            return False
        opened = self._opened.get(number)
        now = time.time() if now is None else now
        return opened is not None and now < opened + self.intake_window_s

    @property
    def shards(self) -> list[ShardNumber]:
        """Every shard that exists or has spaces assigned or mounted."""
        found = {*self._known, *(s for s, assigned in self._by_shard.items() if assigned)}
        found.update(s for s, m in self._mounted.items() if m)
        return sorted(found)

    def empty(self, shard: int) -> bool:
        """No space assigned to the shard (Active or Inactive): it may be removed."""
        return not self.spaces_of(shard)

    # -- changing --------------------------------------------------------------------------

    def know(self, shards: Iterable[int]) -> None:
        """Shards that exist (their StatefulSets), assigned or not."""
        self._known.update(ShardNumber(n) for n in shards)

    def describe(
        self,
        shard: int,
        *,
        mounted: Iterable[spaces.SpaceId],
        opened_at: float | None,
        sealed: bool,
    ) -> None:
        """What a shard's StatefulSet says: its mounts, when it opened, whether sealed. A
        shard without an opening time (made before intake shards existed) counts as sealed."""
        number = ShardNumber(shard)
        self._known.add(number)
        self._described.add(number)
        self._set_mounted(number, frozenset(mounted))
        if opened_at is not None:
            self._opened[number] = opened_at
        else:
            self._opened.pop(number, None)  # not the time an assignment found it at
        if sealed or opened_at is None:
            self._sealed.add(number)

    def set_mounted(self, shard: int, mounted: Iterable[spaces.SpaceId]) -> None:
        self._set_mounted(ShardNumber(shard), frozenset(mounted))
        self._described.add(ShardNumber(shard))

    def _set_mounted(self, shard: ShardNumber, mounted: frozenset[spaces.SpaceId]) -> None:
        before = self._mounted.get(shard, frozenset())
        for space_id in before - mounted:
            found = self._mounted_by[space_id]
            found.discard(shard)
            if not found:
                del self._mounted_by[space_id]
        for space_id in mounted - before:
            self._mounted_by.setdefault(space_id, set()).add(shard)
        self._mounted[shard] = mounted

    def seal(self, shard: int) -> None:
        self._sealed.add(ShardNumber(shard))

    def close(self, shard: int) -> None:
        """Start removing an empty shard: nothing is assigned to it from now on."""
        self._closing.add(ShardNumber(shard))

    def forget_shard(self, shard: int) -> None:
        """The shard was removed: its number is free again."""
        number = ShardNumber(shard)
        for table in (self._known, self._sealed, self._closing, self._described):
            table.discard(number)
        self._set_mounted(number, frozenset())
        self._mounted.pop(number, None)
        self._opened.pop(number, None)

    def set_offloaded(self, space_id: spaces.SpaceId, offloaded: bool) -> None:
        if offloaded:
            self._offloaded.add(space_id)
            self._inactive.add(space_id)
        else:
            self._offloaded.discard(space_id)

    def is_offloaded(self, space_id: spaces.SpaceId) -> bool:
        return space_id in self._offloaded

    def set_inactive(self, space_id: spaces.SpaceId, inactive: bool) -> None:
        if inactive:
            self._inactive.add(space_id)
        else:
            self._inactive.discard(space_id)

    def record(self, space_id: spaces.SpaceId, shard: int, owner_uid: str) -> None:
        """A durable assignment found on a PVC. Its shard, while no StatefulSet of it was seen,
        is open from now (see `_open_unmade`)."""
        number = ShardNumber(shard)
        self._put(space_id, Assignment(number, owner_uid))
        self._open_unmade(number, time.time())

    def _open_unmade(self, shard: ShardNumber, now: float) -> None:
        """A shard with spaces assigned whose StatefulSet was never seen (an operator stopped
        before it made it): no pod runs, so it is as young as a new shard, open from `now`
        (its StatefulSet's opening time, once seen, replaces this). Without an opening time it
        took no new space and the mounter sealed it at its first write, with room left: the
        next operator of a failover opened a shard more (a fifth for 100 spaces at 25)."""
        if shard not in self._described and shard not in self._closing:
            self._opened.setdefault(shard, now)

    def keeps(self, space_id: spaces.SpaceId, shard: int) -> bool:
        """Whether the space may stay on `shard` (its PVC's label): the shard mounts it, is
        still taking spaces, or it is Inactive (needs no mount). Otherwise it must move to the
        intake shard: mounting it on a sealed shard would bounce that shard's tenants."""
        number = ShardNumber(shard)
        if number in self._closing:
            return False
        if space_id in self.mounted(number) or space_id in self._inactive:
            return True
        if number not in self._described and self.mounted_on(space_id) is None:
            # Assigned, but its StatefulSet was never made (an operator stopped in between):
            # no pod runs, so no tenant is bounced; it opens as an intake shard now.
            self._known.add(number)
            self._open_unmade(number, time.time())
            return True
        # The space itself counts once: assigned here a moment ago, it filled the shard's last
        # place (without this, every shard's last space moved out and straight back in).
        return self.takes_new(number, joining=space_id) and self.mounted_on(space_id) is None

    def assign(
        self, space_id: spaces.SpaceId, owner_uid: str, now: float | None = None
    ) -> ShardNumber | None:
        """The space's shard, choosing one if it has none; None when no shard can take it."""
        found = self._assigned.get(space_id)
        if found is not None:
            if found.owner_uid != owner_uid:
                self._put(space_id, Assignment(found.shard, owner_uid))
            return found.shard
        now = time.time() if now is None else now
        shard = self.mounted_on(space_id)
        if shard is None or shard in self._closing:
            shard = self._intake(now)
        if shard is None:
            return None
        self._put(space_id, Assignment(shard, owner_uid))
        return shard

    def _intake(self, now: float) -> ShardNumber | None:
        """The intake shard (the lowest one taking spaces), or a new one at the lowest free
        number when none takes spaces and fewer than `max_shards` exist."""
        existing = self.shards
        for shard in existing:
            self._open_unmade(shard, now)
            if self.takes_new(shard, now):
                return shard
        if len(existing) >= self.max_shards:
            return None
        used = set(existing)
        shard = ShardNumber(next(n for n in range(len(used) + 1) if n not in used))
        self._known.add(shard)
        self._opened[shard] = now
        return shard

    def release(self, space_id: spaces.SpaceId) -> Assignment | None:
        self._inactive.discard(space_id)
        self._offloaded.discard(space_id)
        found = self._assigned.pop(space_id, None)
        if found is not None:
            self._by_shard[found.shard].discard(space_id)
        return found

    def _put(self, space_id: spaces.SpaceId, assignment: Assignment) -> None:
        before = self._assigned.get(space_id)
        if before is not None:
            self._by_shard[before.shard].discard(space_id)
        self._assigned[space_id] = assignment
        self._by_shard.setdefault(assignment.shard, set()).add(space_id)

    def full(self) -> bool:
        """No shard can take another space."""
        return len(self.shards) >= self.max_shards and not any(
            self.takes_new(s) for s in self.shards
        )
