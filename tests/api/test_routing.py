"""Space selection (design section 5) for every RPC: metadata `x-memory-space`, else the
request's `space` field; conflicts and malformed IDs are INVALID_ARGUMENT, never `default`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from memspace_contract.v1 import memspace_pb2 as pb
from tests.api.conftest import (
    Running,
    Start,
    details,
    failure,
    md,
    memory,
    rpc_callers,
    status_of,
    vec,
    write_entry,
)

ONE_SPACE_RPCS = [
    "Remember",
    "RememberBatch",
    "Recall",
    "Get",
    "Forget",
    "Subscribe",
    "Consolidate",
    "CreateSpace",
    "DeleteSpace",
    "Health",
]
MEMORY_RPCS = ONE_SPACE_RPCS[:7]


@pytest.fixture
async def with_team(standalone: Running) -> Running:
    await standalone.spaces.CreateSpace(pb.CreateSpaceRequest(space="team-a", embedding_dim=4))
    return standalone


async def count(running: Running, space: str) -> int:
    found = await running.spaces.Health(pb.HealthRequest(space=space))
    return found.spaces[0].memories


async def test_metadata_names_the_space(with_team: Running) -> None:
    m = with_team.memories
    await m.Remember(pb.RememberRequest(memory=memory("a")), metadata=md("team-a"))
    assert await count(with_team, "team-a") == 1
    assert await count(with_team, "default") == 0


async def test_the_space_field_names_the_space_without_metadata(with_team: Running) -> None:
    await with_team.memories.Remember(pb.RememberRequest(space="team-a", memory=memory("a")))
    assert await count(with_team, "team-a") == 1
    assert await count(with_team, "default") == 0


async def test_metadata_and_field_may_name_the_same_space(with_team: Running) -> None:
    await with_team.memories.Remember(
        pb.RememberRequest(space="team-a", memory=memory("a")), metadata=md("team-a")
    )
    assert await count(with_team, "team-a") == 1


async def test_no_space_named_is_the_default_space_standalone(with_team: Running) -> None:
    await with_team.memories.Remember(pb.RememberRequest(memory=memory("a")))
    assert await count(with_team, "default") == 1
    assert await count(with_team, "team-a") == 0


@pytest.mark.parametrize("rpc", ONE_SPACE_RPCS)
async def test_metadata_and_field_naming_different_spaces_is_invalid(
    with_team: Running, rpc: str
) -> None:
    call = rpc_callers(with_team.api)[rpc]
    err = await failure(call("default", md("team-a")))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'team-a'" in details(err)
    assert "'default'" in details(err)


MALFORMED = ["Team-A", "a", "x" * 64, "-ab", "ab-", "a_b", "sp ace"]


@pytest.mark.parametrize("rpc", ONE_SPACE_RPCS)
@pytest.mark.parametrize(
    ("where", "bad"),
    [("metadata", bad) for bad in [*MALFORMED, ""]] + [("field", bad) for bad in MALFORMED],
)
async def test_a_malformed_space_id_is_invalid_never_the_default(
    with_team: Running, rpc: str, where: str, bad: str
) -> None:
    call = rpc_callers(with_team.api)[rpc]
    named = call("", md(bad)) if where == "metadata" else call(bad, ())
    err = await failure(named)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, details(err)
    assert "3 to 63 characters" in details(err)
    assert await count(with_team, "default") == 0


@pytest.mark.parametrize("rpc", MEMORY_RPCS)
async def test_two_different_metadata_spaces_are_invalid(with_team: Running, rpc: str) -> None:
    call = rpc_callers(with_team.api)[rpc]
    meta = (("x-memory-space", "team-a"), ("x-memory-space", "default"))
    err = await failure(call("", meta))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("rpc", [*MEMORY_RPCS, "DeleteSpace"])
async def test_an_unknown_space_is_not_found(standalone: Running, rpc: str) -> None:
    call = rpc_callers(standalone.api)[rpc]
    if rpc == "DeleteSpace":
        assert (await call("nowhere", ())).deleted is False
        return
    err = await failure(call("nowhere", ()))
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert "nowhere" in details(err)


@pytest.mark.parametrize("rpc", ["CreateSpace", "DeleteSpace"])
async def test_space_management_needs_a_named_space(standalone: Running, rpc: str) -> None:
    err = await failure(rpc_callers(standalone.api)[rpc]("", ()))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "x-memory-space" in details(err)


async def test_health_without_a_space_is_every_space(with_team: Running) -> None:
    found = await with_team.spaces.Health(pb.HealthRequest())
    assert [h.space for h in found.spaces] == ["default", "team-a"]


async def test_a_batch_message_naming_another_space_is_invalid(with_team: Running) -> None:
    async def requests() -> AsyncIterator[pb.RememberRequest]:
        yield pb.RememberRequest(space="team-a", memory=memory("one"))
        yield pb.RememberRequest(memory=memory("two"))
        yield pb.RememberRequest(space="default", memory=memory("three"))

    err = await failure(with_team.memories.RememberBatch(requests()))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert await count(with_team, "team-a") == 0
    assert await count(with_team, "default") == 0


async def test_a_batch_names_its_space_in_metadata_or_its_first_message(
    with_team: Running,
) -> None:
    async def requests() -> AsyncIterator[pb.RememberRequest]:
        yield pb.RememberRequest(space="team-a", memory=memory("one"))
        yield pb.RememberRequest(memory=memory("two"))

    done = await with_team.memories.RememberBatch(requests())
    assert done.count == 2
    assert await count(with_team, "team-a") == 2

    async def unnamed() -> AsyncIterator[pb.RememberRequest]:
        yield pb.RememberRequest(memory=memory("three"))

    await with_team.memories.RememberBatch(unnamed(), metadata=md("team-a"))
    assert await count(with_team, "team-a") == 3
    assert await count(with_team, "default") == 0


async def test_a_managed_server_has_no_default_space(
    start: Start, managed_dirs: tuple[Path, Path]
) -> None:
    index_dir, volumes = managed_dirs
    write_entry(index_dir, "default", token="t-default", volumes=volumes)
    running = await start(data_root=volumes, index_dir=index_dir)
    err = await failure(
        running.memories.Recall(pb.RecallRequest(cue=vec(1), k=1), metadata=md(token="t-default"))
    )
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "no default space" in details(err)
    ok = await status_of(
        running.memories.Recall(
            pb.RecallRequest(cue=vec(1), k=1), metadata=md("default", "t-default")
        )
    )
    assert ok is grpc.StatusCode.OK


async def test_empty_metadata_with_a_named_field_goes_to_the_field(with_team: Running) -> None:
    """Metadata wins only when present and non-empty (design section 5): an empty
    `x-memory-space` is as if absent when the request's field names a space."""
    await with_team.memories.Remember(
        pb.RememberRequest(space="team-a", memory=memory("a")), metadata=md("")
    )
    assert await count(with_team, "team-a") == 1
    assert await count(with_team, "default") == 0


async def test_empty_metadata_without_a_field_is_invalid_never_default(with_team: Running) -> None:
    err = await failure(
        with_team.memories.Remember(pb.RememberRequest(memory=memory("a")), metadata=md(""))
    )
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "empty" in details(err)
    assert await count(with_team, "default") == 0
