"""Consolidation of one space: what moves WAL-backed hot state into the Zarr tiers and lets the
WAL be truncated (design section 4).

`Space.consolidate` takes the space's locks, rolls the WAL and demotes the least recently
recalled hot memories; `write` does the rest in a worker thread (warm over capacity to cold,
compaction of tiers that are mostly tombstones, the checkpoint, the WAL it covers dropped, old
tier generations swept). `Backlog` is what is not consolidated yet and `Rate` what was, for
Health and for deciding when the next consolidation is due.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any

from memspace_contract import index
from memspace_server.storage import checkpoints, tiers, wal, zarr_tiers
from memspace_server.storage.hot import HotTier
from memspace_server.storage.settings import EngineSettings

RATE_WINDOW_S = 60.0
COMPACT_MIN_ROWS = 1024
"""A tier smaller than this is never compacted: rewriting it saves nothing worth the I/O."""


def overflow(size: int, capacity: int, slack: float) -> int:
    """How many memories a tier of `size` gives to the next one: none within capacity, else
    enough to bring it `slack` (a fraction of capacity) below it, so demotion does not run again
    for every single new memory."""
    excess = size - capacity
    return excess + int(capacity * slack) if excess > 0 else 0


def needs_consolidation(
    hot: HotTier, warm: zarr_tiers.ZarrTier, log: wal.Wal[Any], caps: index.Tiers, wal_bytes: int
) -> bool:
    """A tier over capacity, or more WAL than a replay should read."""
    return (
        len(hot) > caps.hot_capacity
        or len(warm) > caps.warm_capacity
        or log.appended_bytes > wal_bytes
    )


def write(
    demoted: tiers.Columns,
    *,
    hot: HotTier,
    warm: zarr_tiers.ZarrTier,
    cold: zarr_tiers.ZarrTier,
    checkpointer: checkpoints.Checkpointer,
    log: wal.Wal[Any],
    caps: index.Tiers,
    settings: EngineSettings,
    lsn: int,
    ahead: checkpoints.Ahead | None = None,
) -> tuple[zarr_tiers.ZarrTier, zarr_tiers.ZarrTier]:
    """The blocking half of a consolidation, through the checkpoint at `lsn` (naming the run
    written `ahead` of it, if any). Returns the warm and cold tiers to use from now on (new
    generations where a tier was compacted)."""
    warm.add(demoted)
    moving = overflow(len(warm), caps.warm_capacity, settings.demote_slack)
    if moving:
        cold.add(warm.take_least_recent(moving))
    warm = _compacted_if_sparse(warm, "none", settings)
    cold = _compacted_if_sparse(cold, caps.cold_compression, settings)
    checkpointer.write(lsn, hot, warm, cold, ahead)
    log.drop_through(lsn)
    warm.sweep_generations()
    cold.sweep_generations()
    return warm, cold


def _compacted_if_sparse(
    tier: zarr_tiers.ZarrTier, compression: str, settings: EngineSettings
) -> zarr_tiers.ZarrTier:
    if tier.rows > COMPACT_MIN_ROWS and tier.tombstones() > tier.rows * settings.compact_ratio:
        return tier.compacted(compression)
    return tier


@dataclasses.dataclass
class Backlog:
    """WAL records not consolidated yet: how many, and the time of the oldest."""

    records: int = 0
    oldest: float | None = None

    def note(self, count: int, now: float) -> None:
        self.records += count
        if self.oldest is None:
            self.oldest = now

    def clear(self) -> int:
        """Everything is consolidated; returns how many records were."""
        count, self.records, self.oldest = self.records, 0, None
        return count

    def due(self, interval_s: float, now: float) -> bool:
        """Records older than the consolidation interval are waiting."""
        return self.oldest is not None and now - self.oldest > interval_s

    def lag_ms(self, now: float) -> float:
        """Age of the oldest unconsolidated record (Health's wal_lag_ms); 0 when none."""
        return max(0.0, (now - self.oldest) * 1000.0) if self.oldest is not None else 0.0


class Rate:
    """Memories consolidated per second, a moving sum over the last RATE_WINDOW_S seconds."""

    def __init__(self) -> None:
        self._done: collections.deque[tuple[float, int]] = collections.deque()

    def note(self, count: int) -> None:
        self._done.append((time.monotonic(), count))

    def per_second(self) -> float:
        horizon = time.monotonic() - RATE_WINDOW_S
        while self._done and self._done[0][0] < horizon:
            self._done.popleft()
        return sum(n for _, n in self._done) / RATE_WINDOW_S
