"""Load on loopback, bounded in calls and seconds: Remember, Recall, RememberBatch and
Subscribe across 20 spaces at the highest rate the server takes (the load generator of
`benchmarks/reliability_bench.py`, whose figures are reported there, not asserted here).

Checked: no error but the deliberate ones (RESOURCE_EXHAUSTED from the write quota of two
spaces, and for requests over the message size limit); every live subscriber saw every
acknowledged write of its space in LSN order; subscribers that never read are cut off with the
LSN to resume from; the server's memory stays bounded: slow subscribers hold no copy of the log,
and a stream of oversized memories is refused at its first one rather than held.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from benchmarks import reliability_bench as bench
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc
from tests.reliability.conftest import ADMIN_TOKEN, ServerProcess, Servers, Stubs, soak

MIB = 1024


async def guarded(servers: Servers, admin_token_file: Path, *flags: str) -> ServerProcess:
    server = servers(None, "--admin-token-file", str(admin_token_file), *flags)
    await server.start()
    return server


def rss_anon_kib(server: ServerProcess) -> int:
    return bench.rss_anon_kib(server.pid)


@pytest.mark.timeout(soak(300, 1200))
async def test_mixed_load_on_twenty_spaces_has_no_errors_but_the_deliberate_ones(
    servers: Servers, admin_token_file: Path
) -> None:
    server = await guarded(servers, admin_token_file, "--subscriber-buffer", "128")
    plan = bench.LoadPlan(
        calls=soak(2500, 30000), seconds=soak(60.0, 300.0), slow_subscribers=6, dim=32
    )
    tenants = [bench.Tenant(f"load-{n:02d}", secrets.token_urlsafe(16)) for n in range(18)]
    tenants += [
        bench.Tenant(f"load-{n:02d}", secrets.token_urlsafe(16), quota=3.0) for n in (18, 19)
    ]
    stubs = Stubs(server.address)
    first = {}
    try:
        for tenant in tenants:
            await bench.create(stubs.spaces, ADMIN_TOKEN, tenant, plan.dim)
            count = 3 if tenant.quota else 200
            first[tenant.space] = await bench.seed(stubs.memories, tenant, count, plan.dim) + 1
    finally:
        await stubs.close()
    before = rss_anon_kib(server)
    found = await bench.run_load(server.address, tenants, plan, first)
    growth = rss_anon_kib(server) - before
    summary = found.summary()
    print(json.dumps({**summary, "rss_anon_growth_mib": round(growth / MIB, 1)}))
    assert not found.errors, dict(found.errors)
    assert not found.feed_problems, found.feed_problems
    assert found.calls == plan.calls, "the load stopped at its time limit, not its call count"
    assert set(found.quota_refusals) == {"load-18", "load-19"}, found.quota_refusals
    assert found.oversized_refusals == plan.calls // plan.oversized_every
    assert found.slow_cut_off == plan.slow_subscribers
    assert growth < 256 * MIB, f"the server grew by {growth // MIB} MiB under load"
    assert server.alive
    assert "Traceback" not in server.log(), server.log()[-20000:]


async def test_slow_subscribers_hold_no_copy_of_the_log(
    servers: Servers, admin_token_file: Path
) -> None:
    """Subscribers replaying the whole log that stop reading: each holds a chunk of events, not
    the log (before the fix each held all of it, decoded: 80 MiB for a 62 MiB log)."""
    server = await guarded(servers, admin_token_file)
    tenant = bench.Tenant("long-log", "token-of-long-log")
    dim = 256
    stubs = Stubs(server.address)
    streams = []
    try:
        await bench.create(stubs.spaces, ADMIN_TOKEN, tenant, dim)
        await bench.seed(stubs.memories, tenant, 8000, dim, content=1024)
        log_mib = sum(p.stat().st_size for p in server.data_root.rglob("*.wal")) / 2**20
        assert log_mib > 15
        before = rss_anon_kib(server)
        for _ in range(12):
            stream = stubs.memories.Subscribe(
                pb.SubscribeRequest(since_lsn=1), metadata=tenant.metadata
            )
            event = await stream.read()  # the replay has begun; now never read again
            assert isinstance(event, pb.MemoryEvent)
            assert event.lsn == 1
            streams.append(stream)
        await asyncio.sleep(2.0)
        growth = rss_anon_kib(server) - before
    finally:
        for stream in streams:
            stream.cancel()
        await stubs.close()
    print(f"log {log_mib:.0f} MiB, 12 slow subscribers: +{growth / MIB:.1f} MiB")
    assert growth < 48 * MIB, f"12 slow subscribers of a {log_mib:.0f} MiB log: +{growth} KiB"


def test_a_stream_of_oversized_memories_is_refused_at_its_first_one(
    servers: Servers, admin_token_file: Path
) -> None:
    """Each message of a RememberBatch is checked as it arrives, so a stream of memories near
    the message size limit (4 MiB each) is refused at once, not held to its end (before the fix
    150 of them held 680 MiB, and 10,000 would have held 40 GiB). A blocking client: grpc.aio
    reports an early answer to a client stream as INTERNAL (grpc/grpc#36066)."""
    server = servers(None, "--admin-token-file", str(admin_token_file))
    server.start_blocking()
    tenant = bench.Tenant("batches", "token-of-batches")

    async def create() -> None:
        stubs = Stubs(server.address)
        try:
            await bench.create(stubs.spaces, ADMIN_TOKEN, tenant, 8)
        finally:
            await stubs.close()

    asyncio.run(create())
    huge = pb.RememberRequest(
        memory=pb.Memory(content="x", embedding=np.ones(1_000_000, np.float32).tolist())
    )
    sent = []

    def requests() -> Iterator[pb.RememberRequest]:
        for n in range(150):
            sent.append(n)
            yield huge

    before = rss_anon_kib(server)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        try:
            stub.RememberBatch(requests(), metadata=tenant.metadata, timeout=60)
        except grpc.RpcError as err:
            failed: Any = err  # also a grpc.Call
            code, details = failed.code(), str(failed.details())
        else:
            raise AssertionError("a batch of 1,000,000-value embeddings was accepted")
    growth = rss_anon_kib(server) - before
    assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "1000000 values" in details
    assert len(sent) < 150, "the client sent the whole stream: it was not refused at once"
    assert growth < 64 * MIB, f"the server grew by {growth // MIB} MiB holding the stream"
