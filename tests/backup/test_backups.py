"""Backups of a space to a real MinIO through S3, and restores from them (storage/backups.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from memspace_contract import index, spaces
from memspace_server import errors
from memspace_server.storage import backups, layout, memories, objects, registry, settings
from tests.backup.conftest import DIM, Ledger, check_holds, make_space, remember
from tests.support import minio


async def restored(
    tmp_path: Path,
    target: objects.Target,
    manifest: backups.Manifest,
    engine_settings: settings.EngineSettings,
    name: str = "restored",
) -> registry.Registry:
    """A new data root with the backup restored into it as space `name`."""
    reg = registry.standalone(tmp_path / f"data-{name}", engine_settings)
    new_id = spaces.parse_space_id(name)
    await backups.restore(
        target,
        manifest.space_id,
        manifest.backup_id,
        reg.volume(new_id),
        space_id=new_id,
        executor=reg.executor,
    )
    reg.catalog.put(backups.index_entry(manifest, new_id))
    return reg


async def test_a_restored_space_holds_every_memory_of_its_backup_in_every_tier(
    tmp_path: Path,
    spaces_registry: registry.Registry,
    target: objects.Target,
    engine_settings: settings.EngineSettings,
) -> None:
    rng = np.random.default_rng(1)
    ledger = Ledger()
    space_id = await make_space(spaces_registry)
    await remember(spaces_registry, space_id, ledger, 300, rng)
    async with spaces_registry.lease(space_id) as space:
        await space.consolidate()  # hot, warm and cold tiers on disk
    await remember(spaces_registry, space_id, ledger, 30, rng)  # and some only in the WAL
    async with spaces_registry.lease(space_id) as space:
        tier_counts = dict(space.health().tier_memories.items())
        manifest = await backups.create(space, target, spaces_registry.executor)
    assert all(tier_counts[t] > 0 for t in ("hot", "warm", "cold")), tier_counts
    assert manifest.memories == 330
    assert manifest.lsn == max(v[2] for v in ledger.memories.values())
    # A first backup uploads every distinct content once (equal files, such as the metadata of
    # like arrays, are one object).
    assert manifest.bytes_uploaded == sum({f.sha256: f.size for f in manifest.files}.values())
    paths = {f.path for f in manifest.files}
    assert {"space.json", "hot/checkpoint.json"} <= paths
    assert any(p.startswith("warm/") for p in paths)
    assert any(p.startswith("cold/") for p in paths)
    assert any(p.startswith("wal/") for p in paths)

    reg = await restored(tmp_path, target, manifest, engine_settings)
    try:
        await check_holds(reg, spaces.parse_space_id("restored"), ledger.memories)
        async with reg.lease(spaces.parse_space_id("restored")) as space:
            assert space.health().tier_memories == tier_counts
            assert space.entry.tiers == index.Tiers(hot_capacity=40, warm_capacity=120)
            # The restored space takes writes after what it restored.
            _, lsn, _ = await space.remember_many(
                [memories.Draft(content="after", embedding=rng.normal(size=DIM).astype(np.float32))]
            )
            assert lsn == manifest.lsn + 1
    finally:
        await reg.close()
    identity = json.loads((tmp_path / "data-restored/spaces/restored/space.json").read_text())
    assert identity["spaceId"] == "restored"
    assert identity["restoredFrom"] == {"spaceId": "alpha", "backupId": manifest.backup_id}


async def test_a_second_backup_uploads_only_what_changed(
    spaces_registry: registry.Registry, target: objects.Target
) -> None:
    rng = np.random.default_rng(2)
    ledger = Ledger()
    # Embeddings of a real size: with tiny ones, the checkpoint's index of hot memories (IDs and
    # recall statistics, rewritten whole at each checkpoint) would outweigh the data.
    space_id = await make_space(spaces_registry, hot=2000, warm=20000, dim=768)
    await remember(spaces_registry, space_id, ledger, 3000, rng, batch=500)
    async with spaces_registry.lease(space_id) as space:
        await space.consolidate()
        first = await backups.create(space, target, spaces_registry.executor)
    await remember(spaces_registry, space_id, ledger, 30, rng)  # 1% new memories
    async with spaces_registry.lease(space_id) as space:
        await space.consolidate()
        second = await backups.create(space, target, spaces_registry.executor)
    assert second.memories == 3030
    assert second.lsn == first.lsn + 30
    assert second.bytes >= first.bytes
    assert 0 < second.bytes_uploaded <= 0.05 * second.bytes, (second.bytes_uploaded, second.bytes)
    # Both backups are listed, oldest first, and each restores on its own.
    listed = await backups.list_backups(target, space_id)
    assert [b.backup_id for b in listed] == [first.backup_id, second.backup_id]


async def test_backups_are_listed_in_the_order_they_were_taken_whatever_their_ids(
    spaces_registry: registry.Registry, target: objects.Target
) -> None:
    rng = np.random.default_rng(5)
    ledger = Ledger()
    space_id = await make_space(spaces_registry)
    taken = []
    # IDs that sort against the order the backups are taken (as two made in one instant can).
    for backup_id in ("z-taken-first", "m-taken-second", "a-taken-third"):
        await remember(spaces_registry, space_id, ledger, 5, rng)
        async with spaces_registry.lease(space_id) as space:
            taken.append(await backups.create(space, target, spaces_registry.executor, backup_id))
    listed = await backups.list_backups(target, space_id)
    assert [b.backup_id for b in listed] == [b.backup_id for b in taken]
    # Pruning keeps the newest, not the last in name order.
    assert await backups.prune(target, space_id, 1) == ["z-taken-first", "m-taken-second"]
    assert [b.backup_id for b in await backups.list_backups(target, space_id)] == ["a-taken-third"]


async def test_writes_go_on_during_a_backup_and_the_backup_holds_exactly_its_lsn(
    tmp_path: Path,
    spaces_registry: registry.Registry,
    target: objects.Target,
    engine_settings: settings.EngineSettings,
) -> None:
    rng = np.random.default_rng(3)
    ledger = Ledger()
    space_id = await make_space(spaces_registry, hot=500, warm=5000)
    await remember(spaces_registry, space_id, ledger, 1000, rng, batch=200)
    async with spaces_registry.lease(space_id) as space:
        await space.consolidate()
    backing_up = asyncio.Event()
    acknowledged_during: list[int] = []
    original_put = target.put

    async def slow_put(key: str, data: bytes | memoryview | Path) -> None:
        backing_up.set()
        await asyncio.sleep(0.01)  # the store is slow: writes must not wait for it
        await original_put(key, data)

    target.put = slow_put  # type: ignore[method-assign]
    async with spaces_registry.lease(space_id) as space:
        backup = asyncio.create_task(backups.create(space, target, spaces_registry.executor))
        await backing_up.wait()
        while not backup.done():
            before = len(ledger.memories)
            await remember(spaces_registry, space_id, ledger, 10, rng)
            if not backup.done():
                acknowledged_during.append(len(ledger.memories) - before)
        manifest = await backup
    assert sum(acknowledged_during) >= 10, "no write was acknowledged while the backup ran"
    assert manifest.memories == 1000
    assert len(ledger.memories) > manifest.memories
    target.put = original_put  # type: ignore[method-assign]

    reg = await restored(tmp_path, target, manifest, engine_settings)
    try:
        await check_holds(reg, spaces.parse_space_id("restored"), ledger.through(manifest.lsn))
    finally:
        await reg.close()
    # The space itself lost nothing written meanwhile.
    await check_holds(spaces_registry, space_id, ledger.memories)


async def backed_up_space(
    spaces_registry: registry.Registry, target: objects.Target, seed: int = 4
) -> tuple[spaces.SpaceId, Ledger, backups.Manifest]:
    rng = np.random.default_rng(seed)
    ledger = Ledger()
    space_id = await make_space(spaces_registry)
    await remember(spaces_registry, space_id, ledger, 300, rng)
    async with spaces_registry.lease(space_id) as space:
        await space.consolidate()
        manifest = await backups.create(space, target, spaces_registry.executor)
    return space_id, ledger, manifest


def a_chunk(manifest: backups.Manifest) -> backups.FileEntry:
    """An embeddings chunk of the warm tier (a Zarr chunk file, random rows: no other file of the
    backup has the same content)."""
    return next(
        f for f in manifest.files if f.path.startswith("warm/") and "/embeddings/c/" in f.path
    )


async def test_a_restore_refuses_a_corrupt_chunk_and_serves_nothing(
    tmp_path: Path,
    spaces_registry: registry.Registry,
    target: objects.Target,
    engine_settings: settings.EngineSettings,
) -> None:
    space_id, _, manifest = await backed_up_space(spaces_registry, target)
    chunk = a_chunk(manifest)
    key = backups.blob_key(space_id, chunk.sha256)
    body = bytearray(await target.get(key))
    body[len(body) // 2] ^= 0x01  # one bit flipped at rest
    await target.put(key, bytes(body))

    reg = registry.standalone(tmp_path / "data-restored", engine_settings)
    volume = reg.volume(spaces.parse_space_id("restored"))
    try:
        with pytest.raises(errors.BackupRefusedError, match=f"corrupt: {chunk.path}"):
            await backups.restore(
                target,
                space_id,
                manifest.backup_id,
                volume,
                space_id=spaces.parse_space_id("restored"),
            )
        assert not (volume / layout.IDENTITY).exists()
        # Whatever the volume holds, it is never served as a space.
        reg.catalog.put(backups.index_entry(manifest, spaces.parse_space_id("restored")))
        with pytest.raises(errors.SpaceRefusedError, match=r"restore .* has not completed"):
            await reg.load(spaces.parse_space_id("restored"))
    finally:
        await reg.close()


async def test_a_restore_refuses_a_missing_file_and_a_retry_after_repair_succeeds(
    tmp_path: Path,
    spaces_registry: registry.Registry,
    target: objects.Target,
    engine_settings: settings.EngineSettings,
) -> None:
    space_id, _ledger, manifest = await backed_up_space(spaces_registry, target)
    chunk = a_chunk(manifest)
    key = backups.blob_key(space_id, chunk.sha256)
    body = await target.get(key)
    await target.delete([key])
    volume = tmp_path / "volume"
    with pytest.raises(errors.BackupRefusedError, match=f"incomplete: {chunk.path}.*missing"):
        await backups.restore(target, space_id, manifest.backup_id, volume)
    assert not (volume / layout.IDENTITY).exists()
    await target.put(key, body)
    await backups.restore(target, space_id, manifest.backup_id, volume)
    assert (volume / layout.IDENTITY).exists()
    assert not (volume / backups.STAGING).exists()


async def test_a_restore_never_overwrites_a_space(
    spaces_registry: registry.Registry, target: objects.Target
) -> None:
    space_id, _, manifest = await backed_up_space(spaces_registry, target)
    with pytest.raises(errors.BackupRefusedError, match="already holds a space"):
        await backups.restore(
            target, space_id, manifest.backup_id, spaces_registry.volume(space_id)
        )
    with pytest.raises(errors.BackupNotFoundError, match="no backup 'nope'"):
        await backups.restore(target, space_id, "nope", spaces_registry.volume(space_id))


async def test_the_store_going_away_fails_the_backup_cleanly_and_a_retry_uploads_the_rest(
    spaces_registry: registry.Registry,
    target: objects.Target,
    minio_server: minio.Minio,
) -> None:
    rng = np.random.default_rng(5)
    ledger = Ledger()
    space_id = await make_space(spaces_registry, hot=100, warm=400)
    await remember(spaces_registry, space_id, ledger, 1500, rng, batch=100)
    async with spaces_registry.lease(space_id) as space:
        await space.consolidate()
    puts = 0
    original_put = target.put

    async def put_then_stop(key: str, data: bytes | memoryview | Path) -> None:
        nonlocal puts
        puts += 1
        if puts == 20:
            minio_server.stop()  # the real store goes away in the middle of the backup
        await original_put(key, data)

    target.put = put_then_stop  # type: ignore[method-assign]
    try:
        async with spaces_registry.lease(space_id) as space:
            with pytest.raises(errors.ObjectStoreError, match="backup target s3://"):
                await backups.create(space, target, spaces_registry.executor)
            # The space kept serving, reads and writes.
            await remember(spaces_registry, space_id, ledger, 10, rng)
            await check_holds(spaces_registry, space_id, ledger.memories)
    finally:
        target.put = original_put  # type: ignore[method-assign]
        minio_server.start()
    assert await backups.list_backups(target, space_id) == []
    async with spaces_registry.lease(space_id) as space:
        manifest = await backups.create(space, target, spaces_registry.executor)
    assert 0 < manifest.bytes_uploaded < manifest.bytes
    assert [b.backup_id for b in await backups.list_backups(target, space_id)] == [
        manifest.backup_id
    ]


async def test_deleting_a_backup_keeps_the_files_other_backups_name(
    tmp_path: Path,
    spaces_registry: registry.Registry,
    target: objects.Target,
    engine_settings: settings.EngineSettings,
) -> None:
    space_id, ledger, first = await backed_up_space(spaces_registry, target)
    await remember(spaces_registry, space_id, ledger, 100, np.random.default_rng(6))
    async with spaces_registry.lease(space_id) as space:
        await space.consolidate()
        second = await backups.create(space, target, spaces_registry.executor)
    only_first = {f.sha256 for f in first.files} - {f.sha256 for f in second.files}
    deleted = await backups.delete(target, space_id, first.backup_id)
    assert deleted == len(only_first) > 0
    blobs = await target.keys(f"spaces/{space_id}/blobs")
    assert {k.rsplit("/", 1)[-1] for k in blobs} == {f.sha256 for f in second.files}
    reg = await restored(tmp_path, target, second, engine_settings)
    try:
        await check_holds(reg, spaces.parse_space_id("restored"), ledger.memories)
    finally:
        await reg.close()
    third_id = await backups.prune(target, space_id, keep=0)
    assert third_id == [second.backup_id]
    assert await target.keys(f"spaces/{space_id}") == {}


async def test_a_local_directory_is_a_target_too(
    tmp_path: Path,
    spaces_registry: registry.Registry,
    engine_settings: settings.EngineSettings,
) -> None:
    target = objects.Target(objects.TargetConfig(url=str(tmp_path / "backups")))
    space_id, ledger, manifest = await backed_up_space(spaces_registry, target)
    assert (tmp_path / "backups" / backups.manifest_key(space_id, manifest.backup_id)).is_file()
    reg = await restored(tmp_path, target, manifest, engine_settings)
    try:
        await check_holds(reg, spaces.parse_space_id("restored"), ledger.memories)
    finally:
        await reg.close()
