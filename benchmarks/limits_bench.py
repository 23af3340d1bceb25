"""Bounded memory under a flood: five maximal RememberBatch streams at once (each carrying as
many bytes as `--max-batch-bytes` allows, 64 KiB memories, into five spaces) against a real
`memspace serve`, its RSS sampled every 10 ms.

- `batch_flood_rss_mib`: the peak RSS of the server (target: under 1 GiB; three such streams
  took a server to 1.68 GB before streams were staged in chunks);
- `batch_flood_idle_rss_mib`: its RSS before the flood;
- `batch_flood_stored_mib`: the bytes of memories it stored (which the hot tier then holds).

The same flood, with the bound asserted, is a test: tests/reliability/test_limits.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from benchmarks.grpc_bench import memspace_serve, running, wait_serving
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc

STREAMS = 5
BATCH_BYTES = 64 * 1024 * 1024
"""The server's default --max-batch-bytes: a maximal stream carries this much."""
CONTENT_BYTES = 64 * 1024 - 64
"""Just under the 64 KiB content limit."""
DIM = 768
RECORD_OVERHEAD = 128
"""Bytes of a staged record besides its content and embedding (header, id), rounded up."""
MIB = 1024 * 1024


@dataclasses.dataclass
class Flood:
    idle_kib: int
    peak_kib: int
    stored: list[int]
    """Memories each stream stored."""
    per_stream: int
    """Memories each stream sent."""

    @property
    def stored_bytes(self) -> int:
        return sum(self.stored) * (CONTENT_BYTES + 4 * DIM)


def memories_per_stream(batch_bytes: int = BATCH_BYTES) -> int:
    return batch_bytes // (CONTENT_BYTES + 4 * DIM + RECORD_OVERHEAD)


async def flood(
    address: str,
    rss_kib: Callable[[], int],
    streams: int = STREAMS,
    batch_bytes: int = BATCH_BYTES,
    metadata: tuple[tuple[str, str], ...] = (),
) -> Flood:
    """Create `streams` spaces and send each one maximal RememberBatch stream, all at once, from
    a channel each; sample the server's RSS meanwhile."""
    count = memories_per_stream(batch_bytes)
    names = [f"flood-{n}" for n in range(streams)]
    channels = [grpc.aio.insecure_channel(address) for _ in range(streams)]
    try:
        admin = pb_grpc.SpaceServiceStub(channels[0])
        for name in names:
            await admin.CreateSpace(
                pb.CreateSpaceRequest(space=name, embedding_dim=DIM), metadata=metadata
            )
        idle = rss_kib()
        peak = idle
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_kib())
                await asyncio.sleep(0.01)

        embedding = [1.0] + [0.5] * (DIM - 1)
        content = "m" * (CONTENT_BYTES - 16)

        async def requests(space: str) -> AsyncIterator[pb.RememberRequest]:
            for i in range(count):
                yield pb.RememberRequest(
                    space=space,
                    memory=pb.Memory(
                        id=f"{space}-{i}", content=f"{i:>16}{content}", embedding=embedding
                    ),
                )

        async def stream(n: int) -> int:
            stub = pb_grpc.MemoryServiceStub(channels[n])
            answer = await stub.RememberBatch(requests(names[n]), metadata=metadata, timeout=600)
            return int(answer.count)

        sampler = asyncio.ensure_future(sample())
        try:
            stored = await asyncio.gather(*(stream(n) for n in range(streams)))
        finally:
            done.set()
            await sampler
        peak = max(peak, rss_kib())
        return Flood(idle_kib=idle, peak_kib=peak, stored=list(stored), per_stream=count)
    finally:
        for channel in channels:
            await channel.close(None)


def run(results: dict[str, object], quick: bool = False) -> None:
    with tempfile.TemporaryDirectory(prefix="memspace-limits-bench-") as tmp:
        data = Path(tmp)
        with running(memspace_serve(data / "data", data / "serve.log")) as process:
            asyncio.run(wait_serving(process.address))
            found = asyncio.run(
                flood(process.address, process.rss_kib, streams=2 if quick else STREAMS)
            )
    results["batch_flood_rss_mib"] = round(found.peak_kib / 1024, 1)
    results["batch_flood_idle_rss_mib"] = round(found.idle_kib / 1024, 1)
    results["batch_flood_stored_mib"] = round(found.stored_bytes / MIB, 1)
