"""Health: exact per-space counts (total and per tier), the server's status, grpc.health.v1,
reflection, metrics, and `memspace status`."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import json
import logging
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memspace_contract import spaces
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_server.api import logs, serving
from memspace_server.storage import spaces as storage_spaces
from tests.api.conftest import DIM, Running, Start, md, memory, status_of, until, write_entry


async def fill(running: Running, space: str, count: int) -> list[str]:
    async def requests() -> AsyncIterator[pb.RememberRequest]:
        for i in range(count):
            yield pb.RememberRequest(memory=memory(f"{space}/{i}", 1.0, float(i)))

    done = await running.memories.RememberBatch(requests(), metadata=md(space))
    return list(done.ids)


async def tiers_by_recall(running: Running, space: str) -> dict[str, int]:
    found = await running.memories.Recall(
        pb.RecallRequest(cue=[1.0] + [0.0] * (DIM - 1), k=1000), metadata=md(space)
    )
    return dict(collections.Counter(h.tier for h in found.hits))


async def test_health_counts_every_space_exactly_per_tier(standalone: Running) -> None:
    s = standalone.spaces
    await s.CreateSpace(
        pb.CreateSpaceRequest(
            space="tiered",
            embedding_dim=DIM,
            tiers=pb.SpaceTiers(hot_capacity=10, warm_capacity=20),
        )
    )
    await s.CreateSpace(pb.CreateSpaceRequest(space="small", embedding_dim=DIM))
    ids = await fill(standalone, "tiered", 50)
    await fill(standalone, "small", 7)
    await standalone.memories.Consolidate(pb.ConsolidateRequest(), metadata=md("tiered"))
    for memory_id in ids[:5]:
        await standalone.memories.Forget(pb.ForgetRequest(id=memory_id), metadata=md("tiered"))
    found = await s.Health(pb.HealthRequest())
    assert found.status == "SERVING"
    by_space = {h.space: h for h in found.spaces}
    assert set(by_space) == {"default", "tiered", "small"}
    assert by_space["default"].memories == 0
    assert by_space["small"].memories == 7
    assert dict(by_space["small"].tier_memories) == {"hot": 7, "warm": 0, "cold": 0}
    tiered = by_space["tiered"]
    assert tiered.memories == 45
    placed = await tiers_by_recall(standalone, "tiered")
    assert {k: v for k, v in tiered.tier_memories.items() if v} == placed
    assert sum(tiered.tier_memories.values()) == 45
    assert tiered.tier_memories["hot"] <= 10
    assert tiered.tier_memories["cold"] > 0
    assert tiered.pressure == tiered.tier_memories["hot"] / 10
    assert tiered.disk_bytes > 0
    assert tiered.state == "Active"
    assert by_space["small"].wal_lag_ms > 0  # written, not consolidated


async def test_health_of_an_unloaded_space_is_exact(start: Start) -> None:
    running = await start(idle_unload_s=0.2, maintain_interval_s=0.1)
    await fill(running, "default", 12)

    registry = running.server.registry
    await until(lambda: not registry.loaded())
    assert not registry.loaded()
    # The idle unload may still be flushing: wait for it (this takes the space's lock).
    assert await registry.unload(spaces.DEFAULT_SPACE) is False
    found = await running.spaces.Health(pb.HealthRequest(space="default"))
    (health,) = found.spaces
    assert (health.memories, health.wal_lag_ms) == (12, 0)
    assert sum(health.tier_memories.values()) == 12
    assert not running.server.registry.loaded()  # health did not load it


async def test_grpc_health_is_serving_then_not_serving_while_draining(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The notice lasts its full second here (an idle server's would end after 0.2 s quiet).
    monkeypatch.setattr(serving, "NOTICE_QUIET_S", 60.0)
    running = await start(drain_notice_s=1.0)
    health = health_pb2_grpc.HealthStub(running.api.channel)
    for service in ("", "memspace.v1.MemoryService", "memspace.v1.SpaceService"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    first = await watch.read()
    assert isinstance(first, health_pb2.HealthCheckResponse)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    drain = asyncio.create_task(running.server.drain())
    second = await watch.read()
    assert isinstance(second, health_pb2.HealthCheckResponse)
    assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
    answer = await health.Check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
    ours = await running.spaces.Health(pb.HealthRequest())
    assert ours.status == "DRAINING"
    assert await drain


async def test_an_idle_server_ends_its_drain_notice_early(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    # A notice of 120 s; the drain is given 60: only an early end lets it finish in time.
    running = await start(drain_notice_s=120.0, drain_timeout_s=124.0)
    await fill(running, "default", 2)
    with caplog.at_level(logging.INFO, logger=serving.__name__):
        assert await asyncio.wait_for(running.server.drain(), 60.0)
    assert "drain notice ended early" in caplog.text


async def test_a_server_with_calls_arriving_serves_them_through_its_drain_notice(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The caller's calls follow one another closely, but a loaded machine can pause it for
    # longer than the 0.2 s of quiet that ends a notice early.
    monkeypatch.setattr(serving, "NOTICE_QUIET_S", 1.0)
    running = await start(drain_notice_s=3.0)
    health = health_pb2_grpc.HealthStub(running.api.channel)
    cue = pb.RecallRequest(cue=[1.0] + [0.0] * (DIM - 1), k=1)
    served_while_not_serving = 0

    async def caller() -> grpc.StatusCode:
        nonlocal served_while_not_serving
        while True:
            try:
                answer = await health.Check(health_pb2.HealthCheckRequest())
                await running.memories.Recall(cue)
            except grpc.aio.AioRpcError as err:
                return err.code()
            if answer.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                served_while_not_serving += 1

    calls = asyncio.create_task(caller())
    await asyncio.sleep(0.1)
    assert await running.server.drain()
    # Calls kept arriving, so the notice was not cut short: calls made after health said
    # NOT_SERVING were still served, until the server refused new calls.
    assert await calls in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert served_while_not_serving > 1


async def test_reflection_lists_the_services(standalone: Running) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(standalone.api.channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        yield reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="memspace.v1.MemoryService"
        )

    answers = [a async for a in stub.ServerReflectionInfo(ask())]
    names = {s.name for s in answers[0].list_services_response.service}
    assert {
        "memspace.v1.MemoryService",
        "memspace.v1.SpaceService",
        "grpc.health.v1.Health",
    } <= names
    assert answers[1].file_descriptor_response.file_descriptor_proto


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        return str(answer.read().decode())


async def test_metrics_count_requests_per_space_and_method(start: Start) -> None:
    running = await start(metrics_listen="127.0.0.1:0", metrics_interval_s=0.1)
    await fill(running, "default", 3)
    await running.memories.Recall(pb.RecallRequest(cue=[1.0, 0, 0, 0], k=2))
    with contextlib.suppress(grpc.aio.AioRpcError):
        await running.memories.Recall(pb.RecallRequest(space="nowhere", cue=[1.0, 0, 0, 0], k=2))
    port = running.server.metrics_port
    assert port is not None
    # A housekeeping round (every 0.1 s here) refreshes the space gauges: wait for one.
    gauge = 'memspace_space_memories{space="default"} 3.0'
    deadline = asyncio.get_running_loop().time() + 60
    text = await asyncio.to_thread(scrape, port)
    while gauge not in text and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
        text = await asyncio.to_thread(scrape, port)
    assert (
        'memspace_requests_total{code="OK",method="MemoryService/Recall",space="default"} 1.0'
        in text
    )
    assert (
        'memspace_requests_total{code="NOT_FOUND",method="MemoryService/Recall",space=""} 1.0'
        in text
    )
    assert gauge in text
    assert 'memspace_space_tier_memories{space="default",tier="hot"} 3.0' in text
    assert "memspace_request_duration_seconds_bucket" in text
    assert "nowhere" not in text  # unknown spaces never become label values


async def memspace_status(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "memspace_cli.main",
        "status",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_memspace_status_prints_a_table_and_json(standalone: Running) -> None:
    await standalone.spaces.CreateSpace(pb.CreateSpaceRequest(space="team-a", embedding_dim=DIM))
    await fill(standalone, "team-a", 4)
    code, out, err = await memspace_status("--endpoint", standalone.address)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "server: SERVING"
    assert lines[1].split() == [
        "SPACE",
        "STATE",
        "MEMORIES",
        "HOT",
        "WARM",
        "COLD",
        "PRESSURE",
        "WAL-LAG",
        "CONS-RATE",
        "DISK",
    ]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["team-a"][1:6] == ["Active", "4", "4", "0", "0"]
    assert rows["default"][2] == "0"
    code, out, err = await memspace_status(
        "--endpoint", standalone.address, "--space", "team-a", "-o", "json"
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["status"] == "SERVING"
    assert [(s["space"], s["memories"]) for s in doc["spaces"]] == [("team-a", 4)]
    assert doc["spaces"][0]["tierMemories"] == {"hot": 4, "warm": 0, "cold": 0}


async def test_memspace_status_reports_errors(standalone: Running) -> None:
    code, _, err = await memspace_status("--endpoint", standalone.address, "--space", "nowhere")
    assert code == 1
    assert "NOT_FOUND" in err


async def test_log_lines_of_a_call_carry_its_space_method_and_request_id(
    standalone: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.ContextFilter())
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("memspace_server.api.handling")
    logger.addHandler(handler)

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(storage_spaces.Space, "recall", broken)
    try:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await standalone.memories.Recall(
                pb.RecallRequest(cue=[1.0, 0, 0, 0], k=1),
                metadata=(("x-memory-space", "default"), ("x-request-id", "req-42")),
            )
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue().splitlines()[0])
    assert line["level"] == "ERROR"
    assert (line["space"], line["method"], line["request_id"]) == (
        "default",
        "MemoryService/Recall",
        "req-42",
    )
    assert "boom" in line["exception"]


async def test_a_refused_call_counts_under_the_space_it_names_when_that_space_exists(
    start: Start, managed_dirs: tuple[Path, Path], admin_token_file: Path
) -> None:
    index_dir, volumes = managed_dirs
    write_entry(index_dir, "team-a", token="ta", volumes=volumes)
    running = await start(data_root=volumes, index_dir=index_dir, admin_token_file=admin_token_file)
    cue = [1.0, 0.0, 0.0, 0.0]
    wrong = running.memories.Recall(pb.RecallRequest(cue=cue, k=1), metadata=md("team-a", "tb"))
    assert await status_of(wrong) is grpc.StatusCode.PERMISSION_DENIED
    unknown = running.memories.Recall(pb.RecallRequest(cue=cue, k=1), metadata=md("team-z", "tb"))
    assert await status_of(unknown) is grpc.StatusCode.PERMISSION_DENIED
    registry = running.server.metrics.registry
    method = "MemoryService/Recall"

    def counted(space: str) -> float | None:
        labels = {"space": space, "method": method, "code": "PERMISSION_DENIED"}
        return registry.get_sample_value("memspace_requests_total", labels)

    assert counted("team-a") == 1
    assert counted("") == 1  # a space not in the index never becomes a label value
    assert counted("team-z") is None
