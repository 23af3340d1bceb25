"""Approximate search (storage/ann.py) against the exact scan of the same space, in one run:

- ann_recall_at_10: mean recall@10 of recalls through the HNSW graph against `exact: true`
  recalls of the same cues on the same space (the exact scan is the ground truth);
- ann_vs_exact_latency: median Recall through the graph / median exact Recall (whole
  `Space.recall` calls, hits read from the tier included), and ann_graph_vs_scan the same for the
  bare graph search against a bare numpy scan;
- ann_memory_overhead: bytes of the graphs / bytes of the raw float32 vectors;
- ann_build_rows_per_s: rows indexed per second by the background build after consolidation
  (with `ann_build_threads` = 2, the machine's cores: nothing else runs in the bench);
- ann_restart_s: from unloading the space to its first Recall served through the saved graph
  (no rebuild), beside restart_exact_s, the same space opened with `index.type: exact`
  (ann_restart_vs_exact is their ratio, the target within 1.5).

The data: 768-dimensional vectors drawn around 2,000 random centres (each a centre plus Gaussian
noise of a third of its norm), the cues drawn the same way, all new to the space. Embeddings of
real text have such neighbourhoods; i.i.d. Gaussian vectors have none (every point is almost
equally far from every other), which no graph index searches well, so they are not used here.
The size is ANN_ROWS (200,000 by default, 20,000 with --quick): the largest whose build fits
the bench's three to four minutes on the 2-core machine. The estimate: faiss inserts about 1,000
rows of 768 per CPU-second at m 32, efConstruction 100 (measured by process time, which a busy
machine does not inflate much), so 200,000 rows take about two minutes on two quiet cores, and
the rest (remembering, consolidating, 400 recalls, two restarts) about one. 1,000,000 rows would
take over ten minutes of build alone. MEMSPACE_ANN_ROWS overrides the size.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from memspace_contract import index, spaces
from memspace_server.storage import memories, registry, settings, tiers

DIM = 768
ANN_ROWS = 200_000
CENTRES = 2_000
QUERIES = 200
BATCH = 2_000


def _vectors(rng: np.random.Generator, centres: np.ndarray, count: int) -> np.ndarray:
    picked = centres[rng.integers(0, centres.shape[0], count)]
    noise = rng.normal(size=(count, DIM)).astype(np.float32) / 3.0
    vectors: np.ndarray = (picked + noise).astype(np.float32)
    return vectors


async def _ids(space: object, query: memories.Query) -> list[str]:
    hits = await space.recall(query)  # type: ignore[attr-defined]
    return [hit.memory.id for hit in hits]


async def _timed(space: object, cues: np.ndarray, exact: bool) -> tuple[float, list[list[str]]]:
    samples, found = [], []
    for cue in cues:
        start = time.perf_counter()
        found.append(await _ids(space, memories.Query(cue=cue, k=10, exact=exact)))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), found


async def _restart_s(reg: registry.Registry, space_id: spaces.SpaceId, cue: np.ndarray) -> float:
    await reg.unload(space_id)
    start = time.perf_counter()
    async with reg.lease(space_id) as space:
        await space.recall(memories.Query(cue=cue, k=10))
    return time.perf_counter() - start


async def _measure(results: dict[str, object], rows: int) -> None:
    rng = np.random.default_rng(17)
    centres = rng.normal(size=(CENTRES, DIM)).astype(np.float32)
    cues = _vectors(rng, centres, QUERIES)
    engine = settings.EngineSettings(
        consolidate_wal_bytes=1 << 40, ann_build_threads=2, ann_recall_sample=0.0
    )
    with tempfile.TemporaryDirectory(
        prefix="memspace-ann-bench-", dir=os.environ.get("MEMSPACE_BENCH_DIR")
    ) as tmp:
        reg = registry.standalone(Path(tmp) / "data", engine)
        try:
            space_id = spaces.SpaceId("ann")
            search = index.SearchIndex(type="hnsw")
            await reg.create(space_id, DIM, tiers_config=index.Tiers(hot_capacity=1), search=search)
            async with reg.lease(space_id) as space:
                for start in range(0, rows, BATCH):
                    count = min(BATCH, rows - start)
                    drafts = [
                        memories.Draft(content=f"memory {start + i}", embedding=vector)
                        for i, vector in enumerate(_vectors(rng, centres, count))
                    ]
                    await space.remember_many(drafts)
                await space.consolidate()
                built = time.perf_counter()
                status = await space.index_built()
                build_s = time.perf_counter() - built
                assert status.state == "ready", status
                exact_s, truth = await _timed(space, cues, exact=True)
                ann_s, found = await _timed(space, cues, exact=False)
                graph = space.ann.graphs[tiers.WARM]
                raw_bytes = space.warm.rows * DIM * 4
                results["ann_memory_overhead"] = round(graph.nbytes() / raw_bytes, 3)
                vectors = space.warm.vectors_between(0, space.warm.rows)
                vectors /= tiers.norms(vectors)[:, None]
            recall = [len(set(a) & set(t)) / len(t) for a, t in zip(found, truth, strict=True) if t]
            results["ann_rows"] = rows
            results["ann_recall_at_10"] = round(statistics.mean(recall), 4)
            results["ann_recall_ms"] = round(ann_s * 1000, 3)
            results["exact_recall_ms"] = round(exact_s * 1000, 3)
            results["ann_vs_exact_latency"] = round(ann_s / exact_s, 4)
            results["ann_build_rows_per_s"] = round(status.rows / build_s)
            results["ann_index"] = dataclasses.asdict(search)
            results["ann_graph_vs_scan"] = round(_bare_ratio(graph, vectors, cues), 4)
            del vectors
            restart = await _restart_s(reg, space_id, cues[0])
            exact_entry = dataclasses.replace(
                reg.entries()[space_id], search=index.SearchIndex(type="exact")
            )
            async with reg.lease(space_id) as space:
                assert space.ann.approximate(space.warm, space.cold)
                space.reconfigure(exact_entry)
            reg.catalog.put(exact_entry)
            baseline = await _restart_s(reg, space_id, cues[0])
            results["ann_restart_s"] = round(restart, 3)
            results["restart_exact_s"] = round(baseline, 3)
            results["ann_restart_vs_exact"] = round(restart / baseline, 3)
        finally:
            await reg.close()


def _bare_ratio(graph: object, vectors: np.ndarray, cues: np.ndarray) -> float:
    """Median bare graph search / median bare numpy scan of the same unit vectors."""
    graph_samples, scan_samples = [], []
    for cue in cues[:50]:
        cue_unit = tiers.unit(cue)
        start = time.perf_counter()
        graph.search(cue_unit, 10, index.DEFAULT_EF_SEARCH, None)  # type: ignore[attr-defined]
        graph_samples.append(time.perf_counter() - start)
        start = time.perf_counter()
        scores = vectors @ cue_unit
        np.argpartition(scores, scores.shape[0] - 10)[-10:]
        scan_samples.append(time.perf_counter() - start)
    return statistics.median(graph_samples) / statistics.median(scan_samples)


def run(results: dict[str, object], quick: bool = False) -> None:
    rows = int(os.environ.get("MEMSPACE_ANN_ROWS", 20_000 if quick else ANN_ROWS))
    asyncio.run(_measure(results, rows))
