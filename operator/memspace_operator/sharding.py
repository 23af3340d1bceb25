"""Which shard serves which space: assignment, sticky once made (design section 3).

A space goes to the shard with the fewest spaces below `max_spaces_per_shard` (the lowest
number on a tie); a new shard is opened only when every shard is full, up to `max_shards`.
The durable record is the label `memspace.dev/shard` on the space's PVC: this in-memory table
is rebuilt from the PVCs at start-up, and every change to it is made between two awaits, so
concurrent reconciles never overfill a shard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from memspace_contract import spaces
from memspace_contract.wire import ShardNumber


@dataclasses.dataclass(frozen=True)
class Assignment:
    shard: ShardNumber
    owner_uid: str
    """The MemorySpace holding the space ID (the PVC's owner-uid annotation)."""


class Shards:
    def __init__(self, max_spaces_per_shard: int, max_shards: int) -> None:
        self.max_spaces_per_shard = max_spaces_per_shard
        self.max_shards = max_shards
        self._assigned: dict[spaces.SpaceId, Assignment] = {}
        self._known: set[ShardNumber] = set()

    # -- reading ---------------------------------------------------------------------------

    def get(self, space_id: spaces.SpaceId) -> Assignment | None:
        return self._assigned.get(space_id)

    def spaces_of(self, shard: int) -> frozenset[spaces.SpaceId]:
        return frozenset(s for s, a in self._assigned.items() if a.shard == shard)

    def count(self, shard: int) -> int:
        return sum(1 for a in self._assigned.values() if a.shard == shard)

    @property
    def shards(self) -> list[ShardNumber]:
        """Every shard numbered below the highest one in use or known to exist."""
        top = max([*self._known, *(a.shard for a in self._assigned.values())], default=-1)
        return [ShardNumber(n) for n in range(top + 1)]

    # -- changing --------------------------------------------------------------------------

    def know(self, shards: Iterable[int]) -> None:
        """Shards that exist (their StatefulSets), assigned or not."""
        self._known.update(ShardNumber(n) for n in shards)

    def record(self, space_id: spaces.SpaceId, shard: int, owner_uid: str) -> None:
        """A durable assignment found on a PVC."""
        self._assigned[space_id] = Assignment(ShardNumber(shard), owner_uid)

    def assign(self, space_id: spaces.SpaceId, owner_uid: str) -> ShardNumber | None:
        """The space's shard, choosing one if it has none; None when every shard is full."""
        found = self._assigned.get(space_id)
        if found is not None:
            if found.owner_uid != owner_uid:
                self._assigned[space_id] = Assignment(found.shard, owner_uid)
            return found.shard
        counts = dict.fromkeys(self.shards, 0)
        for assignment in self._assigned.values():
            counts[assignment.shard] = counts.get(assignment.shard, 0) + 1
        open_shards = [s for s, n in counts.items() if n < self.max_spaces_per_shard]
        if open_shards:
            shard = min(open_shards, key=lambda s: (counts[s], s))
        elif len(counts) < self.max_shards:
            shard = ShardNumber(len(counts))
        else:
            return None
        self._assigned[space_id] = Assignment(shard, owner_uid)
        return shard

    def release(self, space_id: spaces.SpaceId) -> Assignment | None:
        return self._assigned.pop(space_id, None)

    def full(self) -> bool:
        """No shard can take another space."""
        shards = self.shards
        return len(shards) >= self.max_shards and all(
            self.count(s) >= self.max_spaces_per_shard for s in shards
        )
