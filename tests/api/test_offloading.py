"""Offloading and bringing back a space under the operator, as the operator drives a shard: a final
BackupSpace seals the space's writes, an Offloaded entry unloads it and refuses its calls, a
Restoring entry and a RestoreSpace into a new, empty volume bring it back, Active serves it again.
The index entries come through ApplyIndexEntry (the server re-reads its directory once an hour
here); the target is a directory (tests/backup runs the same calls against a real MinIO)."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest

from memspace_contract.v1 import memspace_pb2 as pb
from tests.api.conftest import (
    ADMIN_TOKEN,
    Running,
    Start,
    details,
    failure,
    md,
    memory,
    vec,
    write_entry,
)
from tests.api.test_applying import TEAM, apply, entry, remember


@pytest.fixture
async def shard(start: Start, managed_dirs: tuple[Path, Path], admin_token_file: Path) -> Running:
    index_dir, volumes = managed_dirs
    write_entry(index_dir, TEAM, token="ta", volumes=volumes, generation=1)
    return await start(
        data_root=volumes,
        index_dir=index_dir,
        admin_token_file=admin_token_file,
        index_refresh_s=3600.0,
    )


ADMIN = md(token=ADMIN_TOKEN)


async def recall(running: Running) -> pb.RecallResponse:
    answer: pb.RecallResponse = await running.memories.Recall(
        pb.RecallRequest(cue=vec(1), k=100), metadata=md(TEAM, "ta")
    )
    return answer


async def health(running: Running) -> pb.SpaceHealth:
    answer = await running.spaces.Health(pb.HealthRequest(space=TEAM), metadata=ADMIN)
    (found,) = answer.spaces
    return found


async def test_a_space_is_offloaded_and_brought_back_with_every_acknowledged_memory(
    shard: Running, managed_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    _, volumes = managed_dirs
    target = pb.BackupTarget(url=str(tmp_path / "backups"))
    for _ in range(5):
        assert await remember(shard) is grpc.StatusCode.OK
    final = await shard.spaces.BackupSpace(
        pb.BackupSpaceRequest(space=TEAM, target=target, backup_id="offload-1", final=True),
        metadata=ADMIN,
    )
    assert final.memories == 5

    # Sealed: no more writes, reads as before; the same entry applied again changes nothing.
    err = await failure(
        shard.memories.Remember(pb.RememberRequest(memory=memory("x")), metadata=md(TEAM, "ta"))
    )
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert f"space {TEAM!r} is being Offloaded" in details(err)
    assert len((await recall(shard)).hits) == 5
    await apply(shard, entry(1))
    assert await remember(shard) is grpc.StatusCode.FAILED_PRECONDITION

    answer = await apply(shard, entry(2, "Offloaded"))
    assert (answer.state, answer.generation) == ("Offloaded", 2)
    assert shard.server.registry.loaded() == {}  # unloaded before the answer
    for call in (recall(shard), shard.memories.Get(pb.GetRequest(id="x"), metadata=md(TEAM, "ta"))):
        err = await failure(call)
        assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert f"space {TEAM!r} is Offloaded" in details(err)
    found = await health(shard)
    assert found.state == "Offloaded"
    assert "memories" in found.unknown

    # The operator deletes the volume; back to Active, a new, empty volume is mounted.
    shutil.rmtree(volumes / TEAM)
    assert (await health(shard)).state == "Offloaded"
    (volumes / TEAM).mkdir()
    answer = await apply(shard, entry(3, "Restoring"))
    assert answer.state == "Restoring"
    err = await failure(recall(shard))
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert f"space {TEAM!r} is Restoring" in details(err)
    assert (await health(shard)).state == "Restoring"

    restored = await shard.spaces.RestoreSpace(
        pb.RestoreSpaceRequest(space=TEAM, target=target, backup_id="offload-1"),
        metadata=ADMIN,
    )
    assert (restored.lsn, restored.memories) == (final.lsn, 5)
    # Still Restoring in the index: not served until the operator sets it Active.
    assert (await failure(recall(shard))).code() is grpc.StatusCode.UNAVAILABLE
    await apply(shard, entry(4, "Active"))
    assert len((await recall(shard)).hits) == 5
    assert await remember(shard) is grpc.StatusCode.OK  # the seal went with the old volume
    assert (await health(shard)).memories == 6


async def test_a_newer_active_entry_lifts_the_seal_of_a_final_backup(
    shard: Running, tmp_path: Path
) -> None:
    target = pb.BackupTarget(url=str(tmp_path / "backups"))
    assert await remember(shard) is grpc.StatusCode.OK
    await shard.spaces.BackupSpace(
        pb.BackupSpaceRequest(space=TEAM, target=target, final=True), metadata=ADMIN
    )
    assert await remember(shard) is grpc.StatusCode.FAILED_PRECONDITION
    # The seal outlives an unload (and a restart: it is on the volume).
    await shard.server.registry.unload(TEAM)
    assert await remember(shard) is grpc.StatusCode.FAILED_PRECONDITION
    await apply(shard, entry(2, "Active"))  # the user changed their mind: Active again
    assert await remember(shard) is grpc.StatusCode.OK
    await shard.server.registry.unload(TEAM)
    assert await remember(shard) is grpc.StatusCode.OK


async def test_a_restore_into_an_offloaded_or_inactive_space_is_refused(
    shard: Running, tmp_path: Path
) -> None:
    target = pb.BackupTarget(url=str(tmp_path / "backups"))
    taken = await shard.spaces.BackupSpace(
        pb.BackupSpaceRequest(space=TEAM, target=target), metadata=ADMIN
    )
    for state in ("Offloaded", "Inactive"):
        await apply(shard, entry(2 if state == "Offloaded" else 3, state))
        err = await failure(
            shard.spaces.RestoreSpace(
                pb.RestoreSpaceRequest(space=TEAM, target=target, backup_id=taken.backup_id),
                metadata=ADMIN,
            )
        )
        assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert f"space {TEAM!r} is {state}" in details(err)
        err = await failure(
            shard.spaces.BackupSpace(
                pb.BackupSpaceRequest(space=TEAM, target=target), metadata=ADMIN
            )
        )
        assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
