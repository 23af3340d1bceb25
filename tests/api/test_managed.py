"""Managed mode: spaces come from the operator's index files, reloaded on change without a
restart; the index is read-only; a space whose volume is not mounted yet is UNAVAILABLE."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Awaitable
from pathlib import Path

import grpc
import pytest

from memspace_contract import index, spaces
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_server import settings
from tests.api.conftest import (
    ADMIN_TOKEN,
    Running,
    Start,
    details,
    eventually,
    failure,
    md,
    memory,
    status_of,
    vec,
    write_entry,
)


@pytest.fixture
async def managed(start: Start, managed_dirs: tuple[Path, Path], admin_token_file: Path) -> Running:
    index_dir, volumes = managed_dirs
    write_entry(index_dir, "team-a", token="ta", volumes=volumes)
    return await start(data_root=volumes, index_dir=index_dir, admin_token_file=admin_token_file)


def recall(running: Running, space: str, token: str | None) -> Awaitable[pb.RecallResponse]:
    return running.memories.Recall(pb.RecallRequest(cue=vec(1), k=5), metadata=md(space, token))


@pytest.mark.parametrize("rpc", ["CreateSpace", "DeleteSpace"])
async def test_space_management_is_refused_under_the_operator(managed: Running, rpc: str) -> None:
    s = managed.spaces
    call = (
        s.CreateSpace(
            pb.CreateSpaceRequest(space="team-b", embedding_dim=4), metadata=md(token=ADMIN_TOKEN)
        )
        if rpc == "CreateSpace"
        else s.DeleteSpace(pb.DeleteSpaceRequest(space="team-a"), metadata=md(token=ADMIN_TOKEN))
    )
    err = await failure(call)
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "MemorySpace" in details(err)
    listed = await s.ListSpaces(pb.ListSpacesRequest(), metadata=md(token=ADMIN_TOKEN))
    assert [sp.space for sp in listed.spaces] == ["team-a"]


async def test_a_new_index_entry_is_served_without_a_restart(
    managed: Running, managed_dirs: tuple[Path, Path]
) -> None:
    index_dir, volumes = managed_dirs
    before = await status_of(recall(managed, "team-b", "tb"))
    assert before is grpc.StatusCode.PERMISSION_DENIED
    write_entry(index_dir, "team-b", token="tb", volumes=volumes)

    async def served() -> bool:
        return await status_of(recall(managed, "team-b", "tb")) is grpc.StatusCode.OK

    await eventually(served)


async def test_a_removed_index_entry_stops_being_served(
    managed: Running, managed_dirs: tuple[Path, Path]
) -> None:
    index_dir, _ = managed_dirs
    await managed.memories.Remember(
        pb.RememberRequest(memory=memory("kept")), metadata=md("team-a", "ta")
    )
    index.remove_entry(index_dir, spaces.SpaceId("team-a"))

    async def gone() -> bool:
        return await status_of(recall(managed, "team-a", "ta")) is (
            grpc.StatusCode.PERMISSION_DENIED
        )

    await eventually(gone)
    unknown = await failure(
        managed.spaces.Health(pb.HealthRequest(space="team-a"), metadata=md(token=ADMIN_TOKEN))
    )
    assert unknown.code() is grpc.StatusCode.NOT_FOUND


async def test_a_rotated_space_token_is_picked_up(
    managed: Running, managed_dirs: tuple[Path, Path]
) -> None:
    index_dir, _ = managed_dirs
    write_entry(index_dir, "team-a", token="ta-next")

    async def rotated() -> bool:
        return await status_of(recall(managed, "team-a", "ta-next")) is grpc.StatusCode.OK

    await eventually(rotated)
    assert await status_of(recall(managed, "team-a", "ta")) is grpc.StatusCode.PERMISSION_DENIED


async def test_an_inactive_space_is_a_failed_precondition_until_active(
    managed: Running, managed_dirs: tuple[Path, Path]
) -> None:
    index_dir, _ = managed_dirs
    await managed.memories.Remember(
        pb.RememberRequest(memory=memory("kept")), metadata=md("team-a", "ta")
    )
    write_entry(index_dir, "team-a", token="ta", state="Inactive")

    async def inactive() -> bool:
        return await status_of(recall(managed, "team-a", "ta")) is (
            grpc.StatusCode.FAILED_PRECONDITION
        )

    await eventually(inactive)
    err = await failure(recall(managed, "team-a", "ta"))
    assert "Inactive" in details(err)
    assert "Active" in details(err)
    write_entry(index_dir, "team-a", token="ta", state="Active")

    async def active() -> bool:
        return await status_of(recall(managed, "team-a", "ta")) is grpc.StatusCode.OK

    await eventually(active)
    found = await recall(managed, "team-a", "ta")
    assert [h.memory.content for h in found.hits] == ["kept"]


async def test_an_entry_whose_volume_is_not_mounted_is_unavailable_until_it_is(
    managed: Running, managed_dirs: tuple[Path, Path]
) -> None:
    index_dir, volumes = managed_dirs
    write_entry(index_dir, "team-c", token="tc")

    async def listed() -> bool:
        return await status_of(recall(managed, "team-c", "tc")) is grpc.StatusCode.UNAVAILABLE

    await eventually(listed)
    err = await failure(recall(managed, "team-c", "tc"))
    assert "not mounted yet" in details(err)
    health = await managed.spaces.Health(
        pb.HealthRequest(space="team-c"), metadata=md(token=ADMIN_TOKEN)
    )
    assert health.spaces[0].state == "Unmounted"
    (volumes / "team-c").mkdir()
    assert await status_of(recall(managed, "team-c", "tc")) is grpc.StatusCode.OK


async def test_another_spaces_volume_is_refused(
    managed: Running, managed_dirs: tuple[Path, Path]
) -> None:
    index_dir, volumes = managed_dirs
    await managed.memories.Remember(
        pb.RememberRequest(memory=memory("a's")), metadata=md("team-a", "ta")
    )
    (volumes / "team-d").mkdir()
    identity = json.loads((volumes / "team-a" / "space.json").read_text())
    shutil.copy(volumes / "team-a" / "space.json", volumes / "team-d" / "space.json")
    assert identity["spaceId"] == "team-a"
    write_entry(index_dir, "team-d", token="td")

    async def refused() -> bool:
        return await status_of(recall(managed, "team-d", "td")) is (
            grpc.StatusCode.FAILED_PRECONDITION
        )

    await eventually(refused)
    err = await failure(recall(managed, "team-d", "td"))
    assert "belongs to space 'team-a'" in details(err)


async def test_a_shard_starts_before_its_admin_token_exists_and_picks_it_up(
    start: Start, managed_dirs: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The shard pod mounts the admin token Secret as optional: missing (before an install,
    after an uninstall) the shard still serves its spaces, and opens SpaceService once the
    token appears. (A server that refused to start crash-looped on a real node.)"""
    index_dir, volumes = managed_dirs
    write_entry(index_dir, "team-a", token="ta", volumes=volumes)
    token_file = tmp_path / "admin" / "token"
    with caplog.at_level(logging.WARNING):
        running = await start(data_root=volumes, index_dir=index_dir, admin_token_file=token_file)
    assert "cannot read the admin token file" in caplog.text
    assert await status_of(recall(running, "team-a", "ta")) is grpc.StatusCode.OK
    listing = running.spaces.ListSpaces(pb.ListSpacesRequest(), metadata=md(token=ADMIN_TOKEN))
    assert await status_of(listing) is grpc.StatusCode.PERMISSION_DENIED

    token_file.parent.mkdir()
    token_file.write_text(ADMIN_TOKEN)

    async def admitted() -> bool:
        call = running.spaces.ListSpaces(pb.ListSpacesRequest(), metadata=md(token=ADMIN_TOKEN))
        return await status_of(call) is grpc.StatusCode.OK

    await eventually(admitted)


async def test_a_standalone_server_refuses_a_missing_admin_token_file(
    start: Start, tmp_path: Path
) -> None:
    with pytest.raises(settings.SettingsError, match="cannot read the admin token file"):
        await start(admin_token_file=tmp_path / "no-such-token")
