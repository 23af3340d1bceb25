"""SIGTERM drains a `memspace serve` process: it stops accepting calls, lets in-flight calls
finish, flushes WAL and tiers and exits 0 within the drain timeout, losing no acknowledged
write."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc
from tests.api.conftest import DIM, memory, memspace_serve, status_of, until

DRAIN_TIMEOUT = 10.0


def serve_args(data: Path) -> list[str]:
    return [
        "--data-root",
        str(data),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "off",
        "--default-embedding-dim",
        str(DIM),
        "--drain-timeout",
        str(DRAIN_TIMEOUT),
    ]


async def wait_exit(popen: subprocess.Popen[str], within_s: float) -> int | None:
    for _ in range(int(within_s / 0.05)):
        code = popen.poll()
        if code is not None:
            return code
        await asyncio.sleep(0.05)
    return None


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_sigterm_drains_and_no_acknowledged_write_is_lost(
    tmp_path: Path, event_loop: str
) -> None:
    data = tmp_path / "data"
    acked: list[str] = []
    refusals: list[grpc.StatusCode] = []
    first = [*serve_args(data), "--event-loop", event_loop]
    with memspace_serve(first, tmp_path / "first.log") as process:
        assert f"{event_loop} event loop)" in process.output()
        channel = grpc.aio.insecure_channel(process.address)
        stub = pb_grpc.MemoryServiceStub(channel)
        stop = asyncio.Event()

        async def writer(n: int) -> None:
            i = 0
            while not stop.is_set():
                try:
                    done = await stub.Remember(
                        pb.RememberRequest(memory=memory(f"w{n}/{i}", 1.0, float(n))),
                        timeout=30,
                    )
                except grpc.aio.AioRpcError as err:
                    refusals.append(err.code())
                    return
                acked.append(done.id)
                i += 1

        batch_queue: asyncio.Queue[pb.RememberRequest | None] = asyncio.Queue()

        async def batch_requests() -> AsyncIterator[pb.RememberRequest]:
            while (item := await batch_queue.get()) is not None:
                yield item

        in_flight = stub.RememberBatch(batch_requests())
        await batch_queue.put(pb.RememberRequest(memory=memory("batch/0")))
        writers = [asyncio.create_task(writer(n)) for n in range(8)]
        # The first write loads the space (and imports its libraries): slow on a busy machine.
        await until(lambda: len(acked) >= 8)
        assert acked, "no write was acknowledged before SIGTERM"
        await asyncio.sleep(0.5)  # writes in flight at the SIGTERM
        signalled = time.monotonic()
        process.popen.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        for i in range(1, 4):  # the in-flight call goes on after SIGTERM, and finishes
            await batch_queue.put(pb.RememberRequest(memory=memory(f"batch/{i}")))
        await batch_queue.put(None)
        batch = await in_flight
        assert batch.count == 4
        code = await wait_exit(process.popen, DRAIN_TIMEOUT + 5)
        elapsed = time.monotonic() - signalled
        stop.set()
        await asyncio.gather(*writers)
        await channel.close(None)
        assert code == 0, process.output()
        assert elapsed < DRAIN_TIMEOUT
        assert "drained in" in process.output()
    assert set(refusals) <= {grpc.StatusCode.UNAVAILABLE}

    with memspace_serve(serve_args(data), tmp_path / "second.log") as process:
        async with grpc.aio.insecure_channel(process.address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            codes = [await status_of(stub.Get(pb.GetRequest(id=i))) for i in [*acked, *batch.ids]]
            assert set(codes) == {grpc.StatusCode.OK}
            spaces = pb_grpc.SpaceServiceStub(channel)
            health = await spaces.Health(pb.HealthRequest(space="default"))
            assert health.spaces[0].memories >= len(acked) + 4
        process.popen.send_signal(signal.SIGINT)  # Ctrl-C drains too
        assert await wait_exit(process.popen, DRAIN_TIMEOUT + 5) == 0
