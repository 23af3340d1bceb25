"""Faults around BackupSpace and RestoreSpace of a real, serving `memspace serve` process with a
real MinIO: a kill -9 of the server in the middle of a backup and of a restore, the object store
going away in the middle of a backup, a corrupt file in a backup."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from memspace_contract import spaces
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_server.storage import backups, objects, registry, settings
from tests.backup.conftest import Ledger, make_space, remember
from tests.backup.rpcs import Acknowledged, held, remember_until, target_of, write
from tests.reliability.conftest import (
    CALL_TIMEOUT_S,
    Servers,
    Stubs,
    connect,
    create_space,
    error_of,
)
from tests.support import minio

ALPHA = spaces.parse_space_id("alpha")


@pytest.fixture
async def data_root(
    tmp_path: Path, engine_settings: settings.EngineSettings
) -> tuple[Path, Acknowledged]:
    """A data root with space `alpha` in many small files (small chunks, every tier), so a
    backup or restore of it takes long enough to be cut short; the server serves it later."""
    root = tmp_path / "data"
    reg = registry.standalone(root, engine_settings)
    ledger = Ledger()
    try:
        space_id = await make_space(reg, hot=300, warm=1500)
        await remember(reg, space_id, ledger, 2000, np.random.default_rng(7), batch=400)
        async with reg.lease(space_id) as space:
            await space.consolidate()
        await remember(reg, space_id, ledger, 50, np.random.default_rng(8))
    finally:
        await reg.close()
    acked = Acknowledged(
        {
            k: (content, [float(v) for v in emb], lsn)
            for k, (content, emb, lsn) in ledger.memories.items()
        }
    )
    return root, acked


async def wait_for(ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60.0
    while not ready():
        assert time.monotonic() < deadline, f"never saw {what}"
        await asyncio.sleep(0.005)


def blobs_uploaded(server: minio.Minio, bucket: str, space: str = "alpha") -> Callable[[], bool]:
    def ready() -> bool:
        blobs = server.data / bucket / "backups" / "spaces" / space / "blobs"
        return blobs.is_dir() and sum(1 for _ in blobs.iterdir()) >= 10

    return ready


def store(server: minio.Minio, bucket: str) -> objects.Target:
    return objects.Target(
        objects.TargetConfig(
            url=server.url(bucket, "backups"),
            endpoint=server.endpoint,
            access_key_id=server.access_key,
            secret_access_key=server.secret_key,
            retry_timeout_s=2.0,
        )
    )


async def test_a_server_killed_during_a_backup_loses_nothing_and_a_retried_backup_completes(
    servers: Servers,
    data_root: tuple[Path, Acknowledged],
    minio_server: minio.Minio,
    bucket: str,
) -> None:
    root, acked = data_root
    server = servers(root)
    target = target_of(minio_server, bucket)
    async with connect(await server.start()) as stubs:
        stop = asyncio.Event()
        writer = asyncio.create_task(remember_until(stubs, "alpha", acked, stop, dim=16))
        backup = asyncio.ensure_future(
            stubs.spaces.BackupSpace(
                pb.BackupSpaceRequest(space="alpha", target=target, backup_id="nightly"),
                timeout=CALL_TIMEOUT_S * 3,
            )
        )
        await wait_for(blobs_uploaded(minio_server, bucket), "files uploaded")
        assert not backup.done()
        before = len(acked.memories)
        await wait_for(lambda: len(acked.memories) > before + 5, "writes during the backup")
        # Another space is served meanwhile.
        await stubs.memories.Remember(
            pb.RememberRequest(space="default", memory=pb.Memory(content="y", embedding=[1.0] * 8)),
            timeout=CALL_TIMEOUT_S,
        )
        assert not backup.done()
        server.kill()
        stop.set()
        with pytest.raises(grpc.aio.AioRpcError) as killed:
            await backup
        assert killed.value.code() is grpc.StatusCode.UNAVAILABLE
        (ended,) = await asyncio.gather(writer, return_exceptions=True)
        if isinstance(ended, grpc.aio.AioRpcError):  # its call in flight died with the server
            assert ended.code() is grpc.StatusCode.UNAVAILABLE
        else:  # or it had its answer just before, and saw the stop
            assert isinstance(ended, int)
    # No manifest: the cut-short backup is not listed.
    assert await backups.list_backups(store(minio_server, bucket), ALPHA) == []
    async with connect(await server.start()) as stubs:
        # Every acknowledged write is there (and perhaps the one cut short by the kill).
        await held(stubs, "alpha", acked.memories, in_flight=1)
        retried = await stubs.spaces.BackupSpace(
            pb.BackupSpaceRequest(space="alpha", target=target, backup_id="nightly"),
            timeout=CALL_TIMEOUT_S * 3,
        )
        assert retried.backup_id == "nightly"
        assert 0 < retried.bytes_uploaded < retried.bytes, "the retry uploads only what is missing"
        assert len(acked.memories) <= retried.memories <= len(acked.memories) + 1
        await create_space(stubs, "beta", dim=16, admin=None)
        await stubs.spaces.RestoreSpace(
            pb.RestoreSpaceRequest(
                space="beta", target=target, backup_id="nightly", source_space="alpha"
            ),
            timeout=CALL_TIMEOUT_S * 3,
        )
        await held(stubs, "beta", acked.memories, in_flight=1)


async def refused_as_unfinished(stubs: Stubs, space: str, dim: int = 16) -> None:
    """Calls to `space` are refused: its volume holds an unfinished restore."""
    err = await error_of(
        stubs.memories.Get(pb.GetRequest(space=space, id="anything"), timeout=CALL_TIMEOUT_S)
    )
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "has not completed" in (err.details() or "")
    err = await error_of(
        stubs.memories.Remember(
            pb.RememberRequest(space=space, memory=pb.Memory(content="x", embedding=[1.0] * dim)),
            timeout=CALL_TIMEOUT_S,
        )
    )
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    health = await stubs.spaces.Health(pb.HealthRequest(space=space), timeout=CALL_TIMEOUT_S)
    assert health.spaces[0].state == "Failed"
    assert "memories" in health.spaces[0].unknown


async def test_a_server_killed_during_a_restore_serves_nothing_and_a_retried_restore_completes(
    servers: Servers,
    data_root: tuple[Path, Acknowledged],
    minio_server: minio.Minio,
    bucket: str,
) -> None:
    root, acked = data_root
    server = servers(root)
    target = target_of(minio_server, bucket)
    staging = root / "spaces" / "gamma" / backups.STAGING

    def some_downloaded() -> bool:
        return staging.is_dir() and sum(1 for p in staging.rglob("*") if p.is_file()) >= 10

    async with connect(await server.start()) as stubs:
        await stubs.spaces.BackupSpace(
            pb.BackupSpaceRequest(space="alpha", target=target, backup_id="b"),
            timeout=CALL_TIMEOUT_S * 3,
        )
        await create_space(stubs, "gamma", dim=16, admin=None)
        restore = asyncio.ensure_future(
            stubs.spaces.RestoreSpace(
                pb.RestoreSpaceRequest(
                    space="gamma", target=target, backup_id="b", source_space="alpha"
                ),
                timeout=CALL_TIMEOUT_S * 3,
            )
        )
        await wait_for(some_downloaded, "files downloaded")
        # While it runs, the space's calls are told to retry.
        err = await error_of(
            stubs.memories.Get(pb.GetRequest(space="gamma", id="x"), timeout=CALL_TIMEOUT_S)
        )
        assert err.code() is grpc.StatusCode.UNAVAILABLE
        assert "is Restoring" in (err.details() or "")
        assert not restore.done()
        server.kill()
        with pytest.raises(grpc.aio.AioRpcError):
            await restore
    async with connect(await server.start()) as stubs:
        await refused_as_unfinished(stubs, "gamma")
        await held(stubs, "alpha", acked.memories)  # the other space serves as before
        restored = await stubs.spaces.RestoreSpace(
            pb.RestoreSpaceRequest(
                space="gamma", target=target, backup_id="b", source_space="alpha"
            ),
            timeout=CALL_TIMEOUT_S * 3,
        )
        assert restored.memories == len(acked.memories)
        await held(stubs, "gamma", acked.memories)
        # A retry after it completed answers at once and changes nothing.
        again = await stubs.spaces.RestoreSpace(
            pb.RestoreSpaceRequest(
                space="gamma", target=target, backup_id="b", source_space="alpha"
            ),
            timeout=CALL_TIMEOUT_S,
        )
        assert again.lsn == restored.lsn
        await held(stubs, "gamma", acked.memories)


async def test_the_store_going_away_fails_the_backup_call_cleanly_and_the_space_keeps_serving(
    servers: Servers,
    data_root: tuple[Path, Acknowledged],
    minio_server: minio.Minio,
    bucket: str,
) -> None:
    root, acked = data_root
    server = servers(root, "--backup-store-timeout", "2")
    target = target_of(minio_server, bucket)
    async with connect(await server.start()) as stubs:
        stop = asyncio.Event()
        writer = asyncio.create_task(remember_until(stubs, "alpha", acked, stop, dim=16))
        backup = asyncio.ensure_future(
            stubs.spaces.BackupSpace(
                pb.BackupSpaceRequest(space="alpha", target=target, backup_id="b"),
                timeout=CALL_TIMEOUT_S * 3,
            )
        )
        try:
            await wait_for(blobs_uploaded(minio_server, bucket), "files uploaded")
            minio_server.stop()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await backup
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "backup target s3://" in (failed.value.details() or "")
            written = len(acked.memories)
            # Writes go on (a consolidation the backup held back may run first).
            await wait_for(lambda: len(acked.memories) > written + 5, "writes after the failure")
            assert not writer.done()
            stop.set()
            await writer
            await held(stubs, "alpha", acked.memories)
        finally:
            minio_server.start()
        assert await backups.list_backups(store(minio_server, bucket), ALPHA) == []
        retried = await stubs.spaces.BackupSpace(
            pb.BackupSpaceRequest(space="alpha", target=target, backup_id="b"),
            timeout=CALL_TIMEOUT_S * 3,
        )
        assert 0 < retried.bytes_uploaded < retried.bytes
        assert retried.memories == len(acked.memories)


async def test_a_corrupt_file_in_a_backup_is_refused_and_nothing_is_served(
    servers: Servers,
    tmp_path: Path,
    minio_server: minio.Minio,
    bucket: str,
) -> None:
    server = servers(tmp_path / "data")
    target = target_of(minio_server, bucket)
    async with connect(await server.start()) as stubs:
        await create_space(stubs, "alpha", admin=None)
        acked = Acknowledged()
        await write(stubs, "alpha", acked, 300, np.random.default_rng(3))
        await stubs.memories.Consolidate(pb.ConsolidateRequest(space="alpha"))
        taken = await stubs.spaces.BackupSpace(
            pb.BackupSpaceRequest(space="alpha", target=target), timeout=CALL_TIMEOUT_S
        )
        objects_store = store(minio_server, bucket)
        manifest = await backups.read(objects_store, ALPHA, taken.backup_id)
        victim = max(manifest.files, key=lambda f: f.size)
        key = backups.blob_key(ALPHA, victim.sha256)
        original = await objects_store.get(key)
        corrupt = bytearray(original)
        corrupt[len(corrupt) // 2] ^= 0xFF
        await objects_store.put(key, bytes(corrupt))

        await create_space(stubs, "beta", admin=None)
        err = await error_of(
            stubs.spaces.RestoreSpace(
                pb.RestoreSpaceRequest(
                    space="beta", target=target, backup_id=taken.backup_id, source_space="alpha"
                ),
                timeout=CALL_TIMEOUT_S,
            )
        )
        assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "is corrupt" in (err.details() or "")
        assert victim.path in (err.details() or "")
        await refused_as_unfinished(stubs, "beta", dim=8)

        await objects_store.put(key, original)  # repaired: a retry restores it
        await stubs.spaces.RestoreSpace(
            pb.RestoreSpaceRequest(
                space="beta", target=target, backup_id=taken.backup_id, source_space="alpha"
            ),
            timeout=CALL_TIMEOUT_S,
        )
        await held(stubs, "beta", acked.memories)
