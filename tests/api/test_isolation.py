"""Spaces are isolated for every RPC: what is remembered in one space is never seen, changed or
announced through another, also under concurrent writes to many spaces."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from memspace_contract.v1 import memspace_pb2 as pb
from tests.api.conftest import DIM, Running, collect, failure, md, memory, subscribed, vec

A, B = "space-a", "space-b"


@pytest.fixture
async def two(standalone: Running) -> Running:
    for space in (A, B):
        await standalone.spaces.CreateSpace(pb.CreateSpaceRequest(space=space, embedding_dim=DIM))
    return standalone


async def remember_in_a(running: Running) -> list[pb.RememberResponse]:
    m = running.memories
    return [
        await m.Remember(
            pb.RememberRequest(memory=memory(f"a{i}", 1.0, float(i), tag="t")), metadata=md(A)
        )
        for i in range(3)
    ]


async def test_recall_in_b_never_returns_a_memories(two: Running) -> None:
    await remember_in_a(two)
    found = await two.memories.Recall(pb.RecallRequest(cue=vec(1), k=100), metadata=md(B))
    assert list(found.hits) == []
    filtered = await two.memories.Recall(
        pb.RecallRequest(cue=vec(1), k=100, tags={"tag": "t"}), metadata=md(B)
    )
    assert list(filtered.hits) == []
    in_a = await two.memories.Recall(pb.RecallRequest(cue=vec(1), k=100), metadata=md(A))
    assert len(in_a.hits) == 3


async def test_get_and_forget_in_b_do_not_reach_a_memories(two: Running) -> None:
    written = await remember_in_a(two)
    for done in written:
        err = await failure(two.memories.Get(pb.GetRequest(id=done.id), metadata=md(B)))
        assert err.code() is grpc.StatusCode.NOT_FOUND
        gone = await two.memories.Forget(pb.ForgetRequest(id=done.id), metadata=md(B))
        assert gone.forgotten is False
    for done in written:
        kept = await two.memories.Get(pb.GetRequest(id=done.id), metadata=md(A))
        assert kept.memory.id == done.id


async def test_the_same_id_in_two_spaces_is_two_memories(two: Running) -> None:
    m = two.memories
    for space in (A, B):
        await m.Remember(
            pb.RememberRequest(memory=pb.Memory(id="shared", content=space, embedding=vec(1))),
            metadata=md(space),
        )
    await m.Forget(pb.ForgetRequest(id="shared"), metadata=md(B))
    kept = await m.Get(pb.GetRequest(id="shared"), metadata=md(A))
    assert kept.memory.content == A


async def test_subscribe_in_b_sees_no_a_events(two: Running) -> None:
    await remember_in_a(two)
    m = two.memories
    replay = m.Subscribe(pb.SubscribeRequest(since_lsn=1), metadata=md(B))
    live = m.Subscribe(pb.SubscribeRequest(), metadata=md(B))
    await subscribed(two, B, count=2)  # both streams are open before the writes below
    await remember_in_a(two)
    mine = await m.Remember(pb.RememberRequest(memory=memory("b")), metadata=md(B))
    for stream in (replay, live):
        (event,) = await collect(stream, 1)
        assert (event.space, event.id, event.lsn) == (B, mine.id, mine.lsn)
        stream.cancel()


async def test_health_and_consolidate_of_b_count_nothing_of_a(two: Running) -> None:
    await remember_in_a(two)
    health = await two.spaces.Health(pb.HealthRequest(space=B))
    assert [(h.space, h.memories) for h in health.spaces] == [(B, 0)]
    done = await two.memories.Consolidate(pb.ConsolidateRequest(), metadata=md(B))
    assert done.consolidated == 0
    health_a = await two.spaces.Health(pb.HealthRequest(space=A))
    assert health_a.spaces[0].memories == 3


async def test_a_batch_in_b_lands_in_b_only(two: Running) -> None:
    async def requests() -> AsyncIterator[pb.RememberRequest]:
        for i in range(5):
            yield pb.RememberRequest(memory=memory(f"b{i}"))

    done = await two.memories.RememberBatch(requests(), metadata=md(B))
    assert done.count == 5
    health = await two.spaces.Health(pb.HealthRequest())
    assert {h.space: h.memories for h in health.spaces} == {"default": 0, A: 0, B: 5}


async def test_twenty_spaces_created_concurrently_are_all_usable(standalone: Running) -> None:
    names = [f"tenant-{i:02d}" for i in range(20)]
    made = await asyncio.gather(
        *(
            standalone.spaces.CreateSpace(pb.CreateSpaceRequest(space=name, embedding_dim=DIM))
            for name in names
        )
    )
    assert [m.created for m in made] == [True] * 20
    listed = await standalone.spaces.ListSpaces(pb.ListSpacesRequest())
    assert [s.space for s in listed.spaces] == ["default", *names]

    async def use(name: str) -> tuple[str, list[str]]:
        await standalone.memories.Remember(
            pb.RememberRequest(memory=memory(name)), metadata=md(name)
        )
        found = await standalone.memories.Recall(
            pb.RecallRequest(cue=vec(1), k=50), metadata=md(name)
        )
        return name, [h.memory.content for h in found.hits]

    for name, contents in await asyncio.gather(*(use(n) for n in names)):
        assert contents == [name]


async def test_subscribers_of_many_spaces_under_concurrent_writes_see_only_their_own(
    standalone: Running,
) -> None:
    names = [f"busy-{i}" for i in range(8)]
    writes = 25
    await asyncio.gather(
        *(
            standalone.spaces.CreateSpace(pb.CreateSpaceRequest(space=n, embedding_dim=DIM))
            for n in names
        )
    )
    m = standalone.memories
    streams = {n: m.Subscribe(pb.SubscribeRequest(), metadata=md(n)) for n in names}
    for name in names:  # every subscription is live before the writes
        await subscribed(standalone, name)

    async def writer(name: str) -> list[tuple[str, int]]:
        acked = []
        for i in range(writes):
            done = await m.Remember(
                pb.RememberRequest(memory=memory(f"{name}/{i}")), metadata=md(name)
            )
            acked.append((done.id, done.lsn))
        return acked

    acked = dict(zip(names, await asyncio.gather(*(writer(n) for n in names)), strict=True))
    for name, stream in streams.items():
        events = await collect(stream, writes)
        stream.cancel()
        assert {e.space for e in events} == {name}
        assert [(e.id, e.lsn) for e in events] == acked[name]
        lsns = [e.lsn for e in events]
        assert lsns == sorted(lsns)
