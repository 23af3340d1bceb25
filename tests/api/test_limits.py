"""Limits a client cannot get around, against a real server: rate quotas per space (writes and
recalls, with when to retry), server-wide and per-space caps on concurrent calls and streams, the
byte budget of a RememberBatch stream and the size of a Recall answer. Every refusal is
RESOURCE_EXHAUSTED with a message saying what the limit is."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from memspace_contract import index
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_server.api import errors_map
from tests.api.conftest import (
    Running,
    Start,
    details,
    failure,
    md,
    memory,
    trailers,
    vec,
    write_entry,
)


async def _batch(running: Running, count: int, space: str = "", token: str | None = None) -> int:
    async def requests() -> AsyncIterator[pb.RememberRequest]:
        for i in range(count):
            yield pb.RememberRequest(memory=memory(f"m{i}", 1.0, float(i)))

    meta = md(space or None, token)
    answer = await running.memories.RememberBatch(requests(), metadata=meta)
    return answer.count


# -- rate quotas ---------------------------------------------------------------------------------


async def test_a_batch_larger_than_one_seconds_write_quota_is_admitted_then_paid_for(
    standalone: Running,
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
    start: Start, managed_dirs: tuple[Path, Path]
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
