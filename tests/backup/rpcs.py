"""Helpers of the backup tests that go through a real server's API: what a space acknowledged,
writes that go on until told to stop, and checks that a space holds exactly what it should."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import grpc
import numpy as np

from memspace_contract.v1 import memspace_pb2 as pb
from tests.reliability.conftest import CALL_TIMEOUT_S, DIM, Stubs
from tests.support import minio


def target_of(server: minio.Minio, bucket: str) -> pb.BackupTarget:
    """The MinIO bucket as an admin call names it, credentials included."""
    return pb.BackupTarget(
        url=server.url(bucket, "backups"),
        endpoint=server.endpoint,
        region=server.region,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
    )


@dataclasses.dataclass
class Acknowledged:
    """Every memory a space acknowledged: content and embedding by ID, with the LSN the write
    (a whole batch) was acknowledged at."""

    memories: dict[str, tuple[str, list[float], int]] = dataclasses.field(default_factory=dict)

    def through(self, lsn: int) -> dict[str, tuple[str, list[float], int]]:
        return {k: v for k, v in self.memories.items() if v[2] <= lsn}

    def last_lsn(self) -> int:
        return max((v[2] for v in self.memories.values()), default=0)


def _embedding(rng: np.random.Generator, dim: int = DIM) -> list[float]:
    return [float(v) for v in rng.normal(size=dim).astype(np.float32)]


async def write(
    stubs: Stubs,
    space: str,
    acked: Acknowledged,
    count: int,
    rng: np.random.Generator,
    batch: int = 100,
) -> None:
    """Store `count` memories in RememberBatch streams of `batch`."""
    done = 0
    while done < count:
        size = min(batch, count - done)
        drafts = [(f"memory {len(acked.memories) + i}", _embedding(rng)) for i in range(size)]

        async def requests(
            drafts: list[tuple[str, list[float]]] = drafts,
        ) -> AsyncIterator[pb.RememberRequest]:
            for content, embedding in drafts:
                yield pb.RememberRequest(
                    space=space, memory=pb.Memory(content=content, embedding=embedding)
                )

        answer = await stubs.memories.RememberBatch(requests(), timeout=CALL_TIMEOUT_S)
        for memory_id, (content, embedding) in zip(answer.ids, drafts, strict=True):
            acked.memories[memory_id] = (content, embedding, answer.last_lsn)
        done += size


async def remember_until(
    stubs: Stubs,
    space: str,
    acked: Acknowledged,
    stop: asyncio.Event,
    *,
    refused: bool = False,
    dim: int = DIM,
) -> int:
    """Remember one memory after another until `stop` (or, with `refused`, until the space
    refuses a write with FAILED_PRECONDITION); returns how many were acknowledged."""
    rng = np.random.default_rng(99)
    count = 0
    while not stop.is_set():
        content, embedding = f"during {count}", _embedding(rng, dim)
        try:
            answer = await stubs.memories.Remember(
                pb.RememberRequest(
                    space=space, memory=pb.Memory(content=content, embedding=embedding)
                ),
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as err:
            if refused and err.code() is grpc.StatusCode.FAILED_PRECONDITION:
                return count
            raise
        acked.memories[answer.id] = (content, embedding, answer.lsn)
        count += 1
    return count


async def held(
    stubs: Stubs,
    space: str,
    expected: dict[str, tuple[str, list[float], int]],
    in_flight: int = 0,
) -> None:
    """The space holds exactly `expected`: its count, and each memory's content and embedding;
    and, with `in_flight`, up to that many more (writes cut short by a kill, which may have
    reached the log without being acknowledged)."""
    for memory_id, (content, embedding, _) in expected.items():
        got = await stubs.memories.Get(
            pb.GetRequest(space=space, id=memory_id), timeout=CALL_TIMEOUT_S
        )
        assert got.memory.content == content
        np.testing.assert_array_equal(
            np.asarray(got.memory.embedding, np.float32), np.asarray(embedding, np.float32)
        )
    # Loaded by the calls above: its count is live.
    health = await stubs.spaces.Health(pb.HealthRequest(space=space), timeout=CALL_TIMEOUT_S)
    found = health.spaces[0].memories
    assert len(expected) <= found <= len(expected) + in_flight, (space, health.spaces[0])
