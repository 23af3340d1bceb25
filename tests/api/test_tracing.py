"""Tracing against a real OTLP/gRPC receiver (tests/support/otlp.py) started by the test: a
`memspace serve` process exports, over OTLP/gRPC as the OTEL_* variables say, one span per gRPC
and HTTP call (space, method, status), parented on the caller's W3C traceparent, with the WAL
commit, each tier's scan and a consolidation inside; without OTEL_* nothing is traced."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc
from memspace_server import spans
from memspace_server.api import tracing
from tests.api.conftest import Start, memory, memspace_serve, vec
from tests.support.otlp import ReceivedSpan, Receiver

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
_HTTP_PORT = re.compile(r"HTTP/JSON on :(\d+)")


def traceparent(span_id: str) -> str:
    return f"00-{TRACE}-{span_id}-01"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    found.start()
    yield found
    found.stop()


def only(found: list[ReceivedSpan]) -> ReceivedSpan:
    assert len(found) == 1, found
    return found[0]


async def test_calls_and_what_they_do_inside_are_exported_with_their_parents(
    tmp_path: Path, receiver: Receiver
) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "memspace-under-test",
    }
    args = [
        f"--data-root={tmp_path / 'data'}",
        "--listen=127.0.0.1:0",
        "--http-listen=127.0.0.1:0",
        "--metrics-listen=off",
        "--default-embedding-dim=4",
    ]
    with memspace_serve(args, tmp_path / "serve.log", env=env) as served:
        http_port = _HTTP_PORT.search(served.output())
        assert http_port, served.output()
        async with grpc.aio.insecure_channel(served.address) as channel:
            m = pb_grpc.MemoryServiceStub(channel)
            await m.Remember(
                pb.RememberRequest(memory=memory("traced", 1.0)),
                metadata=(("traceparent", traceparent("00000000000000a1")),),
            )
            await m.Recall(
                pb.RecallRequest(cue=vec(1), k=3),
                metadata=(("traceparent", traceparent("00000000000000a2")),),
            )
            refused = m.Get(
                pb.GetRequest(id="nothing"),
                metadata=(("traceparent", traceparent("00000000000000a3")),),
            )
            with pytest.raises(grpc.aio.AioRpcError):
                await refused
            await m.Consolidate(
                pb.ConsolidateRequest(),
                metadata=(("traceparent", traceparent("00000000000000a4")),),
            )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port.group(1)}") as c:
            answered = await c.post(
                "/v1/spaces/default/recall",
                json={"cue": vec(1), "k": 3},
                headers={"traceparent": traceparent("00000000000000b1")},
            )
            assert answered.status_code == 200
        # The drain exports what is buffered before the process exits.
        served.popen.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(served.popen.wait, 30) == 0
    assert {span.service for span in receiver.spans} == {"memspace-under-test"}
    # A backup of the space, by `memspace backup create` in a process of its own.
    command = [sys.executable, "-m", "memspace_cli.main", "backup", "create"]
    command += [str(tmp_path / "backups"), f"--data-root={tmp_path / 'data'}", "--space=default"]
    backup = await asyncio.to_thread(
        subprocess.run,
        command,
        env={**os.environ, **env, "OTEL_SERVICE_NAME": "memspace-backup"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert backup.returncode == 0, backup.stderr

    def call(name: str, parent: str) -> ReceivedSpan:
        found = only(
            [s for s in receiver.named(f"memspace.v1.{name}") if s.parent_span_id == parent]
        )
        assert found.trace_id == TRACE
        return found

    remember = call("MemoryService/Remember", "00000000000000a1")
    assert remember.attributes["memspace.space"] == "default"
    assert remember.attributes["rpc.method"] == "Remember"
    assert remember.attributes["memspace.status"] == "OK"
    assert remember.attributes["memspace.transport"] == "grpc"
    commit = only(receiver.children(remember, "memspace.wal.commit"))
    assert commit.attributes["memspace.wal.records"] == 1
    assert commit.attributes["memspace.wal.bytes"] > 0
    assert commit.attributes["memspace.wal.fsync_ms"] >= 0

    recall = call("MemoryService/Recall", "00000000000000a2")
    scans = receiver.children(recall, "memspace.tier.scan")
    assert sorted(s.attributes["memspace.tier"] for s in scans) == ["cold", "hot", "warm"]
    hot = only([s for s in scans if s.attributes["memspace.tier"] == "hot"])
    assert hot.attributes["memspace.rows_scanned"] == 1
    assert hot.attributes["memspace.space"] == "default"

    get = call("MemoryService/Get", "00000000000000a3")
    assert get.attributes["memspace.status"] == "NOT_FOUND"
    assert get.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert get.status_code == 2  # STATUS_CODE_ERROR

    consolidate = call("MemoryService/Consolidate", "00000000000000a4")
    done = only(receiver.children(consolidate, "memspace.consolidate"))
    assert done.attributes["memspace.consolidated"] == 1

    http = only(
        [
            s
            for s in receiver.named("HTTP POST /v1/spaces/{space}/recall")
            if s.parent_span_id == "00000000000000b1"
        ]
    )
    assert http.trace_id == TRACE
    assert http.attributes["http.response.status_code"] == 200
    over_http = only(receiver.children(http, "memspace.v1.MemoryService/Recall"))
    assert over_http.attributes["memspace.transport"] == "http"
    assert over_http.attributes["memspace.space"] == "default"
    assert len(receiver.children(over_http, "memspace.tier.scan")) == 3

    (backed_up,) = receiver.named("memspace.backup.create")
    assert backed_up.service == "memspace-backup"
    assert backed_up.attributes["memspace.space"] == "default"
    assert backed_up.attributes["memspace.backup.files"] > 0
    assert backed_up.attributes["memspace.backup.id"] in backup.stdout


async def test_without_otel_variables_nothing_is_traced(start: Start) -> None:
    assert not any(name.startswith("OTEL_EXPORTER_OTLP") for name in os.environ)
    assert tracing.configure(os.environ) is None
    running = await start()
    await running.memories.Remember(pb.RememberRequest(memory=memory("untraced")))
    assert spans.ENABLED is False


def test_tracing_is_on_only_when_an_endpoint_is_named() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    assert tracing.wanted(endpoint)
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"})
    assert not tracing.wanted({})
    assert not tracing.wanted({**endpoint, "OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted({**endpoint, "OTEL_TRACES_EXPORTER": "none"})
