"""Keyword and hybrid recall (storage/keywords.py) against vector-only recall of the same space,
in one run, through whole `Space.recall` calls (hits read from the tiers included):

- hybrid_recall_ms: median hybrid recall (k 10: the vector half's top 50 and the keyword half's
  top 50, fused by reciprocal rank) of a space of KEYWORD_ROWS memories; vector_recall_ms the
  median vector-only recall of the same cues; hybrid_vs_vector their ratio (target <= 2);
- keyword_recall_ms: median keyword-only recall of the same queries;
- keyword_index_bytes_per_memory: bytes of the space's `.keyword/` folder / memories;
- keyword_build_s: building the index of the whole space from its tiers (what a recall pays
  after a crash or a restore), keyword_build_per_s the memories a second;
- keyword_first_recall_after_reopen_ms: after the space is unloaded and loaded again
  (space_reopen_s, its first vector recall), its first keyword recall, served from the persisted
  index (no rebuild: the bench checks the rebuild counter; compare keyword_build_s);
- keyword_write_then_recall_ms: a Remember followed by a keyword recall (which commits the
  pending write first: the price of an index that is committed lazily), median.

The data: 768-dimensional Gaussian vectors (vector recall scans every row exactly, so their
distribution does not matter) and texts of 20 words drawn from a Zipf-like vocabulary of 50,000
words; the queries are two or three words of that vocabulary. KEYWORD_ROWS is 100,000 (10,000
with --quick); MEMSPACE_KEYWORD_ROWS overrides it.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from memspace_contract import index, spaces
from memspace_server.storage import keywords, memories, registry, settings

DIM = 768
KEYWORD_ROWS = 100_000
VOCABULARY = 50_000
WORDS = 20
QUERIES = 100
BATCH = 2_000


def _texts(rng: np.random.Generator, count: int, words: int) -> list[str]:
    ranks = np.minimum(rng.zipf(1.3, size=(count, words)), VOCABULARY) - 1
    return [" ".join(f"w{r}" for r in row) for row in ranks.tolist()]


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


async def _median_ms(space: object, queries: list[memories.Query]) -> float:
    samples = []
    for query in queries:
        start = time.perf_counter()
        await space.recall(query)  # type: ignore[attr-defined]
        samples.append(time.perf_counter() - start)
    return 1000 * statistics.median(samples)


async def _measure(results: dict[str, object], rows: int, root: Path) -> None:
    rng = np.random.default_rng(23)
    reg = registry.standalone(root, settings.EngineSettings())
    space_id = spaces.parse_space_id("keywords")
    await reg.create(
        space_id, DIM, tiers_config=index.Tiers(hot_capacity=rows, warm_capacity=10 * rows)
    )
    try:
        async with reg.lease(space_id) as space:
            for first in range(0, rows, BATCH):
                count = min(BATCH, rows - first)
                vectors = rng.normal(size=(count, DIM)).astype(np.float32)
                texts = _texts(rng, count, WORDS)
                await space.remember_many(
                    [
                        memories.Draft(content=text, embedding=vector)
                        for text, vector in zip(texts, vectors, strict=True)
                    ]
                )
            await space.consolidate()
            cues = rng.normal(size=(QUERIES, DIM)).astype(np.float32)
            texts = [_texts(rng, 1, int(n))[0] for n in rng.integers(2, 4, QUERIES)]
            empty = np.zeros(0, np.float32)
            start = time.perf_counter()
            await space.recall(
                memories.Query(cue=empty, k=10, mode=memories.KEYWORD, text=texts[0])
            )
            build_s = time.perf_counter() - start
            by_vector = [memories.Query(cue=cue, k=10) for cue in cues]
            by_keyword = [
                memories.Query(cue=empty, k=10, mode=memories.KEYWORD, text=text) for text in texts
            ]
            hybrid = [
                memories.Query(cue=cue, k=10, mode=memories.HYBRID, text=text)
                for cue, text in zip(cues, texts, strict=True)
            ]
            # Interleaved rounds, so that a busy spell of the machine weighs on both alike.
            vector_ms, hybrid_ms, keyword_ms = [], [], []
            for part in range(4):
                pick = slice(part * QUERIES // 4, (part + 1) * QUERIES // 4)
                vector_ms.append(await _median_ms(space, by_vector[pick]))
                hybrid_ms.append(await _median_ms(space, hybrid[pick]))
                keyword_ms.append(await _median_ms(space, by_keyword[pick]))
            writes = []
            for i in range(20):
                draft = memories.Draft(content=f"fresh{i} w1 w2", embedding=cues[i])
                begin = time.perf_counter()
                await space.remember(draft)
                await space.recall(
                    memories.Query(cue=empty, k=10, mode=memories.KEYWORD, text=f"fresh{i}")
                )
                writes.append(time.perf_counter() - begin)
            await space.consolidate()  # commits the keyword index too
            folder = space.directory.root / keywords.FOLDER
            index_bytes = _folder_bytes(folder)
            memories_now = space.count()
        rebuilds = keywords.KeywordIndex.rebuilds
        await reg.unload(space_id)
        start = time.perf_counter()
        async with reg.lease(space_id) as space:
            await space.recall(by_vector[0])
            loaded = time.perf_counter()
            await space.recall(by_keyword[0])
            first_keyword_s = time.perf_counter() - loaded
        reopen_s = loaded - start
        if keywords.KeywordIndex.rebuilds != rebuilds:
            raise AssertionError("reopening the space rebuilt its keyword index")
    finally:
        await reg.close()
    vector = statistics.median(vector_ms)
    both = statistics.median(hybrid_ms)
    results["keyword_rows"] = rows
    results["vector_recall_ms"] = round(vector, 2)
    results["hybrid_recall_ms"] = round(both, 2)
    results["hybrid_vs_vector"] = round(both / vector, 2)
    results["keyword_recall_ms"] = round(statistics.median(keyword_ms), 2)
    results["keyword_index_bytes_per_memory"] = round(index_bytes / memories_now, 1)
    results["keyword_build_s"] = round(build_s, 2)
    results["keyword_build_per_s"] = round(rows / build_s)
    results["space_reopen_s"] = round(reopen_s, 2)
    results["keyword_first_recall_after_reopen_ms"] = round(1000 * first_keyword_s, 1)
    results["keyword_write_then_recall_ms"] = round(1000 * statistics.median(writes), 1)


def run(results: dict[str, object], quick: bool = False) -> None:
    rows = int(os.environ.get("MEMSPACE_KEYWORD_ROWS", 10_000 if quick else KEYWORD_ROWS))
    with tempfile.TemporaryDirectory(prefix="memspace-keyword-bench-") as tmp:
        asyncio.run(_measure(results, rows, Path(tmp)))
