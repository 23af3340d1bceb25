"""Every error case of design section 5 answers its status code, with a message saying what was
wrong and what is allowed."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import pytest

from memspace_contract.v1 import memspace_pb2 as pb
from tests.api.conftest import DIM, Running, Start, details, failure, md, memory, status_of, vec
from tests.conftest import QuotaClock


def remember(running: Running, message: pb.Memory, space: str = "") -> Awaitable[Any]:
    return running.memories.Remember(pb.RememberRequest(space=space, memory=message))


@pytest.mark.parametrize(
    ("embedding", "says"),
    [
        ([1.0, 0.0, 0.0], "exactly 4"),
        ([1.0] * 5, "exactly 4"),
        ([], "exactly 4"),
        ([math.nan, 1.0, 0.0, 0.0], "NaN or infinity"),
        ([math.inf, 1.0, 0.0, 0.0], "NaN or infinity"),
        ([0.0] * DIM, "zero vector"),
    ],
)
async def test_a_bad_embedding_is_invalid(
    standalone: Running, embedding: list[float], says: str
) -> None:
    err = await failure(remember(standalone, pb.Memory(content="x", embedding=embedding)))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert says in details(err)
    cue_err = await failure(standalone.memories.Recall(pb.RecallRequest(cue=embedding, k=1)))
    assert cue_err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert says in details(cue_err)


@pytest.mark.parametrize("k", [0, 1001, 5000])
async def test_k_outside_1_to_1000_is_invalid(standalone: Running, k: int) -> None:
    err = await failure(standalone.memories.Recall(pb.RecallRequest(cue=vec(1), k=k)))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "1..1000" in details(err)


async def test_k_of_1000_is_allowed(standalone: Running) -> None:
    await remember(standalone, memory("a"))
    found = await standalone.memories.Recall(pb.RecallRequest(cue=vec(1), k=1000))
    assert len(found.hits) == 1


async def test_content_over_64_kib_is_invalid(standalone: Running) -> None:
    await remember(standalone, pb.Memory(content="x" * 65536, embedding=vec(1)))
    err = await failure(remember(standalone, pb.Memory(content="x" * 65537, embedding=vec(1))))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "65537 bytes; at most 65536" in details(err)


async def test_too_many_tags_are_invalid(standalone: Running) -> None:
    tags = {f"k{i}": "v" for i in range(33)}
    err = await failure(remember(standalone, pb.Memory(content="x", embedding=vec(1), tags=tags)))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 32" in details(err)
    bad_filter = await failure(
        standalone.memories.Recall(pb.RecallRequest(cue=vec(1), k=1, tags=tags))
    )
    assert bad_filter.code() is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("message", "says"),
    [
        (pb.Memory(content="x", embedding=vec(1), confidence=1.5), "allowed 0..1"),
        (pb.Memory(id="x" * 129, content="x", embedding=vec(1)), "at most 128"),
        (pb.Memory(id=" padded ", content="x", embedding=vec(1)), "printable"),
    ],
)
async def test_other_bad_memories_are_invalid(
    standalone: Running, message: pb.Memory, says: str
) -> None:
    err = await failure(remember(standalone, message))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert says in details(err)


async def test_a_remember_without_a_memory_is_invalid(standalone: Running) -> None:
    err = await failure(standalone.memories.Remember(pb.RememberRequest()))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "memory field" in details(err)


async def test_an_unknown_memory_is_not_found(standalone: Running) -> None:
    err = await failure(standalone.memories.Get(pb.GetRequest(id="nope")))
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert "'nope'" in details(err)
    gone = await standalone.memories.Forget(pb.ForgetRequest(id="nope"))
    assert gone.forgotten is False


async def test_a_full_quota_is_resource_exhausted(standalone: Running) -> None:
    await standalone.spaces.CreateSpace(
        pb.CreateSpaceRequest(space="small", embedding_dim=DIM, quota=pb.SpaceQuota(max_memories=2))
    )
    for name in ("a", "b"):
        await remember(standalone, memory(name), "small")
    err = await failure(remember(standalone, memory("c"), "small"))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "maxMemories is 2" in details(err)


async def test_a_write_rate_over_quota_is_resource_exhausted(
    standalone: Running, quota_clock: QuotaClock
) -> None:
    await standalone.spaces.CreateSpace(
        pb.CreateSpaceRequest(
            space="slow", embedding_dim=DIM, quota=pb.SpaceQuota(max_writes_per_second=1)
        )
    )
    codes = [await status_of(remember(standalone, memory(str(i)), "slow")) for i in range(3)]
    assert codes[0] is grpc.StatusCode.OK
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes


async def test_a_message_over_the_size_limit_is_resource_exhausted(start: Start) -> None:
    running = await start(max_receive_message_bytes=32 * 1024)
    err = await failure(remember(running, pb.Memory(content="x" * 40_000, embedding=vec(1))))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_batch_over_the_limit_is_resource_exhausted_and_stores_nothing(
    start: Start,
) -> None:
    running = await start(max_batch=3)

    async def requests() -> AsyncIterator[pb.RememberRequest]:
        for i in range(4):
            yield pb.RememberRequest(memory=memory(str(i)))

    err = await failure(running.memories.RememberBatch(requests()))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 3" in details(err)
    health = await running.spaces.Health(pb.HealthRequest(space="default"))
    assert health.spaces[0].memories == 0


async def test_a_batch_with_one_bad_memory_stores_none(standalone: Running) -> None:
    async def requests() -> AsyncIterator[pb.RememberRequest]:
        yield pb.RememberRequest(memory=memory("good"))
        yield pb.RememberRequest(memory=pb.Memory(content="bad", embedding=[1.0]))

    err = await failure(standalone.memories.RememberBatch(requests()))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    health = await standalone.spaces.Health(pb.HealthRequest(space="default"))
    assert health.spaces[0].memories == 0


async def test_creating_a_space_again_is_idempotent_but_not_with_another_dim(
    standalone: Running,
) -> None:
    s = standalone.spaces
    first = await s.CreateSpace(pb.CreateSpaceRequest(space="team-a", embedding_dim=8))
    again = await s.CreateSpace(pb.CreateSpaceRequest(space="team-a", embedding_dim=8))
    assert first.created is True
    assert again.created is False
    assert again.embedding_dim == 8
    err = await failure(s.CreateSpace(pb.CreateSpaceRequest(space="team-a", embedding_dim=16)))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "embedding_dim 8" in details(err)


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (pb.CreateSpaceRequest(space="x-dim", embedding_dim=4097), "1..4096"),
        (pb.CreateSpaceRequest(space="x-hash", token_sha256="abc"), "64 lower-case hex"),
        (
            pb.CreateSpaceRequest(space="x-zip", tiers=pb.SpaceTiers(cold_compression="gzip")),
            "zstd, lz4, none",
        ),
        (
            pb.CreateSpaceRequest(space="x-rate", quota=pb.SpaceQuota(max_writes_per_second=-1)),
            "above 0",
        ),
    ],
)
async def test_a_bad_space_is_invalid(
    standalone: Running, request_: pb.CreateSpaceRequest, says: str
) -> None:
    err = await failure(standalone.spaces.CreateSpace(request_))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert says in details(err)
    listed = await standalone.spaces.ListSpaces(pb.ListSpacesRequest())
    assert [s.space for s in listed.spaces] == ["default"]


async def test_a_space_created_without_a_dim_has_768(standalone: Running) -> None:
    made = await standalone.spaces.CreateSpace(pb.CreateSpaceRequest(), metadata=md("wide"))
    assert made.space == "wide"
    assert made.embedding_dim == 768
