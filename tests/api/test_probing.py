"""A starting server's health-only port: opened first, it holds a probe's Check until the server
serves and answers with the server's own health (never SERVING before it serves), so a pod turns
Ready the moment its server does. The server starts without the libraries only a loaded space
needs (zarr, faiss, tantivy, a model's tokenizer, TLS's cryptography)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc
from memspace_server.api import probing
from tests.api.conftest import ADMIN_TOKEN, md

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HELD_S = 30.0
"""The deadline of a Check held while the server starts."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def port() -> AsyncIterator[probing.HealthPort]:
    """A health port on a loopback port of the system's choosing, stopped after the test."""
    opened = probing.HealthPort("127.0.0.1:0")
    await opened.start()
    try:
        yield opened
    finally:
        await opened.stop(0)


async def check(port: int, deadline_s: float) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=deadline_s
        )
        return int(answer.status)


async def test_a_check_sent_while_the_server_starts_passes_the_moment_it_serves(
    port: probing.HealthPort,
) -> None:
    held = asyncio.ensure_future(check(port.port, deadline_s=HELD_S))
    await asyncio.sleep(0.5)
    assert not held.done(), "the Check was answered before the server served"
    servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # stubs: sync only
    attached = time.monotonic()
    port.attach(servicer)
    assert await held == SERVING
    # At the attach, not at the Check's deadline (the bound leaves room for a loaded machine).
    assert time.monotonic() - attached < HELD_S / 3
    # From then on the server's own health answers, drain included.
    await servicer.enter_graceful_shutdown()
    assert await check(port.port, deadline_s=10) == NOT_SERVING


async def test_a_check_held_past_its_deadline_answers_not_serving(
    port: probing.HealthPort, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The answer leaves MARGIN_S before the deadline; the server's 50 ms is not enough for it
    # to reach a caller on a loaded machine (3 of 100 Checks with a 0.4 s deadline ended
    # DEADLINE_EXCEEDED at load 12), so the test gives it a second.
    monkeypatch.setattr(probing, "MARGIN_S", 1.0)
    started = time.monotonic()
    assert await check(port.port, deadline_s=3.0) == NOT_SERVING
    assert 1.5 < time.monotonic() - started < 3.0  # held until the margin, not answered at once


async def test_a_watch_sees_not_serving_until_the_server_serves(port: probing.HealthPort) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port.port}") as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        first = await stream.read()
        assert first.status == NOT_SERVING
        port.attach(health.aio.HealthServicer())  # type: ignore[attr-defined]  # sync stubs
        second = await stream.read()
        assert second.status == SERVING
        stream.cancel()


def test_memspace_serve_answers_probes_serving_only_once_it_serves(tmp_path: Path) -> None:
    """The health port opens before the server's modules are imported; a Check sent as soon as
    it opens is answered SERVING only when the memory API answers too."""
    health_port = free_port()
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    (tmp_path / "token").write_text(ADMIN_TOKEN)
    log = tmp_path / "serve.log"
    command = [
        sys.executable, "-m", "memspace_cli.main", "serve",
        "--data-root", str(tmp_path / "volumes"), "--index-dir", str(index_dir),
        "--listen", "127.0.0.1:0", "--health-listen", f"127.0.0.1:{health_port}",
        "--metrics-listen", "off", "--http-listen", "off", "--log-format", "json",
        "--admin-token-file", str(tmp_path / "token"),
    ]  # fmt: skip
    with log.open("w") as out:
        popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", health_port), timeout=1).close()
                break
            except OSError:
                assert popen.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.01)
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            status = NOT_SERVING
            while status != SERVING:
                assert time.monotonic() < deadline, log.read_text()
                status = (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(), timeout=5)
                    .status
                )
        # SERVING: the server has logged its address, and its API answers.
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        (serving,) = [e["message"] for e in lines if e["message"].startswith("serving ")]
        address = serving.split(" on ")[1].split(" ")[0]
        with grpc.insecure_channel(address) as channel:
            spaces = pb_grpc.SpaceServiceStub(channel)
            listed = spaces.ListSpaces(pb.ListSpacesRequest(), metadata=md(token=ADMIN_TOKEN))
            assert list(listed.spaces) == []
        popen.send_signal(signal.SIGTERM)
        assert popen.wait(timeout=30) == 0, log.read_text()
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()


def test_the_server_imports_no_library_that_only_a_loaded_space_needs() -> None:
    """zarr, faiss, tantivy, tokenizers and cryptography are imported by the first space (or
    TLS certificate) that needs them, or in the background once the server serves; the
    OpenTelemetry SDK only where tracing is on."""
    deferred = (
        "zarr", "faiss", "tantivy", "tokenizers", "cryptography", "numcodecs",
        "opentelemetry.sdk",
    )  # fmt: skip
    code = (
        "import sys\n"
        "from memspace_cli import main\n"
        "from memspace_server.api import serving\n"
        f"print(sorted(m for m in {deferred!r} if m in sys.modules))\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert found.stdout.strip() == "[]", found.stderr


def test_the_background_imports_leave_the_start_out_of_the_collectors_walk() -> None:
    """Once the server serves, `importing.warm_up` imports the deferred libraries and then
    freezes what the start made (`gc.freeze`): a full collection no longer walks the modules,
    classes and functions of every import (about 60,000 objects, 40 ms a collection)."""
    code = (
        "import gc, sys\n"
        "from memspace_server.api import serving\n"
        "from memspace_server import importing\n"
        "before = gc.get_freeze_count()\n"
        "importing.warm_up().join()\n"
        "print(before, gc.get_freeze_count(), 'faiss' in sys.modules, len(gc.get_objects()))\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    before, frozen, imported, tracked = found.stdout.split()
    assert int(before) == 0
    assert imported == "True"
    assert int(frozen) > 10 * max(1, int(tracked)), found.stdout
