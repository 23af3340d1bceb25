"""Limits a client cannot get around, against a real server: rate quotas per space (writes and
recalls, with when to retry), server-wide and per-space caps on concurrent calls and streams, the
byte budget of a RememberBatch stream and the size of a Recall answer. Every refusal is
RESOURCE_EXHAUSTED with a message saying what the limit is."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memspace_contract import index
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_server.api import errors_map, serving
from tests.api.conftest import (
    Running,
    Start,
    details,
    eventually,
    failure,
    md,
    memory,
    trailers,
    vec,
    write_entry,
)
from tests.conftest import QuotaClock


async def _batch(running: Running, count: int, space: str = "", token: str | None = None) -> int:
    async def requests() -> AsyncIterator[pb.RememberRequest]:
        for i in range(count):
            yield pb.RememberRequest(memory=memory(f"m{i}", 1.0, float(i)))

    meta = md(space or None, token)
    answer = await running.memories.RememberBatch(requests(), metadata=meta)
    return answer.count


# -- rate quotas ---------------------------------------------------------------------------------


async def test_a_batch_larger_than_one_seconds_write_quota_is_admitted_then_paid_for(
    standalone: Running, quota_clock: QuotaClock
) -> None:
    await standalone.spaces.CreateSpace(
        pb.CreateSpaceRequest(
            space="slow", embedding_dim=4, quota=pb.SpaceQuota(max_writes_per_second=5)
        )
    )
    # 12 memories: more than the bucket of one second's worth (5) ever holds.
    assert await _batch(standalone, 12, "slow") == 12
    # The batch left the bucket in debt: the next write waits until the debt is paid, so the
    # rate over time stays at 5 per second.
    err = await failure(
        standalone.memories.Remember(
            pb.RememberRequest(memory=memory("after")), metadata=md("slow")
        )
    )
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "5 writes per second" in details(err)
    retry = float(trailers(err)[errors_map.RETRY_AFTER_KEY])
    assert 1.0 < retry <= 12 / 5


async def test_recalls_over_the_read_quota_are_resource_exhausted_with_when_to_retry(
    start: Start, managed_dirs: tuple[Path, Path], quota_clock: QuotaClock
) -> None:
    index_dir, volumes = managed_dirs
    write_entry(
        index_dir,
        "reader",
        token="tr",
        volumes=volumes,
        quota=index.Quota(max_recalls_per_second=2),
    )
    running = await start(data_root=volumes, index_dir=index_dir)
    meta = md("reader", "tr")
    request = pb.RecallRequest(cue=vec(1), k=1)
    for _ in range(2):
        await running.memories.Recall(request, metadata=meta)
    err = await failure(running.memories.Recall(request, metadata=meta))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 recalls per second" in details(err)
    assert 0.0 < float(trailers(err)[errors_map.RETRY_AFTER_KEY]) <= 0.5
    # Writes are not counted against the read quota.
    await running.memories.Remember(pb.RememberRequest(memory=memory("w")), metadata=meta)


# -- the bytes of a RememberBatch stream and of a Recall answer ----------------------------------


async def _count(running: Running, space: str = "default") -> int:
    health = await running.spaces.Health(pb.HealthRequest(space=space))
    return int(health.spaces[0].memories)


async def test_a_batch_over_its_byte_budget_is_resource_exhausted_and_stores_nothing(
    start: Start,
) -> None:
    running = await start(max_batch_bytes=64 * 1024)

    async def requests() -> AsyncIterator[pb.RememberRequest]:
        for i in range(20):  # 20 x 8 KiB: well over 64 KiB
            yield pb.RememberRequest(memory=memory("x" * 8192 + str(i)))

    err = await failure(running.memories.RememberBatch(requests()))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 65536 bytes" in details(err)
    assert "nothing of this one was stored" in details(err)
    assert await _count(running) == 0


async def test_a_batch_larger_than_what_a_stream_keeps_in_ram_is_stored_whole(
    standalone: Running,
) -> None:
    # 1,200 memories of 8 KiB: about 10 MiB, staged in chunks past what a stream keeps in RAM;
    # IDs repeat across chunks (the last one wins, as in one write).
    async def requests() -> AsyncIterator[pb.RememberRequest]:
        for i in range(1200):
            yield pb.RememberRequest(
                memory=pb.Memory(
                    id=f"m{i % 1000}", content=f"{i}:" + "y" * 8192, embedding=vec(1.0, i)
                )
            )

    answer = await standalone.memories.RememberBatch(requests())
    assert answer.count == 1200
    assert len(answer.ids) == 1200
    assert await _count(standalone) == 1000
    for i in (0, 199, 200, 999):
        found = await standalone.memories.Get(pb.GetRequest(id=f"m{i}"))
        expected = i + 1000 if i < 200 else i
        assert found.memory.content.startswith(f"{expected}:")
    events = standalone.memories.Subscribe(pb.SubscribeRequest(since_lsn=1))
    lsns = []
    async for event in events:
        lsns.append(event.lsn)
        if len(lsns) == 1200:
            break
    events.cancel()
    assert lsns == list(range(1, 1201))
    assert answer.last_lsn == 1200


async def test_a_recall_answer_over_its_byte_cap_is_resource_exhausted(start: Start) -> None:
    running = await start(max_recall_response_bytes=4096)
    for i in range(5):
        await running.memories.Remember(
            pb.RememberRequest(memory=memory("z" * 1000 + str(i), 1.0, float(i)))
        )
    err = await failure(running.memories.Recall(pb.RecallRequest(cue=vec(1), k=5)))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 4096" in details(err)
    assert "fewer hits" in details(err)
    answer = await running.memories.Recall(pb.RecallRequest(cue=vec(1), k=2))
    assert len(answer.hits) == 2


# -- calls and streams in flight ------------------------------------------------------------------


class _OpenBatch:
    """A RememberBatch stream held open: one memory sent, the stream not finished."""

    def __init__(self, running: Running, meta: tuple[tuple[str, str], ...]) -> None:
        self._queue: asyncio.Queue[pb.RememberRequest | None] = asyncio.Queue()
        self._queue.put_nowait(pb.RememberRequest(memory=memory("held")))
        self.call = running.memories.RememberBatch(self._requests(), metadata=meta)
        self.task = asyncio.ensure_future(self.call)

    async def _requests(self) -> AsyncIterator[pb.RememberRequest]:
        while (item := await self._queue.get()) is not None:
            yield item

    async def finish(self) -> pb.RememberBatchResponse:
        self._queue.put_nowait(None)
        return await self.task


async def _admitted(running: Running, calls: int) -> None:
    """Wait until the server has admitted `calls` calls (streams open asynchronously)."""

    async def admitted() -> bool:
        return running.server.limits.calls >= calls

    await eventually(admitted)


async def _subscribe(running: Running, meta: tuple[tuple[str, str], ...]) -> Any:
    """A Subscribe stream, once the server has admitted it (it stays silent until an event)."""
    before = running.server.limits.calls
    stream = running.memories.Subscribe(pb.SubscribeRequest(), metadata=meta)
    await _admitted(running, before + 1)
    return stream


async def _refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err
    raise AssertionError("the call was not refused")


async def test_calls_over_the_server_wide_cap_are_resource_exhausted(start: Start) -> None:
    running = await start(max_calls=2)
    streams = [await _subscribe(running, ()) for _ in range(2)]
    err = await _refused(running.memories.Recall(pb.RecallRequest(cue=vec(1), k=1)))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "maximum of 2 concurrent calls" in details(err)
    for stream in streams:
        stream.cancel()

    async def released() -> bool:
        return running.server.limits.calls == 0

    await eventually(released)  # the cancelled streams end on the server asynchronously
    await running.memories.Recall(pb.RecallRequest(cue=vec(1), k=1))


async def test_streams_over_the_server_wide_cap_are_resource_exhausted(start: Start) -> None:
    running = await start(max_streams=1)
    stream = await _subscribe(running, ())
    err = await _refused(_OpenBatch(running, md("default")).finish())
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "maximum of 1 open streams" in details(err)
    # Unary calls are not streams.
    await running.memories.Recall(pb.RecallRequest(cue=vec(1), k=1))
    stream.cancel()


async def test_one_space_cannot_take_every_call_slot(
    start: Start, managed_dirs: tuple[Path, Path]
) -> None:
    index_dir, volumes = managed_dirs
    write_entry(index_dir, "busy", token="tb", volumes=volumes)
    write_entry(index_dir, "quiet", token="tq", volumes=volumes)
    running = await start(data_root=volumes, index_dir=index_dir, max_calls_per_space=1)
    held = _OpenBatch(running, md("busy", "tb"))
    await _admitted(running, 1)
    err = await _refused(
        running.memories.Remember(
            pb.RememberRequest(memory=memory("more")), metadata=md("busy", "tb")
        )
    )
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "space 'busy' has its maximum of 1 calls in flight" in details(err)
    # Its neighbour is served meanwhile.
    await running.memories.Remember(
        pb.RememberRequest(memory=memory("fine")), metadata=md("quiet", "tq")
    )
    assert (await held.finish()).count == 1
    await running.memories.Remember(
        pb.RememberRequest(memory=memory("more")), metadata=md("busy", "tb")
    )


async def test_subscribers_over_the_per_space_cap_are_resource_exhausted(
    start: Start, managed_dirs: tuple[Path, Path]
) -> None:
    index_dir, volumes = managed_dirs
    write_entry(index_dir, "watched", token="tw", volumes=volumes)
    write_entry(index_dir, "other", token="to", volumes=volumes)
    running = await start(data_root=volumes, index_dir=index_dir, max_subscribers_per_space=2)
    streams = [await _subscribe(running, md("watched", "tw")) for _ in range(2)]

    third = running.memories.Subscribe(pb.SubscribeRequest(), metadata=md("watched", "tw"))
    err = await _refused(third.read())
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "space 'watched' has its maximum of 2 open Subscribe streams" in details(err)
    # Other spaces, and calls on the same space, are not affected.
    other = await _subscribe(running, md("other", "to"))
    await running.memories.Remember(
        pb.RememberRequest(memory=memory("w")), metadata=md("watched", "tw")
    )
    for stream in [*streams, other]:
        stream.cancel()


async def test_health_watch_streams_are_capped_too(start: Start) -> None:
    running = await start(max_calls=1)
    health = health_pb2_grpc.HealthStub(running.api.channel)
    watches = [
        health.Watch(health_pb2.HealthCheckRequest()) for _ in range(1 + serving.OTHER_CALLS)
    ]
    for watch in watches:
        await watch.read()  # each answers SERVING at once, then stays open
    extra = health.Watch(health_pb2.HealthCheckRequest())
    err = await _refused(extra.read())
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    for watch in watches:
        watch.cancel()
