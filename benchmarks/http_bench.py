"""HTTP/JSON and tracing benchmarks, each figure beside its baseline in the same run:

- `http_recall_vs_grpc`: median latency of one Recall over HTTP/JSON (httpx, a kept-alive
  connection) over the same Recall over gRPC (a kept channel), against one `memspace serve`
  process serving both ports; rounds interleaved. Reported, not bounded: JSON costs more than
  protobuf, and the figure says how much.
- `tracing_off_overhead`: calls per second of a server whose tracing is off (no OTEL_* variables,
  as shipped) over the same server with the tracing hooks replaced by bare no-ops (what the
  code would cost with no tracing in it at all): Recall and Remember, 8 callers, in-process,
  rounds interleaved ABBA, the median of the per-round ratios; the larger of Recall's and
  Remember's. At most 1.02: tracing that is off costs nothing measurable (on a quiet machine;
  on a loaded one the figure is noise).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np

from benchmarks.grpc_bench import Process, closed_loop, memspace_serve, running, sequential
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc
from memspace_server import settings, spans
from memspace_server.api import serving

DIM = 128
MEMORIES = 2_000
K = 10
_HTTP_PORT = re.compile(r"HTTP/JSON on :(\d+)")


def _vectors(count: int, seed: int = 16) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)


async def _seed(stub: pb_grpc.MemoryServiceAsyncStub, count: int) -> None:
    vectors = _vectors(count)

    async def requests() -> Any:
        for i, vector in enumerate(vectors):
            yield pb.RememberRequest(memory=pb.Memory(content=f"m{i}", embedding=vector.tolist()))

    await stub.RememberBatch(requests())


# -- HTTP vs gRPC ------------------------------------------------------------------------------


async def _http_vs_grpc(results: dict[str, object], quick: bool, tmp: Path) -> None:
    process: Process = memspace_serve(
        tmp / "http-data",
        tmp / "http.log",
        "--http-listen",
        "127.0.0.1:0",
        "--default-embedding-dim",
        str(DIM),
    )
    rounds, calls = (3, 50) if quick else (8, 300)
    with running(process):
        port = _HTTP_PORT.search(process.log.read_text())
        assert port, process.log.read_text()
        cue = _vectors(1, seed=7)[0].tolist()
        async with (
            grpc.aio.insecure_channel(process.address) as channel,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port.group(1)}") as client,
        ):
            stub: pb_grpc.MemoryServiceAsyncStub = pb_grpc.MemoryServiceStub(channel)
            await _seed(stub, 200 if quick else MEMORIES)
            request = pb.RecallRequest(cue=cue, k=K)
            body = {"cue": cue, "k": K}

            async def over_grpc() -> object:
                return await stub.Recall(request)

            async def over_http() -> object:
                response = await client.post("/v1/spaces/default/recall", json=body)
                response.raise_for_status()
                return response

            grpc_samples: list[float] = []
            http_samples: list[float] = []
            for _ in range(rounds):
                grpc_samples += await sequential(over_grpc, calls)
                http_samples += await sequential(over_http, calls)
    grpc_ms = statistics.median(grpc_samples) * 1000
    http_ms = statistics.median(http_samples) * 1000
    results["http_recall_ms"] = round(http_ms, 3)
    results["grpc_recall_ms_same_server"] = round(grpc_ms, 3)
    results["http_recall_vs_grpc"] = round(http_ms / grpc_ms, 3)
    print(f"   recall over HTTP {http_ms:.3f} ms, over gRPC {grpc_ms:.3f} ms", flush=True)


# -- tracing off vs no tracing ---------------------------------------------------------------


@contextlib.contextmanager
def _no_tracing_hooks() -> Iterator[None]:
    """The server as if it had no tracing code: every hook a bare no-op."""
    nothing: contextlib.nullcontext[None] = contextlib.nullcontext()
    saved = (spans.span, spans.current, spans.ENABLED)
    spans.span = lambda *args, **kwargs: nothing
    spans.current = lambda: None
    try:
        yield
    finally:
        spans.span, spans.current, spans.ENABLED = saved


async def _tracing_off(results: dict[str, object], quick: bool, tmp: Path) -> None:
    assert not spans.ENABLED, "the benchmark runs without OTEL_* variables"
    made = settings.ServerSettings(
        data_root=tmp / "tracing-data",
        listen="127.0.0.1:0",
        metrics_listen="off",
        default_embedding_dim=DIM,
    )
    server = serving.Server(made)
    await server.start()
    rounds, seconds = (2, 0.5) if quick else (16, 0.75)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub: pb_grpc.MemoryServiceAsyncStub = pb_grpc.MemoryServiceStub(channel)
            await _seed(stub, 200 if quick else MEMORIES)
            cue = _vectors(1, seed=9)[0].tolist()
            vector = _vectors(1, seed=11)[0].tolist()
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "recall": lambda: stub.Recall(pb.RecallRequest(cue=cue, k=K)),
                "remember": lambda: stub.Remember(
                    pb.RememberRequest(memory=pb.Memory(content="x", embedding=vector))
                ),
            }
            ratios = {}
            for name, call in calls.items():
                off: list[float] = []
                bare: list[float] = []
                await closed_loop(call, 8, seconds / 2)  # warm up
                for i in range(rounds):
                    # ABBA: a drift of the machine's load weighs on both sides alike.
                    for hooks in (False, True) if i % 2 == 0 else (True, False):
                        if hooks:
                            with _no_tracing_hooks():
                                bare.append((await closed_loop(call, 8, seconds))[0])
                        else:
                            off.append((await closed_loop(call, 8, seconds))[0])
                # calls/s without any hook over calls/s with tracing off, paired round by
                # round (each pair ran back to back), median of the pairs: above 1, off costs.
                ratios[name] = statistics.median(b / o for b, o in zip(bare, off, strict=True))
                results[f"tracing_off_{name}_per_s"] = round(statistics.median(off))
                results[f"tracing_none_{name}_per_s"] = round(statistics.median(bare))
    finally:
        await server.drain()
    results["tracing_off_overhead"] = round(max(ratios.values()), 3)
    print(f"   tracing off vs none: {ratios}", flush=True)


async def _run(results: dict[str, object], quick: bool, tmp: Path) -> None:
    started = time.perf_counter()
    await _http_vs_grpc(results, quick, tmp)
    await _tracing_off(results, quick, tmp)
    print(f"   http_bench parts took {time.perf_counter() - started:.0f} s", flush=True)


def run(results: dict[str, object], quick: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="memspace-http-bench-") as tmp:
        asyncio.run(_run(results, quick, Path(tmp)))


if __name__ == "__main__":
    import json
    import sys

    found: dict[str, object] = {}
    run(found, quick="--quick" in sys.argv)
    print(json.dumps(found, indent=2))
