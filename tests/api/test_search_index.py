"""spec.index over the API: Recall's `exact`, and the search index in Health and the metrics,
against a real server holding a space whose index entry asks for an HNSW graph."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np

from memspace_contract import index, spaces
from memspace_contract.v1 import memspace_pb2 as pb
from tests.api.conftest import (
    DIM,
    Api,
    Running,
    Start,
    details,
    eventually,
    failure,
    md,
    memspace_serve,
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


async def index_status(running: Running | Api) -> pb.SearchIndexStatus:
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


async def test_a_server_killed_during_a_build_builds_the_graph_again_on_restart(
    tmp_path: Path, managed_dirs: tuple[Path, Path], admin_token_file: Path
) -> None:
    index_dir, volumes = managed_dirs
    dim, rows = 96, 18_000
    write_entry(
        index_dir,
        TEAM,
        token="ta",
        dim=dim,
        volumes=volumes,
        tiers=index.Tiers(hot_capacity=10),
        search=index.SearchIndex(type="hnsw", ef_construction=200),
    )
    args = ["--data-root", str(volumes), "--index-dir", str(index_dir), "--listen", "127.0.0.1:0"]
    args += ["--admin-token-file", str(admin_token_file), "--metrics-listen", "off"]
    rng = np.random.default_rng(13)
    # Around 100 centres, as embeddings of text lie (i.i.d. Gaussian rows have no neighbours).
    centres = rng.normal(size=(100, dim)).astype(np.float32)
    matrix = (
        centres[rng.integers(0, 100, rows)] + rng.normal(size=(rows, dim)).astype(np.float32) / 3
    )
    cues = centres[:10] + rng.normal(size=(10, dim)).astype(np.float32) / 3
    with memspace_serve(args, tmp_path / "log-1") as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            api = Api(channel)
            for first in range(0, rows, 6_000):

                async def requests(first: int = first) -> AsyncIterator[pb.RememberRequest]:
                    for i in range(first, first + 6_000):
                        embedding = matrix[i].tolist()
                        yield pb.RememberRequest(
                            memory=pb.Memory(content=f"m{i}", embedding=embedding)
                        )

                await api.memories.RememberBatch(requests(), metadata=md(TEAM, "ta"))
            await api.memories.Consolidate(pb.ConsolidateRequest(), metadata=md(TEAM, "ta"))
            # Killed while the graph of every row is being built (it takes seconds); a graph
            # of the rows of an earlier consolidation may be saved already.
            status = await index_status(api)
            server.popen.send_signal(signal.SIGKILL)
            server.popen.wait()
            assert status.build_state == "building"
            assert status.rows_indexed < rows - 10
    folder = volumes / TEAM / "warm" / ".ann"
    with memspace_serve(args, tmp_path / "log-2") as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            api = Api(channel)
            exact = [
                await api.memories.Recall(
                    pb.RecallRequest(cue=cue.tolist(), k=10, exact=True), metadata=md(TEAM, "ta")
                )
                for cue in cues
            ]
            for _ in range(1200):
                status = await index_status(api)
                if status.build_state == "ready":
                    break
                await asyncio.sleep(0.1)
            assert status.build_state == "ready"
            assert status.rows_indexed >= rows - 10
            assert [p.suffix for p in sorted(folder.iterdir())] == [".faiss", ".json"]
            overlap = 0
            for cue, truth in zip(cues, exact, strict=True):
                found = await api.memories.Recall(
                    pb.RecallRequest(cue=cue.tolist(), k=10), metadata=md(TEAM, "ta")
                )
                overlap += len(
                    {h.memory.id for h in found.hits} & {h.memory.id for h in truth.hits}
                )
            assert overlap >= 90


async def test_create_space_takes_the_index_and_refuses_a_bad_one(standalone: Running) -> None:
    asked = pb.SpaceIndex(type="hnsw", m=16, ef_search=40)
    made = await standalone.spaces.CreateSpace(
        pb.CreateSpaceRequest(space="graph", embedding_dim=DIM, index=asked)
    )
    assert made.index == pb.SpaceIndex(
        type="hnsw", auto_threshold=200_000, m=16, ef_construction=100, ef_search=40
    )
    listed = await standalone.spaces.ListSpaces(pb.ListSpacesRequest())
    assert next(s for s in listed.spaces if s.space == "graph").index == made.index
    bad = standalone.spaces.CreateSpace(
        pb.CreateSpaceRequest(space="bad", embedding_dim=DIM, index=pb.SpaceIndex(m=2))
    )
    err = await failure(bad)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "index.m" in details(err)
