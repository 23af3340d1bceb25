"""Settings of the storage engine, the same for every space a server holds."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    wal_segment_bytes: int = 64 * 1024 * 1024
    """A WAL segment is closed past this size; consolidation drops whole segments."""
    consolidate_wal_bytes: int = 256 * 1024 * 1024
    """Consolidate once this much WAL has accumulated since the last checkpoint, bounding
    recovery time (replay) and disk use."""
    consolidate_interval_s: float = 300.0
    """Consolidate a space with unconsolidated records at least this often (bounds wal_lag)."""
    chunk_bytes: int = 4 * 1024 * 1024
    """Target size of a Zarr embedding chunk: large enough for fast scans, small enough that
    the last, partly filled chunk is cheap to rewrite."""
    chunk_rows: int | None = None
    """Rows per Zarr chunk; None derives it from chunk_bytes and the embedding size."""
    demote_slack: float = 0.1
    """A demotion brings a tier this fraction below its capacity, so it does not run again for
    every single new memory."""
    compact_ratio: float = 0.5
    """A Zarr tier is rewritten without its tombstones once they are this fraction of its rows."""
    subscriber_buffer: int = 1024
    """Events a subscriber may fall behind before its stream ends with RESOURCE_EXHAUSTED."""
    cold_cache_bytes: int = 256 * 1024 * 1024
    """Bytes of decompressed cold-tier chunks the server keeps (shared by its spaces, least
    recently used first, the largest holder first): a repeated cold recall then costs a scan,
    not a decompression. 0 turns the cache off."""
    scan_threads: int | None = None
    """Threads for recall scans; None: one per core plus one."""
    scans_per_space: int | None = None
    """Scans one space may run at once; None: one fewer than scan_threads (at least 1), so
    another space's recall always finds a thread."""
    shared_scans_per_space: int = 1
    """Scans one space may run at once while other spaces ask for work too: one scan thread
    per space then, so a space flooding recalls keeps at most one core busy beside the event
    loop and another space's scan thread is not starved of a core."""
    wal_threads: int = 4
    """Threads for WAL appends (write + fdatasync): this many spaces commit at once."""
    fanout_slots: int = 8
    """Subscribe streams of the whole server sending an event at once: a batch to a space with
    many subscribers then delays another space's calls by a few sends, not by all of them."""
    shared_fanout_slots: int = 1
    """`fanout_slots` while other spaces than the subscribed ones ask for work: the fan-out then
    queues at most this many steps ahead of each step of their calls."""
    ann_recall_sample: float = 0.01
    """Fraction of approximate recalls also run exactly in the background to measure recall@k
    (Health, metrics); 0 turns the measurement off."""
    ann_filter_exact_fraction: float = 0.1
    """A tag filter matching fewer than this fraction of a tier's rows is answered by an exact
    scan of those rows: a graph search filtered that hard would miss hits."""
    ann_extend_fraction: float = 0.1
    """An index is extended once the rows added since its build exceed this fraction of the
    rows it covers (those rows are scanned exactly meanwhile)."""
    ann_build_threads: int = 1
    """Threads an index build may use (faiss's OpenMP pool), so that a build in the background
    leaves the other cores to recalls."""

    def rows_per_chunk(self, dim: int) -> int:
        if self.chunk_rows is not None:
            return self.chunk_rows
        rows = max(64, self.chunk_bytes // (4 * dim))
        return 1 << (rows.bit_length() - 1)
