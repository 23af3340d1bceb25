"""Subscribe: one space's events in LSN order, replay from since_lsn then live, and a bounded
buffer per subscriber that ends a slow stream with the LSN to resume from."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc
from tests.api.conftest import Running, Start, collect, details, memory, subscribed, trailers


async def remember(running: Running, count: int, prefix: str = "m") -> list[pb.RememberResponse]:
    return [
        await running.memories.Remember(pb.RememberRequest(memory=memory(f"{prefix}{i}")))
        for i in range(count)
    ]


async def ended_with(stream: Any) -> grpc.aio.AioRpcError:
    """Read a stream to its end, which must be an error."""
    try:
        async with asyncio.timeout(30):
            async for _ in stream:
                pass
    except grpc.aio.AioRpcError as err:
        return err
    raise AssertionError("the stream ended without an error")


async def test_replay_from_since_lsn_then_live(standalone: Running) -> None:
    written = await remember(standalone, 3)
    stream = standalone.memories.Subscribe(pb.SubscribeRequest(since_lsn=written[1].lsn))
    replayed = await collect(stream, 2)
    assert [e.lsn for e in replayed] == [written[1].lsn, written[2].lsn]
    later = await remember(standalone, 2, "later")
    live = await collect(stream, 2)
    assert [(e.id, e.lsn) for e in live] == [(w.id, w.lsn) for w in later]
    assert {e.type for e in replayed + live} == {pb.EVENT_TYPE_REMEMBERED}
    stream.cancel()


async def test_since_lsn_zero_is_from_now_on(standalone: Running) -> None:
    await remember(standalone, 2)
    stream = standalone.memories.Subscribe(pb.SubscribeRequest())
    await subscribed(standalone)
    (new,) = await remember(standalone, 1, "new")
    (event,) = await collect(stream, 1)
    assert (event.id, event.lsn, event.space) == (new.id, new.lsn, "default")
    stream.cancel()


async def test_forgetting_is_an_event(standalone: Running) -> None:
    (written,) = await remember(standalone, 1)
    gone = await standalone.memories.Forget(pb.ForgetRequest(id=written.id))
    stream = standalone.memories.Subscribe(pb.SubscribeRequest(since_lsn=written.lsn))
    events = await collect(stream, 2)
    stream.cancel()
    assert [(e.type, e.id, e.lsn) for e in events] == [
        (pb.EVENT_TYPE_REMEMBERED, written.id, written.lsn),
        (pb.EVENT_TYPE_FORGOTTEN, written.id, gone.lsn),
    ]
    assert events[1].at.ToNanoseconds() >= events[0].at.ToNanoseconds()


async def test_a_slow_subscriber_is_cut_off_with_the_lsn_to_resume_from(start: Start) -> None:
    running = await start(subscriber_buffer=8)
    # A reader that does not read: a small, fixed HTTP/2 window and socket buffer, so the
    # transport stops taking events soon and the server's feed buffer fills behind it.
    channel = grpc.aio.insecure_channel(
        running.address,
        options=[
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", 1024),
            ("grpc.max_receive_message_length", 1024),
        ],
    )
    slow = pb_grpc.MemoryServiceStub(channel)
    stream = slow.Subscribe(pb.SubscribeRequest())
    await subscribed(running)

    async def batch() -> AsyncIterator[pb.RememberRequest]:
        for i in range(1000):
            yield pb.RememberRequest(memory=memory(f"m{i}"))

    # Nobody reads: the events fill the stream's HTTP/2 window (64 KiB, about 1,000 events),
    # then the subscriber's buffer (one commit may exceed it; the next one finds the subscriber
    # more than a buffer behind). Six batches are three times what the cut-off takes.
    for _ in range(6):
        done = await running.memories.RememberBatch(batch())
    received = []
    try:
        async with asyncio.timeout(30):
            async for event in stream:
                received.append(event.lsn)
    except grpc.aio.AioRpcError as err:
        error = err
    else:
        raise AssertionError("the slow stream was not cut off")
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    resume = received[-1] + 1 if received else 1
    assert received == list(range(1, resume))
    assert resume <= done.last_lsn
    assert f"since_lsn={resume}" in details(error)
    assert trailers(error)["memspace-resume-lsn"] == str(resume)
    await channel.close(None)
    again = running.memories.Subscribe(pb.SubscribeRequest(since_lsn=resume))
    # The replay of up to 5,000 events: a generous bound for a busy machine.
    rest = await collect(again, done.last_lsn - resume + 1, within_s=30)
    again.cancel()
    assert [e.lsn for e in rest] == list(range(resume, done.last_lsn + 1))


async def test_a_replay_from_a_dropped_lsn_is_a_failed_precondition(standalone: Running) -> None:
    await remember(standalone, 3)
    await standalone.memories.Consolidate(pb.ConsolidateRequest())
    await remember(standalone, 1, "after")
    err = await ended_with(standalone.memories.Subscribe(pb.SubscribeRequest(since_lsn=1)))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "no longer in the WAL" in details(err)


async def test_deleting_a_space_ends_its_subscribers_with_unavailable(
    standalone: Running,
) -> None:
    await standalone.spaces.CreateSpace(pb.CreateSpaceRequest(space="doomed", embedding_dim=4))
    stream = standalone.memories.Subscribe(pb.SubscribeRequest(space="doomed"))
    await subscribed(standalone, "doomed")
    await standalone.spaces.DeleteSpace(pb.DeleteSpaceRequest(space="doomed"))
    err = await ended_with(stream)
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert "since_lsn=" in details(err)


async def test_a_drain_ends_subscribers_with_unavailable_and_the_resume_lsn(
    standalone: Running,
) -> None:
    written = await remember(standalone, 2)
    stream = standalone.memories.Subscribe(pb.SubscribeRequest(since_lsn=1))
    assert len(await collect(stream, 2)) == 2
    drained = asyncio.create_task(standalone.server.drain())
    err = await ended_with(stream)
    assert await drained
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert "draining" in details(err)
    resume = str(written[-1].lsn + 1)
    assert trailers(err)["memspace-resume-lsn"] == resume
