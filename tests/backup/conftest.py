"""Fixtures of the backup tests: a real MinIO on loopback (built by `make k8s-tools`), a fresh
bucket per test, and real spaces on real files under tmp_path."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

from memspace_contract import index, spaces
from memspace_server.storage import memories, objects, registry, settings
from tests.reliability.conftest import Servers
from tests.support import minio

DIM = 16
_buckets = itertools.count()


@pytest.fixture(scope="session")
def minio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[minio.Minio]:
    with minio.running(tmp_path_factory.mktemp("minio")) as server:
        yield server


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    """`memspace serve` processes (tests/reliability): all are killed at the end of the test."""
    made = Servers(tmp_path)
    yield made
    made.kill_all()


@pytest.fixture
def bucket(minio_server: minio.Minio) -> str:
    return minio_server.make_bucket(f"test-{next(_buckets)}")


@pytest.fixture
def target_config(minio_server: minio.Minio, bucket: str) -> objects.TargetConfig:
    return objects.TargetConfig(
        url=minio_server.url(bucket, "backups"),
        endpoint=minio_server.endpoint,
        region=minio_server.region,
        access_key_id=minio_server.access_key,
        secret_access_key=minio_server.secret_key,
        retry_timeout_s=2.0,
        connect_timeout_s=1.0,
    )


@pytest.fixture
def target(target_config: objects.TargetConfig) -> objects.Target:
    return objects.Target(target_config)


@pytest.fixture
def engine_settings() -> settings.EngineSettings:
    return settings.EngineSettings(chunk_rows=16, wal_segment_bytes=16 * 1024)


@pytest.fixture
async def spaces_registry(
    tmp_path: Path, engine_settings: settings.EngineSettings
) -> AsyncIterator[registry.Registry]:
    reg = registry.standalone(tmp_path / "data", engine_settings)
    yield reg
    await reg.close()


@dataclasses.dataclass
class Ledger:
    """What a space acknowledged: each memory's content and embedding by ID, and its LSN."""

    memories: dict[str, tuple[str, np.ndarray, int]] = dataclasses.field(default_factory=dict)

    def through(self, lsn: int) -> dict[str, tuple[str, np.ndarray, int]]:
        return {k: v for k, v in self.memories.items() if v[2] <= lsn}


async def make_space(
    reg: registry.Registry, name: str = "alpha", hot: int = 40, warm: int = 120, dim: int = DIM
) -> spaces.SpaceId:
    space_id = spaces.parse_space_id(name)
    await reg.create(space_id, dim, tiers_config=index.Tiers(hot_capacity=hot, warm_capacity=warm))
    return space_id


async def remember(
    reg: registry.Registry,
    space_id: spaces.SpaceId,
    ledger: Ledger,
    count: int,
    rng: np.random.Generator,
    batch: int = 50,
) -> None:
    """Store `count` memories in batches of `batch`, noting each in the ledger."""
    dim = reg.entry(space_id).embedding_dim
    done = 0
    while done < count:
        size = min(batch, count - done)
        drafts = [
            memories.Draft(
                content=f"memory {len(ledger.memories) + i}",
                embedding=rng.normal(size=dim).astype(np.float32),
            )
            for i in range(size)
        ]
        async with reg.lease(space_id) as space:
            _, last, ids = await space.remember_many(drafts)
        for offset, (memory_id, d) in enumerate(zip(ids, drafts, strict=True)):
            ledger.memories[memory_id] = (d.content, d.embedding, last - size + 1 + offset)
        done += size


async def check_holds(
    reg: registry.Registry,
    space_id: spaces.SpaceId,
    expected: dict[str, tuple[str, np.ndarray, int]],
) -> None:
    """The space holds exactly `expected`: every memory with its content and embedding."""
    async with reg.lease(space_id) as space:
        assert space.count() == len(expected)
        for memory_id, (content, embedding, _) in expected.items():
            memory = await space.get(memory_id)
            assert memory.content == content
            np.testing.assert_array_equal(np.asarray(memory.embedding, np.float32), embedding)
