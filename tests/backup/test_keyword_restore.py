"""A backup leaves the keyword index out (it is derived data in a dot folder); the restored
space rebuilds it from its tiers on its first keyword recall and finds exactly what the backup
holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memspace_contract import spaces
from memspace_server.storage import backups, keywords, memories, objects, registry, settings
from tests.backup.conftest import DIM, make_space
from tests.backup.test_backups import restored


def by_keyword(text: str) -> memories.Query:
    return memories.Query(cue=np.zeros(0, np.float32), k=1000, mode=memories.KEYWORD, text=text)


async def test_a_restored_space_rebuilds_its_keyword_index_from_the_backup(
    tmp_path: Path,
    spaces_registry: registry.Registry,
    engine_settings: settings.EngineSettings,
) -> None:
    rng = np.random.default_rng(4)
    target = objects.Target(objects.TargetConfig(url=str(tmp_path / "backups")))
    space_id = await make_space(spaces_registry)
    async with spaces_registry.lease(space_id) as space:
        _, _, ids = await space.remember_many(
            [
                memories.Draft(
                    content=f"report{i} {'urgent' if i % 3 == 0 else 'routine'}",
                    embedding=rng.normal(size=DIM).astype(np.float32),
                )
                for i in range(200)
            ]
        )
        await space.consolidate()  # warm and cold too
        await space.forget(ids[0])
        urgent = {ids[i] for i in range(3, 200, 3)}
        assert {hit.memory.id for hit in await space.recall(by_keyword("urgent"))} == urgent
        manifest = await backups.create(space, target, spaces_registry.executor)
        # Written after the backup: the restored space never sees it.
        await space.remember(
            memories.Draft(
                content="urgent later", embedding=rng.normal(size=DIM).astype(np.float32)
            )
        )
    assert not [f.path for f in manifest.files if keywords.FOLDER in f.path]
    rebuilds = keywords.KeywordIndex.rebuilds
    reg = await restored(tmp_path, target, manifest, engine_settings)
    try:
        async with reg.lease(spaces.parse_space_id("restored")) as space:
            found = await space.recall(by_keyword("urgent"))
            assert {hit.memory.id for hit in found} == urgent
            assert len(await space.recall(by_keyword("report0"))) == 0
        assert keywords.KeywordIndex.rebuilds == rebuilds + 1
    finally:
        await reg.close()
