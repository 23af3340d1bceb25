"""BackupSpace, RestoreSpace and DeleteBackup against a real `memspace serve` process and a real
MinIO: backups consistent at an LSN while writes go on, idempotent by ID, incremental; restores
into another space; final backups that seal a space."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from memspace_contract.v1 import memspace_pb2 as pb
from tests.backup.rpcs import Acknowledged, held, remember_until, target_of, write
from tests.reliability.conftest import (
    CALL_TIMEOUT_S,
    Servers,
    connect,
    create_space,
    error_of,
)
from tests.support import minio


async def test_a_backup_over_the_api_is_consistent_idempotent_and_incremental(
    servers: Servers, tmp_path: Path, minio_server: minio.Minio, bucket: str
) -> None:
    server = servers(tmp_path / "data")
    target = target_of(minio_server, bucket)
    async with connect(await server.start()) as stubs:
        await create_space(stubs, "alpha", admin=None)
        await create_space(stubs, "beta", admin=None)
        acked = Acknowledged()
        await write(stubs, "alpha", acked, 400, np.random.default_rng(1))
        stop = asyncio.Event()
        writer = asyncio.create_task(remember_until(stubs, "alpha", acked, stop))
        first = await stubs.spaces.BackupSpace(
            pb.BackupSpaceRequest(space="alpha", target=target, backup_id="first"),
            timeout=CALL_TIMEOUT_S,
        )
        stop.set()
        await writer
        assert first.backup_id == "first"
        assert first.memories >= 400
        assert 0 < first.bytes_uploaded <= first.bytes
        assert first.lsn >= 400
        assert first.started.ToDatetime() <= first.completed.ToDatetime()
        assert acked.last_lsn() > first.lsn, "writes went on during the backup"

        again = await stubs.spaces.BackupSpace(
            pb.BackupSpaceRequest(space="alpha", target=target, backup_id="first"),
            timeout=CALL_TIMEOUT_S,
        )
        assert (again.lsn, again.memories, again.bytes) == (first.lsn, first.memories, first.bytes)
        assert again.bytes_uploaded == 0

        await write(stubs, "alpha", acked, 20, np.random.default_rng(2))
        second = await stubs.spaces.BackupSpace(
            pb.BackupSpaceRequest(space="alpha", target=target), timeout=CALL_TIMEOUT_S
        )
        assert second.backup_id
        assert second.backup_id != "first"
        assert second.lsn > first.lsn
        assert second.bytes_uploaded < second.bytes / 2, "only what changed is uploaded"

        restored = await stubs.spaces.RestoreSpace(
            pb.RestoreSpaceRequest(
                space="beta", target=target, backup_id="first", source_space="alpha"
            ),
            timeout=CALL_TIMEOUT_S,
        )
        assert (restored.lsn, restored.memories) == (first.lsn, first.memories)
        expected = acked.through(first.lsn)
        assert len(expected) == first.memories
        await held(stubs, "beta", expected)

        deleted = await stubs.spaces.DeleteBackup(
            pb.DeleteBackupRequest(space="alpha", target=target, backup_id="first"),
            timeout=CALL_TIMEOUT_S,
        )
        assert deleted.bytes_deleted > 0
        await create_space(stubs, "gamma", admin=None)
        err = await error_of(
            stubs.spaces.RestoreSpace(
                pb.RestoreSpaceRequest(
                    space="gamma", target=target, backup_id="first", source_space="alpha"
                ),
                timeout=CALL_TIMEOUT_S,
            )
        )
        assert err.code() is grpc.StatusCode.NOT_FOUND
        # The second backup lost nothing to the first's deletion.
        await create_space(stubs, "delta", admin=None)
        await stubs.spaces.RestoreSpace(
            pb.RestoreSpaceRequest(
                space="delta", target=target, backup_id=second.backup_id, source_space="alpha"
            ),
            timeout=CALL_TIMEOUT_S,
        )
        await held(stubs, "delta", acked.through(second.lsn))


async def test_a_restore_into_a_space_that_holds_memories_is_refused(
    servers: Servers, tmp_path: Path, minio_server: minio.Minio, bucket: str
) -> None:
    server = servers(tmp_path / "data")
    target = target_of(minio_server, bucket)
    async with connect(await server.start()) as stubs:
        await create_space(stubs, "alpha", admin=None)
        acked = Acknowledged()
        await write(stubs, "alpha", acked, 30, np.random.default_rng(1))
        taken = await stubs.spaces.BackupSpace(
            pb.BackupSpaceRequest(space="alpha", target=target), timeout=CALL_TIMEOUT_S
        )
        await write(stubs, "alpha", acked, 5, np.random.default_rng(2))
        err = await error_of(
            stubs.spaces.RestoreSpace(
                pb.RestoreSpaceRequest(space="alpha", target=target, backup_id=taken.backup_id),
                timeout=CALL_TIMEOUT_S,
            )
        )
        assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "holds 35 memories" in (err.details() or "")
        # Nothing changed: every write is still there and the space still takes writes.
        await held(stubs, "alpha", acked.memories)
        await write(stubs, "alpha", acked, 1, np.random.default_rng(3))


@pytest.mark.parametrize("restart", [False, True])
async def test_a_final_backup_holds_every_acknowledged_write_and_the_space_refuses_more(
    servers: Servers, tmp_path: Path, minio_server: minio.Minio, bucket: str, restart: bool
) -> None:
    server = servers(tmp_path / "data")
    target = target_of(minio_server, bucket)
    async with connect(await server.start()) as stubs:
        await create_space(stubs, "alpha", admin=None)
        await create_space(stubs, "beta", admin=None)
        acked = Acknowledged()
        await write(stubs, "alpha", acked, 200, np.random.default_rng(1))
        stop = asyncio.Event()
        writer = asyncio.create_task(remember_until(stubs, "alpha", acked, stop, refused=True))
        await asyncio.sleep(0.2)
        final = await stubs.spaces.BackupSpace(
            pb.BackupSpaceRequest(space="alpha", target=target, backup_id="last", final=True),
            timeout=CALL_TIMEOUT_S,
        )
        stop.set()
        await writer
        assert acked.last_lsn() == final.lsn, "no write was acknowledged after the final backup"
        assert final.memories == len(acked.memories)
    if restart:
        server.kill()
        await server.start()
    async with connect(server.address) as stubs:
        err = await error_of(
            stubs.memories.Remember(
                pb.RememberRequest(
                    space="alpha", memory=pb.Memory(content="late", embedding=[1.0] * 8)
                ),
                timeout=CALL_TIMEOUT_S,
            )
        )
        assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "is being Offloaded" in (err.details() or "")
        await held(stubs, "alpha", acked.memories)  # reads are served still
        await stubs.spaces.RestoreSpace(
            pb.RestoreSpaceRequest(
                space="beta", target=target, backup_id="last", source_space="alpha"
            ),
            timeout=CALL_TIMEOUT_S,
        )
        await held(stubs, "beta", acked.memories)
        # The restored space is not sealed: the seal is the offloaded space's, not its data's.
        await write(stubs, "beta", acked, 1, np.random.default_rng(5))


async def test_two_backups_of_one_space_at_once_run_one_after_the_other(
    servers: Servers, tmp_path: Path, minio_server: minio.Minio, bucket: str
) -> None:
    server = servers(tmp_path / "data")
    target = target_of(minio_server, bucket)
    async with connect(await server.start()) as stubs:
        await create_space(stubs, "alpha", admin=None)
        await create_space(stubs, "beta", admin=None)
        acked = Acknowledged()
        await write(stubs, "alpha", acked, 300, np.random.default_rng(1))
        await write(stubs, "beta", acked, 10, np.random.default_rng(2))
        request = pb.BackupSpaceRequest(space="alpha", target=target, backup_id="same")
        first, second, other = await asyncio.gather(
            stubs.spaces.BackupSpace(request, timeout=CALL_TIMEOUT_S),
            stubs.spaces.BackupSpace(request, timeout=CALL_TIMEOUT_S),
            stubs.spaces.BackupSpace(
                pb.BackupSpaceRequest(space="beta", target=target), timeout=CALL_TIMEOUT_S
            ),
        )
        # The second waited for the first and found its backup complete: one backup, one LSN.
        assert first.lsn == second.lsn
        assert sorted([first.bytes_uploaded, second.bytes_uploaded])[0] == 0
        assert max(first.bytes_uploaded, second.bytes_uploaded) > 0
        assert other.memories == 10
