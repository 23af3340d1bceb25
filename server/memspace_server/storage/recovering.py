"""Recovery of one space from its volume: the identity file checked, the last checkpoint
loaded into the three tiers, then the WAL after it replayed (design section 4).

Replay keeps only the last record of each memory and decodes just those, straight into the
hot tier's columns; a torn record at the WAL's tail is cut, corruption before it refuses the
space (CorruptWalError) rather than dropping acknowledged writes. Blocking: the registry runs
`recover` in a worker thread.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from memspace_contract import index
from memspace_contract.wire import Lsn
from memspace_server import errors
from memspace_server.storage import caches, checkpoints, layout, records, tiers, wal, zarr_tiers
from memspace_server.storage.hot import HotTier
from memspace_server.storage.settings import EngineSettings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Recovered:
    """A space as its volume holds it, ready to serve."""

    directory: layout.SpaceDir
    checkpointer: checkpoints.Checkpointer
    hot: HotTier
    warm: zarr_tiers.ZarrTier
    cold: zarr_tiers.ZarrTier
    next_lsn: Lsn
    replayed: int
    """WAL records after the checkpoint: not consolidated yet."""
    oldest_unconsolidated: float | None
    """Time of the first of them."""


def recover(
    root: Path, entry: index.IndexEntry, settings: EngineSettings, chunks: caches.SpaceChunks
) -> Recovered:
    """Load the space of `entry` from its volume at `root` (blocking); `chunks` is the space's
    share of the server's cold-chunk cache."""
    directory = layout.open_dir(root, entry.space_id, entry.embedding_dim)
    checkpointer = checkpoints.Checkpointer(directory.hot)
    manifest = checkpointer.manifest
    dim = entry.embedding_dim
    rows = settings.rows_per_chunk(dim)
    hot = checkpointer.restore_hot(dim)
    warm = zarr_tiers.ZarrTier(
        directory.warm,
        tiers.WARM,
        dim,
        chunk_rows=rows,
        compression="none",
        generation=manifest.warm.generation,
        rows=manifest.warm.rows,
        state=checkpointer.state(manifest.warm),
    )
    cold = zarr_tiers.ZarrTier(
        directory.cold,
        tiers.COLD,
        dim,
        chunk_rows=rows,
        compression=entry.tiers.cold_compression,
        generation=manifest.cold.generation,
        rows=manifest.cold.rows,
        state=checkpointer.state(manifest.cold),
        chunks=chunks,
    )
    latest: dict[str, memoryview | None] = {}
    oldest: list[float] = []

    def apply(payload: memoryview) -> None:
        kind, memory_id, at = records.peek(payload)
        if not oldest:
            oldest.append(at)
        latest.pop(memory_id, None)
        latest[memory_id] = payload if kind == records.REMEMBER else None

    try:
        recovered = wal.recover(directory.wal, manifest.lsn, apply)
        holding = [tier for tier in (hot, warm, cold) if len(tier)]
        for memory_id in latest if holding else ():
            for tier in holding:
                tier.remove(memory_id)
        hot.add(records.columns([p for p in latest.values() if p is not None], dim))
    except records.RecordFormatError as err:
        raise errors.CorruptWalError(f"space {entry.space_id!r}: {err}") from err
    if recovered.replayed:
        log.info(
            "space %s: replayed %d WAL records after checkpoint LSN %d",
            entry.space_id,
            recovered.replayed,
            manifest.lsn,
        )
    return Recovered(
        directory=directory,
        checkpointer=checkpointer,
        hot=hot,
        warm=warm,
        cold=cold,
        next_lsn=Lsn(recovered.next_lsn),
        replayed=recovered.replayed,
        oldest_unconsolidated=oldest[0] if oldest else None,
    )
