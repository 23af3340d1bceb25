"""Fixtures of the storage engine tests: real spaces on real files under tmp_path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from memspace_contract import index, spaces
from memspace_server.storage import memories, registry, settings

DIM = 16


@pytest.fixture
def engine_settings() -> settings.EngineSettings:
    return settings.EngineSettings(chunk_rows=16, wal_segment_bytes=64 * 1024)


@pytest.fixture
async def spaces_registry(
    tmp_path: Path, engine_settings: settings.EngineSettings
) -> AsyncIterator[registry.Registry]:
    reg = registry.standalone(tmp_path / "data", engine_settings)
    yield reg
    await reg.close()


def vec(rng: np.random.Generator, dim: int = DIM) -> np.ndarray:
    return rng.normal(size=dim).astype(np.float32)


def draft(rng: np.random.Generator, content: str = "", **kwargs: object) -> memories.Draft:
    return memories.Draft(content=content or "memory", embedding=vec(rng), **kwargs)  # type: ignore[arg-type]


async def make_space(
    reg: registry.Registry,
    name: str = "alpha",
    hot: int = 100_000,
    warm: int = 1_000_000,
    compression: index.Compression = "zstd",
    quota: index.Quota | None = None,
) -> spaces.SpaceId:
    space_id = spaces.parse_space_id(name)
    await reg.create(
        space_id,
        DIM,
        tiers_config=index.Tiers(
            hot_capacity=hot, warm_capacity=warm, cold_compression=compression
        ),
        quota=quota,
    )
    return space_id
