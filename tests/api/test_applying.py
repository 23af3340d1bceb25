"""ApplyIndexEntry: the operator hands a changed index entry to its shard directly, so a state
change takes effect at once while the projected index (refreshed by a kubelet about once a
minute) lags. Here the server re-reads its index directory only once an hour, so every change
seen below came through the call; the directory's own changes are checked against it too."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest

from memspace_contract import index, spaces
from memspace_contract.v1 import memspace_pb2 as pb
from tests.api.conftest import (
    ADMIN_TOKEN,
    DIM,
    Running,
    Start,
    details,
    failure,
    md,
    memory,
    status_of,
    write_entry,
)

TEAM = spaces.SpaceId("team-a")


@pytest.fixture
async def slow_index(
    start: Start, managed_dirs: tuple[Path, Path], admin_token_file: Path
) -> Running:
    index_dir, volumes = managed_dirs
    write_entry(index_dir, TEAM, token="ta", volumes=volumes, generation=1)
    return await start(
        data_root=volumes,
        index_dir=index_dir,
        admin_token_file=admin_token_file,
        index_refresh_s=3600.0,
    )


def entry(generation: int, state: index.State = "Active", token: str = "ta") -> index.IndexEntry:
    return index.IndexEntry(
        space_id=TEAM,
        embedding_dim=DIM,
        token_sha256=index.token_sha256(token),
        state=state,
        generation=generation,
    )


async def apply(
    running: Running, found: index.IndexEntry | None, removed_generation: int = 0
) -> pb.ApplyIndexEntryResponse:
    request = pb.ApplyIndexEntryRequest(
        space=TEAM, entry=found.dumps() if found else "", removed_generation=removed_generation
    )
    return await running.spaces.ApplyIndexEntry(request, metadata=md(token=ADMIN_TOKEN))


async def remember(running: Running, token: str = "ta") -> grpc.StatusCode:
    call = running.memories.Remember(
        pb.RememberRequest(memory=memory("x")), metadata=md(TEAM, token)
    )
    return await status_of(call)


async def generation_in_health(running: Running) -> int:
    answer = await running.spaces.Health(pb.HealthRequest(), metadata=md(token=ADMIN_TOKEN))
    (found,) = answer.spaces
    return found.index_generation


async def test_an_applied_inactive_entry_refuses_calls_at_once_and_active_serves_again(
    slow_index: Running,
) -> None:
    assert await remember(slow_index) is grpc.StatusCode.OK
    answer = await apply(slow_index, entry(2, "Inactive"))
    assert (answer.state, answer.generation) == ("Inactive", 2)
    assert await remember(slow_index) is grpc.StatusCode.FAILED_PRECONDITION
    assert slow_index.server.registry.loaded() == {}  # unloaded before the answer
    assert await generation_in_health(slow_index) == 2

    answer = await apply(slow_index, entry(3, "Active"))
    assert (answer.state, answer.generation) == ("Active", 3)
    assert await remember(slow_index) is grpc.StatusCode.OK


async def test_an_applied_removal_refuses_the_space_at_once(slow_index: Running) -> None:
    assert await remember(slow_index) is grpc.StatusCode.OK
    answer = await apply(slow_index, None, removed_generation=2)
    assert (answer.state, answer.generation) == ("Absent", 2)
    assert await remember(slow_index) is grpc.StatusCode.PERMISSION_DENIED
    listed = await slow_index.spaces.ListSpaces(
        pb.ListSpacesRequest(), metadata=md(token=ADMIN_TOKEN)
    )
    assert list(listed.spaces) == []


async def test_an_applied_quota_change_and_a_new_token_take_effect_at_once(
    slow_index: Running,
) -> None:
    newer = dataclasses.replace(entry(2, token="tb"), quota=index.Quota(max_memories=1))
    await apply(slow_index, newer)
    assert await remember(slow_index, "ta") is grpc.StatusCode.PERMISSION_DENIED
    assert await remember(slow_index, "tb") is grpc.StatusCode.OK
    assert await remember(slow_index, "tb") is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_late_projection_of_older_content_does_not_undo_an_applied_change(
    slow_index: Running, managed_dirs: tuple[Path, Path]
) -> None:
    index_dir, _ = managed_dirs
    await apply(slow_index, entry(3, "Inactive"))
    # A kubelet's cache projects the Secret as it was before (generation 2, Active).
    index.write_entry(index_dir, entry(2, "Active"))
    await slow_index.server.registry.refresh()
    assert await remember(slow_index) is grpc.StatusCode.FAILED_PRECONDITION
    assert await generation_in_health(slow_index) == 3


async def test_a_newer_entry_in_the_directory_wins_over_an_applied_one(
    slow_index: Running, managed_dirs: tuple[Path, Path]
) -> None:
    index_dir, _ = managed_dirs
    await apply(slow_index, entry(2, "Inactive"))
    # A later change whose direct call never arrived reaches the shard through the projection.
    index.write_entry(index_dir, entry(3, "Active"))
    await slow_index.server.registry.refresh()
    assert await remember(slow_index) is grpc.StatusCode.OK
    assert await generation_in_health(slow_index) == 3


async def test_the_projection_catching_up_keeps_the_applied_state(
    slow_index: Running, managed_dirs: tuple[Path, Path]
) -> None:
    index_dir, _ = managed_dirs
    await apply(slow_index, None, removed_generation=2)
    (index_dir / index.entry_filename(TEAM)).unlink()
    await slow_index.server.registry.refresh()
    assert await remember(slow_index) is grpc.StatusCode.PERMISSION_DENIED
    # A new incarnation of the space ID, applied before its projection arrives.
    await apply(slow_index, entry(1, token="tc"))
    assert await remember(slow_index, "tc") is grpc.StatusCode.OK


async def test_apply_index_entry_needs_the_admin_token_and_a_valid_entry(
    slow_index: Running,
) -> None:
    request = pb.ApplyIndexEntryRequest(space=TEAM, entry=entry(2, "Inactive").dumps())
    denied = await failure(slow_index.spaces.ApplyIndexEntry(request, metadata=md(TEAM, "ta")))
    assert denied.code() is grpc.StatusCode.PERMISSION_DENIED
    bad = pb.ApplyIndexEntryRequest(space=TEAM, entry='{"spaceId": "team-a", "state": "Gone"}')
    err = await failure(slow_index.spaces.ApplyIndexEntry(bad, metadata=md(token=ADMIN_TOKEN)))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "state" in details(err)
    other = pb.ApplyIndexEntryRequest(space="team-b", entry=entry(2).dumps())
    err = await failure(slow_index.spaces.ApplyIndexEntry(other, metadata=md(token=ADMIN_TOKEN)))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert await remember(slow_index) is grpc.StatusCode.OK


async def test_a_standalone_server_refuses_apply_index_entry(standalone: Running) -> None:
    request = pb.ApplyIndexEntryRequest(space="default", removed_generation=1)
    err = await failure(standalone.spaces.ApplyIndexEntry(request))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
