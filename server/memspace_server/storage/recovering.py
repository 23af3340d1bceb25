"""Recovery of one space from its volume: the identity file checked, the last checkpoint
loaded into the three tiers, then the WAL after it replayed (design section 4).

Replay reads WAL frames as columns, keeps only the last record of each memory and copies just
those, frame by frame, into the hot tier's columns; a torn frame at the WAL's tail is cut,
corruption before it refuses the space (CorruptWalError) rather than dropping acknowledged
writes. Blocking: the registry runs
`recover` in a worker thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

from memspace_contract import index
from memspace_contract.wire import Lsn
from memspace_server import errors
from memspace_server.storage import (
    caches,
    checkpoints,
    frames,
    layout,
    records,
    tiers,
    wal,
    zarr_tiers,
)
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


class _Latest:
    """What replay keeps: the last record of each memory, found frame by frame. A frame's
    records are numbered in one sequence across the log; `latest` maps each memory to the
    number of its last record, and the memories' columns are then gathered frame by frame."""

    def __init__(self, dim: int, hot: HotTier) -> None:
        self.dim = dim
        self.hot = hot
        self.remembers = 0
        """Remember records read so far: the hot tier has room for them, its pages faulted in
        by a background thread while the log is read."""
        self.latest: dict[str, int] = {}
        self.oldest: float | None = None
        self._starts: list[int] = []
        self._sources: list[frames.Frame | memoryview] = []
        self._remember: list[npt.NDArray[np.bool_]] = []
        self._next = 0

    def apply(self, payload: memoryview, batch: bool, skip: int) -> None:
        if batch:
            frame = frames.decode(payload)
            if frame.dim != self.dim and len(frame.embeddings):
                raise records.RecordFormatError(
                    f"a frame holds embeddings of {frame.dim} values, the space {self.dim}"
                )
            at, ids, remember = frame.at, frame.ids, frame.kinds == records.REMEMBER
            source: frames.Frame | memoryview = frame
            self.remembers += frame.embeddings.shape[0]
            self.hot.expect(self.remembers)
        else:
            kind, memory_id, at = records.peek(payload)
            ids, remember = [memory_id], np.array([kind == records.REMEMBER])
            source = payload
        if self.oldest is None:
            self.oldest = at
        start = self._next
        self._starts.append(start)
        self._sources.append(source)
        self._remember.append(remember)
        self._next += len(ids)
        if skip:
            ids = ids[skip:]
            start += skip
        # In C: later records of a memory replace earlier ones.
        self.latest.update(zip(ids, range(start, start + len(ids)), strict=False))

    def batches(self) -> Iterator[tiers.Columns]:
        """The remembered memories' columns, one batch per frame that holds any."""
        if not self.latest:
            return
        kept = np.fromiter(self.latest.values(), np.int64, len(self.latest))
        kept.sort()
        starts = np.array(self._starts, np.int64)
        remember = np.concatenate(self._remember)
        kept = kept[remember[kept]]
        owner = np.searchsorted(starts, kept, side="right") - 1
        bounds = [0, *(np.flatnonzero(np.diff(owner)) + 1).tolist(), len(kept)]
        legacy: list[memoryview] = []
        for begin, end in itertools.pairwise(bounds):
            if begin == end:
                continue
            source = self._sources[owner[begin]]
            rows = kept[begin:end] - starts[owner[begin]]
            if isinstance(source, frames.Frame):
                yield source.columns(rows)
            else:
                legacy.append(source)
            if len(legacy) >= 4096:
                yield records.columns(legacy, self.dim)
                legacy = []
        if legacy:
            yield records.columns(legacy, self.dim)


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
    replay = _Latest(dim, hot)
    try:
        recovered = wal.recover(directory.wal, manifest.lsn, replay.apply)
        holding = [tier for tier in (hot, warm, cold) if len(tier)]
        for memory_id in replay.latest if holding else ():
            for tier in holding:
                tier.remove(memory_id)
        hot.reserve(len(replay.latest))
        for batch in replay.batches():
            hot.add(batch, checked=True)  # each memory's last record, removed from every tier
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
        oldest_unconsolidated=replay.oldest,
    )
