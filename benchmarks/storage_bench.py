"""Storage engine benchmarks, each figure beside its baseline in the same run:
recall from hot, warm and cold (first with the chunk cache empty, then repeated with it warm) vs
faiss IndexFlatIP over the same matrix, each recall alternating with a faiss search (and numpy
alone); remember throughput with group commit vs a
raw append+fdatasync loop on the same disk and vs the write floor (`write_floor`: only the steps
no store of memories can skip); WAL replay rate, and vs a bare read + CRC32C of the
same segment files; the pause of a full collection of Python's cyclic collector with 100k
memories in the hot tier, and before any space was opened; the pause a write to a space sees
while the space consolidates 80,000 new memories, vs a bare write + fsync of the bytes its
checkpoint wrote."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import crc32c
import numpy as np
import numpy.typing as npt

from benchmarks import write_floor
from memspace_contract import durable, index, spaces
from memspace_server.storage import frames, memories, registry, settings, wal

DIM = 768
COLD_CACHE_BYTES = 512 * 1024 * 1024
"""The chunk cache of the recall benchmark: enough for the whole cold tier of 100k x 768
float32 (307 MB), which the default of 256 MiB is not."""


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0


def _time(fn: Callable[[], object], repeat: int) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return _median_ms(samples)


async def _atime_beside(
    fn: Callable[[], Awaitable[object]], baseline: Callable[[], object], repeat: int
) -> tuple[float, float]:
    """Median ms of `fn` and of `baseline`, their calls alternating: the baseline is taken at
    the same moments, so a load on the machine that comes and goes slows both alike (40 calls
    of one and then 40 of the other compared two different machines when the load changed)."""
    await fn()
    baseline()
    mine, theirs = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        await fn()
        mine.append(time.perf_counter() - start)
        start = time.perf_counter()
        baseline()
        theirs.append(time.perf_counter() - start)
    return _median_ms(mine), _median_ms(theirs)


def _baselines(
    matrix: np.ndarray, cues: np.ndarray, figures: dict[str, float]
) -> Callable[[], object]:
    """The baselines' figures; returns one faiss `IndexFlatIP` search of the next cue, for the
    recall figures to alternate with."""
    import faiss  # noqa: PLC0415 - optional, benchmark-only dependency

    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(matrix.shape[1])
    flat.add(unit)
    queries = itertools.cycle(cues)

    def search() -> object:
        return flat.search(next(queries)[None, :], 10)

    figures["faiss_flat_100k_ms"] = _time(search, 40)
    queries = itertools.cycle(cues)

    def numpy_scan() -> None:
        scores = unit @ next(queries)
        np.argpartition(scores, scores.shape[0] - 10)[-10:]

    figures["numpy_flat_100k_ms"] = _time(numpy_scan, 40)
    return search


async def _recall_figures(
    reg: registry.Registry,
    space_id: spaces.SpaceId,
    matrix: np.ndarray,
    cues: np.ndarray,
    figures: dict[str, float],
    results: dict[str, object],
    faiss_search: Callable[[], object],
) -> None:
    """Recall from each tier, each call beside a faiss search (`faiss_beside_TIER_ms`)."""
    entry = reg.entries()[space_id]

    async def beside(tier: str, recall: Callable[[], Awaitable[object]], repeat: int) -> None:
        mine, theirs = await _atime_beside(recall, faiss_search, repeat)
        figures[f"recall_{tier}_100k_ms"] = mine
        figures[f"faiss_beside_{tier}_ms"] = theirs

    async with reg.lease(space_id) as space:
        for start in range(0, matrix.shape[0], 1000):
            drafts = [
                memories.Draft(content=f"memory {start + i}", embedding=row)
                for i, row in enumerate(matrix[start : start + 1000])
            ]
            await space.remember_many(drafts)
        queries = itertools.cycle(cues)

        async def recall() -> None:
            await space.recall(memories.Query(cue=next(queries), k=10))

        await beside("hot", recall, 40)
        # Replay: reopen the space from its WAL alone (nothing consolidated yet).
        await space.close(consolidate=False)
        wal_dir = space.directory.wal
    read_s = _read_and_crc(wal_dir)
    opened = time.perf_counter()
    async with reg.lease(space_id) as space:
        elapsed = time.perf_counter() - opened
        results["wal_replay_per_s"] = round(matrix.shape[0] / elapsed)
        results["wal_read_crc_per_s"] = round(matrix.shape[0] / read_s)
        results["wal_replay_vs_read"] = round(read_s / elapsed, 3)
        # The pause of a full collection with 100k memories in the hot tier, against one before
        # any space was opened (the server freezes what its start made, as `_measure` does).
        results["gc_full_collection_100k_ms"] = round(_full_collection_ms(), 2)
        space.reconfigure(dataclasses.replace(entry, tiers=index.Tiers(hot_capacity=1)))
        await space.consolidate()
        queries = itertools.cycle(cues)
        await beside("warm", recall_from(space, queries), 40)
        space.reconfigure(
            dataclasses.replace(entry, tiers=index.Tiers(hot_capacity=1, warm_capacity=1))
        )
        await space.consolidate()
        queries = itertools.cycle(cues)
        cache = reg.pools.chunks
        cold = recall_from(space, queries)

        async def uncached() -> object:
            cache.clear()
            return await cold()

        await beside("cold", uncached, 3)
        hits, misses = cache.hits, cache.misses
        await beside("cold_cached", cold, 20)
        looked = cache.hits - hits + cache.misses - misses
        results["recall_cold_cache_hit_share"] = round((cache.hits - hits) / max(1, looked), 3)
        results["cold_cache_bytes"] = cache.capacity_bytes
        results["tier_placement_cold_run"] = space.health().tier_memories


def _full_collection_ms() -> float:
    """Milliseconds of a full collection of Python's cyclic collector, every thread stopped
    meanwhile (the best of five)."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        gc.collect()
        best = min(best, time.perf_counter() - start)
    return best * 1000.0


def _read_and_crc(directory: Path) -> float:
    """Seconds to read every WAL segment file and CRC32C its bytes (the best of three, from
    the page cache as replay reads them): the bound of replay."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _lsn, path in wal.list_segments(directory):
            crc32c.crc32c(path.read_bytes())
        best = min(best, time.perf_counter() - start)
    return best


def recall_from(space: object, queries: object) -> Callable[[], Awaitable[object]]:
    async def recall() -> object:
        return await space.recall(memories.Query(cue=next(queries), k=10))  # type: ignore[attr-defined, call-overload]

    return recall


_PREPARED_CALLS = 16
"""Calls prepared per caller of the remember benchmark (cycled through)."""


def _prepared_calls(writers: int, per_call: int) -> list[list[list[memories.Draft]]]:
    """Each caller's calls of the remember benchmark, made before the clock starts, as the raw
    baseline's bytes are: every side times the path from input in hand to durable on disk, not
    the making of the input (a client's work, or the gRPC edge's, measured by the gRPC
    benchmarks). A caller cycles through its calls; a draft has no ID, so every call stores
    new memories."""
    rng = np.random.default_rng(1)
    pool = rng.normal(size=(256, DIM)).astype(np.float32)
    return [
        [
            [
                memories.Draft(content=f"w{w} {i + j}", embedding=pool[(w * 7 + i + j) % 256])
                for j in range(per_call)
            ]
            for i in range(0, _PREPARED_CALLS * per_call, per_call)
        ]
        for w in range(writers)
    ]


RememberMany = Callable[[list[memories.Draft]], Awaitable[object]]
Drive = Callable[[RememberMany, int, int, float], Awaitable[float]]
"""`_drive`, or a caller that wraps it (`write_profile` times each thread around it)."""


async def _drive(
    remember_many: RememberMany,
    writers: int,
    per_call: int,
    seconds: float,
) -> float:
    """Memories per second from `writers` concurrent callers of `remember_many`, each cycling
    through its prepared calls of `per_call` drafts (`_prepared_calls`) for `seconds`."""
    calls = _prepared_calls(writers, per_call)
    done = 0
    deadline = time.perf_counter() + seconds

    async def writer(w: int) -> None:
        nonlocal done
        mine = itertools.cycle(calls[w])
        while time.perf_counter() < deadline:
            await remember_many(next(mine))
            done += per_call

    start = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return done / (time.perf_counter() - start)


async def _floor_rate(
    directory: Path, writers: int, per_call: int, seconds: float, drive: Drive = _drive
) -> tuple[float, int]:
    """`_remember_rate` of the write floor (`write_floor`): memories per second and records per
    fsync."""
    floor = write_floor.WriteFloor(directory / "floor.bin", DIM)
    try:
        rate = await drive(floor.remember_many, writers, per_call, seconds)
    finally:
        floor.close()
    return rate, round(floor.count / max(1, floor.log.syncs))


WRITE_SIDES = ("engine", "raw", "floor")


async def _write_rounds(
    root: Path,
    engine_settings: settings.EngineSettings,
    label: str,
    writers: int,
    per_call: int,
    seconds: float,
    quick: bool,
) -> dict[str, list[float]]:
    """The engine, the raw append and the write floor under the same writers, in rounds, each
    side opening a round in turn; every side starts once the disk has written back what the
    one before left in the page cache (`os.sync`), and leaves no file behind. Run one after
    another without, the side after the engine shared the disk with the writeback of the
    engine's closing checkpoint (over a gigabyte): the raw append measured 163,000 records/s
    in one run against 246,000 to 352,000 in others, flattering `remember_vs_raw`."""
    found: dict[str, list[float]] = {
        side: [] for side in (*WRITE_SIDES, "engine_batch", "floor_batch")
    }
    for turn in range(1 if quick else 3):
        for side in WRITE_SIDES[turn:] + WRITE_SIDES[:turn]:
            os.sync()
            directory = root / f"{label}-{side}-{turn}"
            directory.mkdir()
            try:
                if side == "engine":
                    rate, batch = await _engine_rate(
                        directory, engine_settings, label, writers, per_call, seconds
                    )
                elif side == "raw":
                    # The disk's bound for this load: every caller's write in one fdatasync,
                    # the largest group these callers can form, whatever group size the engine
                    # reached (a smaller group would make the baseline slower and flatter the
                    # ratio).
                    rate, batch = _raw_group_commit_rate(directory, writers * per_call, seconds), 0
                else:
                    rate, batch = await _floor_rate(directory, writers, per_call, seconds)
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            found[side].append(rate)
            if side != "raw":
                found[f"{side}_batch"].append(batch)
    return found


async def _engine_rate(
    directory: Path,
    engine_settings: settings.EngineSettings,
    label: str,
    writers: int,
    per_call: int,
    seconds: float,
    drive: Drive = _drive,
) -> tuple[float, int]:
    reg = registry.standalone(directory, engine_settings)
    try:
        space_id = spaces.SpaceId(label.replace("_", "-"))
        await reg.create(space_id, DIM, tiers_config=index.Tiers(hot_capacity=10**7))
        return await _remember_rate(reg, space_id, writers, per_call, seconds, drive)
    finally:
        await reg.close()


async def _remember_rate(
    reg: registry.Registry,
    space_id: spaces.SpaceId,
    writers: int,
    per_call: int,
    seconds: float,
    drive: Drive = _drive,
) -> tuple[float, int]:
    """Memories per second from `writers` concurrent callers, each remembering `per_call`
    memories a call (1: Remember; more: RememberBatch), and the records per fsync achieved."""
    async with reg.lease(space_id) as space:
        syncs_before, stored_before = space._wal.syncs, space.count()
        rate = await drive(space.remember_many, writers, per_call, seconds)
        syncs = space._wal.syncs - syncs_before
        batch = round((space.count() - stored_before) / max(1, syncs))
    return rate, batch


def _raw_group_commit_rate(directory: Path, batch: int, seconds: float) -> float:
    """The same records appended `batch` at a time with one fdatasync each: the disk's bound."""
    memory = memories.Memory(
        id=memories.MemoryId("x" * 32),
        content="w0 12345",
        embedding=np.ones(DIM, np.float32),
        confidence=1.0,
        tags={},
        created_at=1.0,
    )
    # The same bytes the server appends: one batch frame a write of `batch` memories.
    chunk = wal.frame(frames.encode(1, 1.0, DIM, [memory] * batch))
    fd = os.open(directory / "raw.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    count = 0
    try:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            os.write(fd, chunk)
            os.fdatasync(fd)
            count += batch
        return count / (time.perf_counter() - start)
    finally:
        os.close(fd)


CONSOLIDATED = 80_000
"""Memories of 768 floats a consolidation writes in the pause figure: about the 256 MiB of WAL
that starts one by default (`consolidate_wal_bytes`)."""


async def _consolidation_pause(
    root: Path, matrix: npt.NDArray[np.float32], results: dict[str, object], quick: bool
) -> None:
    """The longest a write to a space waits while the space consolidates its hot tier's new
    memories (the checkpoint holds the space's write lock), one write after another, beside
    the bare write + fsync of as many bytes as the checkpoint's run files took."""
    count = 4_000 if quick else CONSOLIDATED
    reg = registry.standalone(
        root / "consolidate", settings.EngineSettings(consolidate_wal_bytes=1 << 40)
    )
    try:
        space_id = spaces.SpaceId("pause")
        await reg.create(space_id, DIM, tiers_config=index.Tiers(hot_capacity=10**7))
        async with reg.lease(space_id) as space:
            for first in range(0, count, 1000):
                rows = matrix[np.arange(first, first + 1000) % matrix.shape[0]]
                await space.remember_many(
                    [
                        memories.Draft(content=f"c{first + i}", embedding=row)
                        for i, row in enumerate(rows)
                    ]
                )
            os.sync()
            consolidating = asyncio.create_task(space.consolidate())
            probe = [memories.Draft(content="probe", embedding=matrix[i]) for i in range(2)]
            paused = 0.0
            while not consolidating.done():  # a writer's longest wait while it runs
                start = time.perf_counter()
                await space.remember_many(probe)
                paused = max(paused, time.perf_counter() - start)
            await consolidating
        run_bytes = sum(path.stat().st_size for path in (root / "consolidate").rglob("run-*.npz"))
    finally:
        await reg.close()
    data = np.zeros(run_bytes, np.uint8)
    data[::4096] = 1  # its pages touched, as the checkpoint's are
    os.sync()
    start = time.perf_counter()
    durable.write_file(root / "bare.bin", data.data)
    bare = time.perf_counter() - start
    (root / "bare.bin").unlink()
    results["consolidation_memories"] = count
    results["consolidation_pause_s"] = round(paused, 3)
    results["consolidation_bare_write_s"] = round(bare, 3)
    results["consolidation_pause_vs_write"] = round(paused / bare, 2)


async def _run(results: dict[str, object], quick: bool) -> None:
    figures: dict[str, float] = {}
    await _measure(figures, results, quick)
    results.update(figures)


async def _measure(figures: dict[str, float], results: dict[str, object], quick: bool) -> None:
    rows = 5_000 if quick else 100_000
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(rows, DIM)).astype(np.float32)
    cues = rng.normal(size=(10, DIM)).astype(np.float32)
    results["recall_rows"] = rows
    gc.collect()
    gc.freeze()  # what the server does once it has started (`importing.warm_up`)
    results["gc_full_collection_empty_ms"] = round(_full_collection_ms(), 2)
    faiss_search = _baselines(matrix, cues, figures)
    with tempfile.TemporaryDirectory(
        prefix="memspace-bench-", dir=os.environ.get("MEMSPACE_BENCH_DIR")
    ) as tmp:
        root = Path(tmp)
        big = settings.EngineSettings(consolidate_wal_bytes=1 << 40)
        reg = registry.standalone(
            root / "recall", dataclasses.replace(big, cold_cache_bytes=COLD_CACHE_BYTES)
        )
        try:
            space_id = spaces.SpaceId("bench")
            await reg.create(space_id, DIM, tiers_config=index.Tiers(hot_capacity=rows * 2))
            await _recall_figures(reg, space_id, matrix, cues, figures, results, faiss_search)
        finally:
            await reg.close()
        seconds = 1.0 if quick else 4.0
        for label, writers, per_call in (("remember", 8, 100), ("remember_single", 64, 1)):
            found = await _write_rounds(root, big, label, writers, per_call, seconds, quick)
            rate, raw, floor = (statistics.median(found[side]) for side in WRITE_SIDES)
            results[f"{label}_per_s"] = round(rate)
            results[f"{label}_records_per_fsync"] = round(statistics.median(found["engine_batch"]))
            results[f"raw_group_commit_{label}_per_s"] = round(raw)
            results[f"{label}_vs_raw"] = round(rate / raw, 3)
            results[f"{label}_floor_per_s"] = round(floor)
            results[f"{label}_floor_records_per_fsync"] = round(
                statistics.median(found["floor_batch"])
            )
            results[f"{label}_floor_vs_raw"] = round(floor / raw, 3)
            results[f"{label}_vs_floor"] = round(rate / floor, 3)
        results["raw_group_commit_per_s"] = results["raw_group_commit_remember_per_s"]
        os.sync()
        await _consolidation_pause(root, matrix, results, quick)
    for tier in ("hot", "warm", "cold", "cold_cached"):
        # Against the faiss searches taken between its own calls (`_atime_beside`).
        faiss_ms = figures[f"faiss_beside_{tier}_ms"]
        results[f"recall_{tier}_vs_faiss"] = round(figures[f"recall_{tier}_100k_ms"] / faiss_ms, 3)


def run(results: dict[str, object], quick: bool = False) -> None:
    asyncio.run(_run(results, quick))
