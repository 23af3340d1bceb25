"""spec.index over the API: Recall's `exact`, and the search index in Health and the metrics,
against a real server holding a space whose index entry asks for an HNSW graph."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from memspace_contract import index, spaces
from memspace_contract.v1 import memspace_pb2 as pb
from tests.api.conftest import (
    DIM,
    Running,
    Start,
    eventually,
    md,
    write_entry,
)
from tests.api.test_health import scrape

TEAM = spaces.SpaceId("team-a")
ROWS = 400


async def filled(start: Start, managed_dirs: tuple[Path, Path], admin_token_file: Path) -> Running:
    index_dir, volumes = managed_dirs
    write_entry(
        index_dir,
        TEAM,
        token="ta",
        volumes=volumes,
        tiers=index.Tiers(hot_capacity=10),
        search=index.SearchIndex(type="hnsw", m=16, ef_construction=64, ef_search=64),
    )
    running = await start(
        data_root=volumes,
        index_dir=index_dir,
        admin_token_file=admin_token_file,
        recall_sample=1.0,
        metrics_listen="127.0.0.1:0",
        metrics_interval_s=0.1,
    )
    rng = np.random.default_rng(11)

    async def requests() -> AsyncIterator[pb.RememberRequest]:
        for i in range(ROWS):
            embedding = rng.normal(size=DIM).tolist()
            yield pb.RememberRequest(memory=pb.Memory(content=f"m{i}", embedding=embedding))

    await running.memories.RememberBatch(requests(), metadata=md(TEAM, "ta"))
    await running.memories.Consolidate(pb.ConsolidateRequest(), metadata=md(TEAM, "ta"))
    return running


async def index_status(running: Running) -> pb.SearchIndexStatus:
    answer = await running.spaces.Health(pb.HealthRequest(space=TEAM), metadata=md(token="ta"))
    (found,) = answer.spaces
    assert found.HasField("index")
    return found.index


async def test_health_shows_the_graph_and_the_recall_measured(
    start: Start, managed_dirs: tuple[Path, Path], admin_token_file: Path
) -> None:
    running = await filled(start, managed_dirs, admin_token_file)

    async def ready() -> bool:
        return (await index_status(running)).build_state == "ready"

    await eventually(ready)
    status = await index_status(running)
    assert (status.type, status.configured_type) == ("hnsw", "hnsw")
    assert ROWS - 10 <= status.rows_indexed <= ROWS
    assert not status.HasField("recall")
    assert status.recall_samples == 0

    rng = np.random.default_rng(12)
    for _ in range(5):
        cue = rng.normal(size=DIM).tolist()
        await running.memories.Recall(pb.RecallRequest(cue=cue, k=10), metadata=md(TEAM, "ta"))
        await asyncio.sleep(0.05)

    async def measured() -> bool:
        return (await index_status(running)).recall_samples >= 1

    await eventually(measured)
    status = await index_status(running)
    assert status.HasField("recall")
    assert 0.9 <= status.recall <= 1.0
    port = running.server.metrics_port
    assert port is not None

    async def exported() -> bool:
        return f'memspace_space_recall_at_k{{space="{TEAM}"}}' in await asyncio.to_thread(
            scrape, port
        )

    await eventually(exported)
    text = await asyncio.to_thread(scrape, port)
    assert f'memspace_space_index_rows{{space="{TEAM}",state="ready",type="hnsw"}}' in text


async def test_recall_exact_true_scans_every_row(
    start: Start, managed_dirs: tuple[Path, Path], admin_token_file: Path
) -> None:
    running = await filled(start, managed_dirs, admin_token_file)

    async def ready() -> bool:
        return (await index_status(running)).build_state == "ready"

    await eventually(ready)
    every = await running.memories.Recall(
        pb.RecallRequest(cue=[1.0, 0.5, 0.0, -0.5], k=ROWS, exact=True, include_embeddings=True),
        metadata=md(TEAM, "ta"),
    )
    assert len(every.hits) == ROWS
    matrix = np.array([hit.memory.embedding for hit in every.hits], np.float32)
    cue = np.array([1.0, 0.5, 0.0, -0.5], np.float32)
    scores = matrix @ cue / np.linalg.norm(matrix, axis=1) / np.linalg.norm(cue)
    assert np.all(np.diff(scores) <= 1e-6)  # best first: an exact ranking of every memory
    exact = await running.memories.Recall(
        pb.RecallRequest(cue=cue.tolist(), k=10, exact=True), metadata=md(TEAM, "ta")
    )
    assert [hit.memory.id for hit in exact.hits] == [hit.memory.id for hit in every.hits[:10]]
