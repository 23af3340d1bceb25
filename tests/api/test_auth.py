"""Auth: each space's token opens that space only; the admin token opens SpaceService; a token
that does not open the named space gets PERMISSION_DENIED whether or not the space exists."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from memspace_contract import index
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_server import settings
from tests.api.conftest import (
    ADMIN_TOKEN,
    DIM,
    Running,
    Start,
    details,
    eventually,
    failure,
    md,
    memory,
    rpc_callers,
    status_of,
    write_entry,
)

MEMORY_RPCS = ["Remember", "RememberBatch", "Recall", "Get", "Forget", "Subscribe", "Consolidate"]
SPACE_RPCS = ["CreateSpace", "DeleteSpace", "ListSpaces", "Health"]
TOKENS = {"team-a": "token-of-team-a", "team-b": "token-of-team-b"}


@pytest.fixture
async def guarded(start: Start, admin_token_file: Path) -> Running:
    """A standalone server with an admin token and two spaces with tokens of their own."""
    running = await start(admin_token_file=admin_token_file)
    for space, token in TOKENS.items():
        await running.spaces.CreateSpace(
            pb.CreateSpaceRequest(
                space=space, embedding_dim=DIM, token_sha256=index.token_sha256(token)
            ),
            metadata=md(token=ADMIN_TOKEN),
        )
    return running


async def code(running: Running, rpc: str, space: str, token: str | None) -> grpc.StatusCode:
    return await status_of(rpc_callers(running.api)[rpc]("", md(space, token)))


@pytest.mark.parametrize("rpc", MEMORY_RPCS + SPACE_RPCS)
async def test_no_token_is_unauthenticated(guarded: Running, rpc: str) -> None:
    err = await failure(rpc_callers(guarded.api)[rpc]("team-a", ()))
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in details(err)


@pytest.mark.parametrize("header", ["Basic dXNlcjpwdw==", "Bearer", "token-of-team-a", "Bearer  "])
async def test_a_malformed_authorization_header_is_unauthenticated(
    guarded: Running, header: str
) -> None:
    meta = (("x-memory-space", "team-a"), ("authorization", header))
    err = await failure(rpc_callers(guarded.api)["Recall"]("", meta))
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("rpc", MEMORY_RPCS)
async def test_a_space_token_opens_its_space(guarded: Running, rpc: str) -> None:
    assert await code(guarded, rpc, "team-a", TOKENS["team-a"]) in {
        grpc.StatusCode.OK,
        grpc.StatusCode.NOT_FOUND,  # Get of a memory that does not exist
    }


@pytest.mark.parametrize("rpc", MEMORY_RPCS)
@pytest.mark.parametrize(
    ("space", "token"),
    [
        ("team-a", "wrong-token"),
        ("team-a", TOKENS["team-b"]),
        ("ghost", TOKENS["team-a"]),
        ("ghost", "wrong-token"),
        ("team-a", ADMIN_TOKEN),
    ],
)
async def test_a_token_that_does_not_open_the_space_is_denied(
    guarded: Running, rpc: str, space: str, token: str
) -> None:
    err = await failure(rpc_callers(guarded.api)[rpc]("", md(space, token)))
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert details(err) == (
        f"the token does not open space '{space}'; each space's token opens that space only"
    )


async def test_a_denial_does_not_tell_whether_the_space_exists(guarded: Running) -> None:
    recall = rpc_callers(guarded.api)["Recall"]
    existing = await failure(recall("", md("team-b", TOKENS["team-a"])))
    missing = await failure(recall("", md("team-c", TOKENS["team-a"])))
    assert existing.code() is missing.code() is grpc.StatusCode.PERMISSION_DENIED
    assert details(existing).replace("team-b", "X") == details(missing).replace("team-c", "X")


async def test_a_space_token_never_reaches_another_spaces_data(guarded: Running) -> None:
    m = guarded.memories
    await m.Remember(
        pb.RememberRequest(memory=memory("secret of a")), metadata=md("team-a", TOKENS["team-a"])
    )
    err = await failure(
        m.Recall(
            pb.RecallRequest(space="team-a", k=5, cue=[1, 0, 0, 0]),
            metadata=md(token=TOKENS["team-b"]),
        )
    )
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("rpc", SPACE_RPCS)
async def test_the_admin_token_opens_space_service(guarded: Running, rpc: str) -> None:
    space = "" if rpc == "ListSpaces" else "team-new"
    if rpc == "Health":
        space = "team-a"
    assert await code(guarded, rpc, space, ADMIN_TOKEN) is grpc.StatusCode.OK


async def test_health_of_every_space_with_the_admin_token(guarded: Running) -> None:
    found = await guarded.spaces.Health(pb.HealthRequest(), metadata=md(token=ADMIN_TOKEN))
    assert [h.space for h in found.spaces] == ["default", "team-a", "team-b"]


@pytest.mark.parametrize("rpc", ["CreateSpace", "DeleteSpace", "ListSpaces"])
async def test_a_space_token_does_not_open_space_management(guarded: Running, rpc: str) -> None:
    err = await failure(rpc_callers(guarded.api)[rpc]("", md("team-a", TOKENS["team-a"])))
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "admin token" in details(err)


async def test_a_space_token_opens_the_health_of_its_space_only(guarded: Running) -> None:
    s = guarded.spaces
    own = await s.Health(pb.HealthRequest(), metadata=md("team-a", TOKENS["team-a"]))
    assert [h.space for h in own.spaces] == ["team-a"]
    for space, token in (("team-b", TOKENS["team-a"]), (None, TOKENS["team-a"])):
        err = await failure(s.Health(pb.HealthRequest(), metadata=md(space, token)))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_the_admin_token_opens_spaces_without_a_token_of_their_own(
    guarded: Running,
) -> None:
    m = guarded.memories
    await m.Remember(pb.RememberRequest(memory=memory("a")), metadata=md(token=ADMIN_TOKEN))
    unknown = await failure(
        m.Recall(pb.RecallRequest(cue=[1, 0, 0, 0], k=1), metadata=md("ghost", ADMIN_TOKEN))
    )
    assert unknown.code() is grpc.StatusCode.NOT_FOUND  # the admin may know what exists


async def test_a_standalone_server_without_admin_token_checks_no_tokens(
    standalone: Running,
) -> None:
    assert await code(standalone, "Recall", "default", None) is grpc.StatusCode.OK
    assert await code(standalone, "Recall", "default", "anything") is grpc.StatusCode.OK
    assert await code(standalone, "ListSpaces", "", None) is grpc.StatusCode.OK


async def test_an_open_server_off_loopback_is_refused_unless_insecure(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(settings.SettingsError, match="without an admin token"):
        await start(listen="0.0.0.0:0")
    with caplog.at_level(logging.WARNING):
        await start(listen="0.0.0.0:0", insecure=True)
    assert "without token checks" in caplog.text


async def test_a_loopback_server_does_not_warn(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        await start()
    assert "without token checks" not in caplog.text


def rotate(path: Path, token: str) -> None:
    path.write_text(token)


async def test_a_rotated_admin_token_is_picked_up(guarded: Running, admin_token_file: Path) -> None:
    rotate(admin_token_file, "the-next-admin-token")

    async def rotated() -> bool:
        return await code(guarded, "ListSpaces", "", "the-next-admin-token") is (grpc.StatusCode.OK)

    await eventually(rotated)
    assert await code(guarded, "ListSpaces", "", ADMIN_TOKEN) is grpc.StatusCode.PERMISSION_DENIED


async def test_a_managed_server_checks_space_tokens(
    start: Start, managed_dirs: tuple[Path, Path]
) -> None:
    index_dir, volumes = managed_dirs
    for space, token in TOKENS.items():
        write_entry(index_dir, space, token=token, volumes=volumes)
    running = await start(data_root=volumes, index_dir=index_dir)
    assert await code(running, "Recall", "team-a", TOKENS["team-a"]) is grpc.StatusCode.OK
    assert await code(running, "Recall", "team-a", None) is grpc.StatusCode.UNAUTHENTICATED
    denied = await code(running, "Recall", "team-a", TOKENS["team-b"])
    assert denied is grpc.StatusCode.PERMISSION_DENIED
    # No admin token configured: nothing opens SpaceService.
    listing = await code(running, "ListSpaces", "", TOKENS["team-a"])
    assert listing is grpc.StatusCode.PERMISSION_DENIED
