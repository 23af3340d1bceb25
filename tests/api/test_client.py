"""The client library: credentials from the operator's Secret keys, metadata set for the caller."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from memspace_contract import client, index, spaces
from memspace_contract.v1 import memspace_pb2 as pb
from tests.api.conftest import ADMIN_TOKEN, DIM, Start, failure


def write_secret(directory: Path, **keys: str) -> Path:
    directory.mkdir()
    for key, value in keys.items():
        (directory / key).write_text(value + "\n")
    return directory


def test_credentials_come_from_a_mounted_secret(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "secret", space="team-a", endpoint="h:1", token="tok")
    found = client.Credentials.from_env({"MEMSPACE_CREDENTIALS_DIR": str(secret)})
    assert found == client.Credentials(endpoint="h:1", space="team-a", token="tok")
    assert found.metadata() == (("x-memory-space", "team-a"), ("authorization", "Bearer tok"))


def test_environment_values_and_files_override_the_secret(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "secret", space="team-a", endpoint="h:1", token="tok")
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    found = client.Credentials.from_env(
        {
            "MEMSPACE_CREDENTIALS_DIR": str(secret),
            "MEMSPACE_ENDPOINT": "h:2",
            "MEMSPACE_TOKEN_FILE": str(token_file),
        }
    )
    assert found == client.Credentials(endpoint="h:2", space="team-a", token="from-file")


def test_without_anything_the_client_talks_to_a_local_default_space() -> None:
    found = client.Credentials.from_env({})
    assert found == client.Credentials(endpoint="127.0.0.1:50051", space=None, token=None)
    assert found.metadata() == ()


def test_bad_credentials_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(client.CredentialsError, match="does not exist"):
        client.Credentials.from_env({"MEMSPACE_CREDENTIALS_DIR": str(tmp_path / "none")})
    with pytest.raises(client.CredentialsError, match="cannot read"):
        client.Credentials.from_env({"MEMSPACE_TOKEN_FILE": str(tmp_path / "none")})
    with pytest.raises(spaces.InvalidSpaceIdError):
        client.Credentials(space="Not Valid")


async def test_the_client_sets_space_and_token_on_every_call(
    start: Start, admin_token_file: Path
) -> None:
    running = await start(admin_token_file=admin_token_file)
    admin = client.connect(client.Credentials(endpoint=running.address, token=ADMIN_TOKEN))
    async with admin:
        await admin.spaces.CreateSpace(
            pb.CreateSpaceRequest(
                space="team-a", embedding_dim=DIM, token_sha256=index.token_sha256("ta")
            )
        )
    credentials = client.Credentials(endpoint=running.address, space="team-a", token="ta")
    async with client.connect(credentials) as memspace:
        done = await memspace.remember("hello", [1.0, 0.0, 0.0, 0.0], tags={"k": "v"})
        hits = await memspace.recall([1.0, 0.0, 0.0, 0.0], k=3, min_score=0.5)
        assert [h.memory.id for h in hits] == [done.id]
        assert (await memspace.get(done.id)).content == "hello"
        events = memspace.subscribe(since_lsn=done.lsn)
        first = await anext(events)
        await events.aclose()
        assert (first.id, first.space) == (done.id, "team-a")
        health = await memspace.health()
        assert [(h.space, h.memories) for h in health.spaces] == [("team-a", 1)]
        # Raw stubs get the metadata too.
        got = await memspace.memories.Get(pb.GetRequest(id=done.id))
        assert got.memory.id == done.id
        assert (await memspace.forget(done.id)).forgotten is True
    wrong = client.Credentials(endpoint=running.address, space="team-a", token="nope")
    async with client.connect(wrong) as memspace:
        err = await failure(memspace.recall([1.0, 0.0, 0.0, 0.0]))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
