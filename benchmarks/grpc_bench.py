"""gRPC server benchmarks, each figure beside its baseline in the same run:

- unary Recall and Remember throughput of a real `memspace serve` vs a bare grpc.aio echo
  server and vs the floor server (`grpc_floor`: the same two calls with only the steps no
  implementation can skip), same client, same concurrency, rounds interleaved;
- Recall latency through gRPC vs in-process, over the same space;
- Recall and Remember latency with 1,000 spaces loaded vs one (two servers on one CPU, the
  client on the other, calls alternating);
- RSS and open files per idle space (10,000 spaces on disk vs one);
- p99 Remember latency at 32 concurrent writers, and the echo server's and the floor server's
  p99 at 32 callers (rounds interleaved, the median of each one's p99s);
- fan-out: space B's Remember p99 while space A has 1,000 subscribers and takes batches, vs
  alone (`subscribe_fanout_remember_p99_ratio`; the subscribers run in another process), and
  its floor: the same while A is on a second server process on the same machine
  (`subscribe_fanout_apart_p99_ratio`; `subscribe_fanout_vs_apart`: what sharing one server
  adds);
- time from start to serving with 10,000 spaces on disk (vs one space);
- TLS: unary Recall throughput and the time to a first answer on a new connection, a TLS server
  vs a plaintext one over the same space (rounds interleaved).

Servers run as `memspace serve` subprocesses (the load generator runs here), so the figures
include process start, imports and the real flags. `python -m benchmarks.grpc_bench echo` is the
echo server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memspace_cli.serve import limit_blas_threads
from memspace_contract import index, spaces
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc
from memspace_server.api import sharing

REPO = Path(__file__).resolve().parents[1]
ECHO_METHOD = "/bench.Echo/Echo"
CONCURRENCY = 32
PARTS = ("throughput", "restart", "many", "fanout", "tls")
_ADDRESS = re.compile(r"serving (?:\d+ spaces )?on (\S+)")
ALONE_S = sharing.WINDOW_S + 0.1
"""A pause before each closed loop on one space, so that the server sees that space alone (the
previous loop's space no longer shares the event loop) and measures it without turns."""


# -- servers in subprocesses ---------------------------------------------------------------------


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """This thread on `cpus` only (if given), then where it was."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class Process:
    """A server subprocess with its address, RSS and open files."""

    def __init__(self, command: list[str], log: Path, cpus: set[int] | None = None) -> None:
        """`cpus`: the only CPUs the process (and every thread it starts) may run on."""
        self.command = command
        self.log = log
        # A child inherits the CPUs of the thread that starts it.
        with log.open("w") as out, pinned(cpus):
            self.popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        self.started = time.perf_counter()
        self.address = ""

    def wait_address(self, limit_s: float = 60.0) -> str:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            found = _ADDRESS.search(self.log.read_text())
            if found:
                self.address = found.group(1)
                return self.address
            if self.popen.poll() is not None:
                break
            time.sleep(0.005)
        raise RuntimeError(f"server did not start:\n{self.log.read_text()}")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.popen.pid}/fd"))

    def cpu_s(self, thread: int | None = None) -> float:
        """CPU time of the process so far, or of one of its threads (by its native id)."""
        pid = self.popen.pid
        stat = Path(f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat")
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()


def memspace_serve(data: Path, log: Path, *extra: str, cpus: set[int] | None = None) -> Process:
    """`memspace serve` on a free port (it limits its own BLAS threads); on `cpus` only, if
    given."""
    return Process(
        [
            sys.executable,
            "-m",
            "memspace_cli.main",
            "serve",
            "--data-root",
            str(data),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            *extra,
        ],
        log,
        cpus,
    )


@contextlib.contextmanager
def running(process: Process) -> Iterator[Process]:
    try:
        process.wait_address()
        yield process
    finally:
        process.stop()


async def wait_serving(address: str, limit_s: float = 60.0) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + limit_s
        while True:
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.005)


def echo_main() -> None:
    """A bare grpc.aio server with one unary method returning its request bytes."""

    async def echo(request: bytes, context: object) -> bytes:
        return request

    async def serve() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(echo)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"serving on 127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())


# -- load ------------------------------------------------------------------------------------


async def closed_loop(
    call: Callable[[], Awaitable[object]], concurrency: int, seconds: float
) -> tuple[float, list[float]]:
    """`concurrency` callers calling back to back for `seconds`: (calls/s, latencies in s)."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - started), latencies


async def sequential(call: Callable[[], Awaitable[object]], count: int) -> list[float]:
    await call()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0


def p99_ms(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000.0


rng = np.random.default_rng(7)


def vectors(count: int, dim: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    return rng.standard_normal((count, dim)).astype(np.float32)


async def fill(stub: pb_grpc.MemoryServiceAsyncStub, space: str, count: int, dim: int) -> None:
    """`count` memories in `space`, by RememberBatch streams of 1,000."""
    matrix = vectors(count, dim)
    for start in range(0, count, 1000):

        async def requests(start: int = start) -> AsyncIterator[pb.RememberRequest]:
            for row in range(start, min(count, start + 1000)):
                yield pb.RememberRequest(
                    space=space,
                    memory=pb.Memory(content=f"memory {row}", embedding=matrix[row].tolist()),
                )

        await stub.RememberBatch(requests())


# -- throughput and latency of one server ----------------------------------------------------


async def throughput(results: dict[str, object], work: Path, quick: bool) -> None:
    """Recall/Remember QPS vs echo; Recall latency through gRPC vs in-process; p99 Remember at
    32 writers through gRPC and in-process."""
    from memspace_server.storage import registry  # noqa: PLC0415  # the engine, in-process

    seconds = 1.5 if quick else 3.0
    rounds = 2 if quick else 3
    big = 2_000 if quick else 10_000
    data = work / "main"
    echo = Process([sys.executable, "-m", "benchmarks.grpc_bench", "echo"], work / "echo.log")
    (work / "floor").mkdir()
    floor = Process(
        [sys.executable, "-m", "benchmarks.grpc_floor", str(work / "floor")], work / "floor.log"
    )
    server = memspace_serve(data, work / "server.log")
    with running(echo), running(floor), running(server):
        async with (
            grpc.aio.insecure_channel(echo.address) as echo_channel,
            grpc.aio.insecure_channel(floor.address) as floor_channel,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            memories = pb_grpc.MemoryServiceStub(channel)
            admin = pb_grpc.SpaceServiceStub(channel)
            for name, dim in (("recall", 64), ("writes", 64), ("big", 384), ("p99", 384)):
                await admin.CreateSpace(pb.CreateSpaceRequest(space=name, embedding_dim=dim))
            await fill(memories, "recall", 1_000, 64)
            await fill(memories, "big", big, 384)
            # The same space, opened in this process too: calls alternate between the two.
            copy_space(data, work / "local", "big")
            cue = pb.RecallRequest(space="big", cue=vectors(1, 384)[0].tolist(), k=10)
            await compare_recall(
                results,
                (server.address, echo.address),
                work / "local",
                cue,
                150 if quick else 400,
            )
            held = registry.standalone(work / "local")
            try:
                servers = Servers(echo, floor, server)
                channels = Channels(
                    echo_channel, pb_grpc.MemoryServiceStub(floor_channel), memories
                )
                await qps(results, servers, channels, rounds, seconds)
                await p99(results, channels, held, rounds, seconds)
            finally:
                await held.close()


def copy_space(source: Path, target: Path, name: str) -> None:
    """A standalone data root holding a copy of one space (its WAL is fsynced: consistent)."""
    shutil.copytree(source / "spaces" / name, target / "spaces" / name)
    (target / "index").mkdir(parents=True)
    shutil.copy(source / "index" / f"{name}.json", target / "index" / f"{name}.json")


async def compare_recall(
    results: dict[str, object],
    addresses: tuple[str, str],
    root: Path,
    cue: pb.RecallRequest,
    count: int,
) -> None:
    """Recall through the server vs in-process over a copy of the same space, calls alternating,
    measured in a child process whose BLAS threads are limited as `memspace serve` limits the
    server's (this process may have loaded numpy with other settings)."""
    env = dict(os.environ)
    limit_blas_threads(env)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.grpc_bench",
        "compare",
        *addresses,
        str(root),
        cue.SerializeToString().hex(),
        str(count),
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
        env=env,
    )
    out, _ = await child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"the in-process comparison failed ({child.returncode})")
    results.update(json.loads(out))


def compare_main(address: str, echo_address: str, root: str, cue_hex: str, count: int) -> None:
    """The child of `compare_recall`: prints its figures as JSON (with the echo server's round
    trip, the floor of any gRPC call on this machine)."""
    from memspace_server.api import converters  # noqa: PLC0415  # the engine, in-process
    from memspace_server.storage import registry  # noqa: PLC0415

    cue = pb.RecallRequest.FromString(bytes.fromhex(cue_hex))

    async def measure() -> dict[str, float]:
        held = registry.standalone(Path(root))
        remote: list[float] = []
        local: list[float] = []
        echoed: list[float] = []
        payload = cue.SerializeToString()
        try:
            async with (
                grpc.aio.insecure_channel(address) as channel,
                grpc.aio.insecure_channel(echo_address) as echo_channel,
                held.lease(spaces.SpaceId(cue.space)) as space,
            ):
                memories = pb_grpc.MemoryServiceStub(channel)
                echo = echo_channel.unary_unary(
                    ECHO_METHOD, request_serializer=None, response_deserializer=None
                )
                query = converters.query(cue)
                await space.recall(query)
                await memories.Recall(cue)
                await echo(payload)
                for _ in range(count):
                    started = time.perf_counter()
                    await memories.Recall(cue)
                    remote.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    await space.recall(query)
                    local.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    await echo(payload)
                    echoed.append(time.perf_counter() - started)
        finally:
            await held.close()
        return {
            "grpc_recall_ms": round(median_ms(remote), 3),
            "inprocess_recall_ms": round(median_ms(local), 3),
            "grpc_recall_extra_ms": round(median_ms(remote) - median_ms(local), 3),
            "echo_round_trip_ms": round(median_ms(echoed), 3),
        }

    print(json.dumps(asyncio.run(measure())))


@dataclasses.dataclass(frozen=True)
class Servers:
    echo: Process
    floor: Process
    memspace: Process


@dataclasses.dataclass(frozen=True)
class Channels:
    echo: grpc.aio.Channel
    floor: pb_grpc.MemoryServiceAsyncStub
    memspace: pb_grpc.MemoryServiceAsyncStub


async def qps(
    results: dict[str, object],
    servers: Servers,
    channels: Channels,
    rounds: int,
    seconds: float,
) -> None:
    """Calls per second of 32 callers, rounds interleaved: the echo server, memspace's Recall
    and Remember, and the same two calls on the floor server (`grpc_floor`: only the steps no
    implementation of them can skip), with each server's CPU per call."""
    recall = pb.RecallRequest(space="recall", cue=vectors(1, 64)[0].tolist(), k=10)
    remember = pb.RememberRequest(
        space="writes", memory=pb.Memory(content="x" * 100, embedding=[0.5] * 64)
    )
    echo_call = channels.echo.unary_unary(
        ECHO_METHOD, request_serializer=None, response_deserializer=None
    )
    payload = recall.SerializeToString()
    calls: dict[str, tuple[Process, Callable[[], Awaitable[object]]]] = {
        "echo": (servers.echo, lambda: echo_call(payload)),
        "recall": (servers.memspace, lambda: channels.memspace.Recall(recall)),
        "remember": (servers.memspace, lambda: channels.memspace.Remember(remember)),
        "floor_recall": (servers.floor, lambda: channels.floor.Recall(recall)),
        "floor_remember": (servers.floor, lambda: channels.floor.Remember(remember)),
    }
    rates: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (process, call) in calls.items():
            await asyncio.sleep(ALONE_S)
            before = process.cpu_s()
            rate, _ = await closed_loop(call, CONCURRENCY, seconds)
            rates[name].append(rate)
            cpu[name].append((process.cpu_s() - before) / (rate * seconds) * 1e6)
    best = {name: max(found) for name, found in rates.items()}
    results["echo_qps"] = round(best["echo"])
    results["grpc_recall_qps"] = round(best["recall"])
    results["grpc_remember_qps"] = round(best["remember"])
    results["grpc_vs_echo"] = round(min(best["recall"], best["remember"]) / best["echo"], 3)
    results["grpc_floor_recall_qps"] = round(best["floor_recall"])
    results["grpc_floor_remember_qps"] = round(best["floor_remember"])
    floor = min(best["floor_recall"], best["floor_remember"])
    results["grpc_floor_vs_echo"] = round(floor / best["echo"], 3)
    results["grpc_vs_floor"] = round(min(best["recall"], best["remember"]) / floor, 3)
    for name in calls:
        results[f"server_cpu_us_per_call_{name}"] = round(statistics.median(cpu[name]), 1)


async def p99(
    results: dict[str, object], channels: Channels, held: Any, rounds: int, seconds: float
) -> None:
    """p99 of Remember at 32 concurrent writers: memspace's, the echo server's (the same bytes)
    and the floor server's (the same request, durable too), in `rounds` interleaved rounds of
    `seconds` each; each figure is the median of its rounds' p99s (one closed loop's p99 is its
    few slowest calls: a single hiccup of the machine moves it). Then the engine's own, in
    process."""
    from memspace_server.api import converters  # noqa: PLC0415

    writer = pb.RememberRequest(
        space="p99", memory=pb.Memory(content="y" * 200, embedding=vectors(1, 384)[0].tolist())
    )
    echo_call = channels.echo.unary_unary(
        ECHO_METHOD, request_serializer=None, response_deserializer=None
    )
    payload = writer.SerializeToString()
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "memspace": lambda: channels.memspace.Remember(writer),
        "echo": lambda: echo_call(payload),
        "floor": lambda: channels.floor.Remember(writer),
    }
    p99s: dict[str, list[float]] = {name: [] for name in calls}
    medians: list[float] = []
    rates: list[float] = []
    for _ in range(rounds):
        for name, call in calls.items():
            await asyncio.sleep(ALONE_S)
            rate, latencies = await closed_loop(call, 32, seconds)
            p99s[name].append(p99_ms(latencies))
            if name == "memspace":
                medians.append(median_ms(latencies))
                rates.append(rate)
    ours, echo, floor = (statistics.median(p99s[name]) for name in calls)
    print(f"   p99 at 32 callers, ms a round: {p99s}", flush=True)
    results["remember_p99_ms_32_writers"] = round(ours, 2)
    results["remember_p50_ms_32_writers"] = round(statistics.median(medians), 2)
    results["remember_qps_32_writers"] = round(statistics.median(rates))
    results["echo_p99_ms_32"] = round(echo, 2)
    results["remember_p99_vs_echo_p99_32"] = round(ours / echo, 2)
    results["floor_remember_p99_ms_32"] = round(floor, 2)
    results["floor_remember_p99_vs_echo_p99_32"] = round(floor / echo, 2)
    results["remember_p99_vs_floor_p99_32"] = round(ours / floor, 2)
    await held.create(spaces.SpaceId("p99"), 384)
    async with held.lease(spaces.SpaceId("p99")) as space:
        draft = converters.draft(writer)
        _, local = await closed_loop(lambda: space.remember(draft), 32, seconds)
    results["inprocess_remember_p99_ms_32_writers"] = round(p99_ms(local), 2)


# -- TLS -------------------------------------------------------------------------------------


def tls_files(work: Path) -> bytes:
    """A CA and a certificate for `localhost` it signed, in `work`; returns the CA (PEM)."""
    import datetime  # noqa: PLC0415

    from memspace_operator import certificates  # noqa: PLC0415  # the operator's own issuer

    work.mkdir(parents=True, exist_ok=True)
    ca = certificates.new_ca("bench", datetime.timedelta(days=1))
    leaf = certificates.issue(ca, "bench", ["localhost"], datetime.timedelta(days=1))
    (work / "tls.crt").write_bytes(leaf.cert)
    (work / "tls.key").write_bytes(leaf.key)
    return ca.cert


async def tls(results: dict[str, object], work: Path, quick: bool) -> None:
    """The same space behind a plaintext and a TLS `memspace serve`: Recall QPS at CONCURRENCY
    and the median time from a new channel to its first answer (the handshake), interleaved."""
    seconds = 1.5 if quick else 3.0
    rounds = 2 if quick else 3
    connects = 30 if quick else 100
    ca = tls_files(work)
    plain_data, tls_data = work / "plain", work / "tls"
    plain = memspace_serve(plain_data, work / "plain.log")
    with running(plain):
        async with grpc.aio.insecure_channel(plain.address) as channel:
            await pb_grpc.SpaceServiceStub(channel).CreateSpace(
                pb.CreateSpaceRequest(space="recall", embedding_dim=64)
            )
            await fill(pb_grpc.MemoryServiceStub(channel), "recall", 1_000, 64)
    copy_space(plain_data, tls_data, "recall")
    files = ("--tls-cert-file", str(work / "tls.crt"), "--tls-key-file", str(work / "tls.key"))
    secured = memspace_serve(tls_data, work / "tls.log", *files)
    plain = memspace_serve(plain_data, work / "plain.log")
    options = [("grpc.ssl_target_name_override", "localhost")]
    credentials = grpc.ssl_channel_credentials(ca)

    def channel_to(name: str) -> grpc.aio.Channel:
        if name == "plaintext":
            return grpc.aio.insecure_channel(plain.address)
        return grpc.aio.secure_channel(secured.address, credentials, options=options)

    recall = pb.RecallRequest(space="recall", cue=vectors(1, 64)[0].tolist(), k=10)
    rates: dict[str, list[float]] = {"plaintext": [], "tls": []}
    first: dict[str, list[float]] = {"plaintext": [], "tls": []}
    with running(plain), running(secured):
        held = {name: channel_to(name) for name in rates}
        try:
            for _ in range(rounds):
                for name, channel in held.items():
                    call = functools.partial(pb_grpc.MemoryServiceStub(channel).Recall, recall)
                    rate, _ = await closed_loop(call, CONCURRENCY, seconds)
                    rates[name].append(rate)
            for _ in range(connects):
                for name, samples in first.items():
                    started = time.perf_counter()
                    async with channel_to(name) as fresh:
                        await pb_grpc.MemoryServiceStub(fresh).Recall(recall)
                    samples.append(time.perf_counter() - started)
        finally:
            for channel in held.values():
                await channel.close(None)
    results["tls_recall_qps"] = round(max(rates["tls"]))
    results["plaintext_recall_qps"] = round(max(rates["plaintext"]))
    results["tls_vs_plaintext_recall"] = round(max(rates["tls"]) / max(rates["plaintext"]), 3)
    results["tls_first_call_ms"] = round(median_ms(first["tls"]), 2)
    results["plaintext_first_call_ms"] = round(median_ms(first["plaintext"]), 2)


# -- many spaces ---------------------------------------------------------------------------


async def template_space(root: Path, dim: int, count: int) -> Path:
    """One space with `count` memories, loaded once and flushed: cloned to make many."""
    from memspace_server.storage import memories, registry  # noqa: PLC0415

    held = registry.standalone(root)
    space_id = spaces.SpaceId("template")
    await held.create(space_id, dim)
    matrix = vectors(count, dim)
    async with held.lease(space_id) as space:
        await space.remember_many(
            [memories.Draft(content=f"m{i}", embedding=matrix[i]) for i in range(count)]
        )
    await held.close()
    return root / "spaces" / "template"


def clone_spaces(template: Path, root: Path, names: list[str], dim: int) -> None:
    """Standalone data roots holding copies of `template` under other IDs (set-up only: the
    identity file is the one place a volume names its space)."""
    for name in names:
        target = root / "spaces" / name
        shutil.copytree(template, target)
        identity = json.loads((target / "space.json").read_text())
        identity["spaceId"] = name
        (target / "space.json").write_text(json.dumps(identity))
        entry = index.IndexEntry(space_id=spaces.SpaceId(name), embedding_dim=dim)
        (root / "index").mkdir(parents=True, exist_ok=True)
        (root / "index" / index.entry_filename(entry.space_id)).write_text(entry.dumps())


def empty_spaces(root: Path, count: int, dim: int) -> None:
    """`count` spaces as CreateSpace leaves them (identity and index entry), without fsyncs."""
    (root / "index").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        name = f"idle-{i:05d}"
        volume = root / "spaces" / name
        volume.mkdir(parents=True)
        doc = {"spaceId": name, "embeddingDim": dim, "formatVersion": 1, "created": "2026-01-01"}
        (volume / "space.json").write_text(json.dumps(doc))
        entry = index.IndexEntry(space_id=spaces.SpaceId(name), embedding_dim=dim)
        (root / "index" / index.entry_filename(entry.space_id)).write_text(entry.dumps())


async def many_spaces(results: dict[str, object], work: Path, quick: bool) -> None:
    """Latency on one space while 1,000 are loaded vs while it is alone, rounds interleaved."""
    dim, loaded = 64, 1_000
    template = await template_space(work / "template", dim, 100)
    names = [f"s{i:04d}" for i in range(loaded)]
    clone_spaces(template, work / "one", names[:1], dim)
    clone_spaces(template, work / "many", names, dim)
    # Both servers on one CPU, this client on the others: where the scheduler put each process
    # (beside the client or not) moved one server's latency against the other's by up to 16%
    # between runs of the same code. They are called one at a time, so they never compete.
    cpus = sorted(os.sched_getaffinity(0))
    servers, client = ({cpus[-1]}, set(cpus[:-1])) if len(cpus) > 1 else (None, None)
    one = memspace_serve(work / "one", work / "one.log", cpus=servers)
    many = memspace_serve(work / "many", work / "many.log", cpus=servers)
    with running(one), running(many), pinned(client):
        async with (
            grpc.aio.insecure_channel(one.address) as one_channel,
            grpc.aio.insecure_channel(many.address) as many_channel,
        ):
            stubs = {
                "one": pb_grpc.MemoryServiceStub(one_channel),
                "many": pb_grpc.MemoryServiceStub(many_channel),
            }
            cue = vectors(1, dim)[0].tolist()
            before = (many.rss_kib(), many.open_files())
            touch = pb.RecallRequest(cue=cue, k=10)
            queue = list(names)

            async def loader() -> None:
                while queue:
                    name = queue.pop()
                    await stubs["many"].Recall(touch, metadata=(("x-memory-space", name),))

            await asyncio.gather(*(loader() for _ in range(8)))
            after = (many.rss_kib(), many.open_files())
            results["loaded_space_rss_kib"] = round((after[0] - before[0]) / loaded, 1)
            results["loaded_space_open_files"] = round((after[1] - before[1]) / loaded, 2)
            recall = pb.RecallRequest(space="s0000", cue=cue, k=10)
            remember = pb.RememberRequest(
                space="s0000", memory=pb.Memory(content="z" * 100, embedding=cue)
            )
            # Calls alternate between the two servers, so both see the same machine.
            samples: dict[tuple[str, str], list[float]] = {}
            calls: dict[str, Callable[[pb_grpc.MemoryServiceAsyncStub], Awaitable[object]]] = {
                "recall": lambda stub: stub.Recall(recall),
                "remember": lambda stub: stub.Remember(remember),
            }
            for kind, call in calls.items():
                for stub in stubs.values():
                    await call(stub)  # warm
                for _ in range(300 if quick else 800):
                    for server, stub in stubs.items():
                        started = time.perf_counter()
                        await call(stub)
                        samples.setdefault((server, kind), []).append(time.perf_counter() - started)
    ratio = {
        kind: median_ms(samples[("many", kind)]) / median_ms(samples[("one", kind)])
        for kind in ("recall", "remember")
    }
    results["spaces_1000_recall_ms"] = round(median_ms(samples[("many", "recall")]), 3)
    results["spaces_1_recall_ms"] = round(median_ms(samples[("one", "recall")]), 3)
    results["spaces_1000_remember_ms"] = round(median_ms(samples[("many", "remember")]), 3)
    results["spaces_1_remember_ms"] = round(median_ms(samples[("one", "remember")]), 3)
    results["spaces_1000_vs_1_recall_ratio"] = round(ratio["recall"], 3)
    results["spaces_1000_vs_1_remember_ratio"] = round(ratio["remember"], 3)
    results["spaces_1000_vs_1_latency_ratio"] = round(max(ratio.values()), 3)


async def restart(results: dict[str, object], work: Path, quick: bool) -> None:
    """Start to serving with 10,000 spaces on disk vs one; RSS and open files of idle spaces."""
    count = 10_000
    empty_spaces(work / "idle", count, 768)
    empty_spaces(work / "single", 1, 768)
    figures: dict[str, tuple[float, int, int]] = {}
    for name in ("single", "idle") if quick else ("single", "idle", "single", "idle"):
        process = memspace_serve(work / name, work / f"{name}.log")
        try:
            process.wait_address()
            await wait_serving(process.address)
            elapsed = time.perf_counter() - process.started
            await asyncio.sleep(0.5)  # settled: housekeeping ran once
            shown = (elapsed, process.rss_kib(), process.open_files())
            if name not in figures or elapsed < figures[name][0]:
                figures[name] = shown
        finally:
            process.stop()
    results["restart_1_space_s"] = round(figures["single"][0], 2)
    results["restart_10000_spaces_s"] = round(figures["idle"][0], 2)
    results["idle_space_rss_kib"] = round(
        (figures["idle"][1] - figures["single"][1]) / (count - 1), 2
    )
    results["idle_space_open_files"] = (figures["idle"][2] - figures["single"][2]) / (count - 1)


# -- Subscribe fan-out --------------------------------------------------------------------------


def fanout_main(address: str, subscribers: int, seconds: float, batch: int) -> None:
    """`subscribers` Subscribe streams on space "busy", read as fast as they come, while a
    RememberBatch of `batch` memories goes to that space every 0.2 s; prints counts as JSON."""

    async def fan() -> dict[str, int]:
        counts = {"events": 0, "batches": 0, "ended": 0}
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            streams = [
                stub.Subscribe(pb.SubscribeRequest(space="busy")) for _ in range(subscribers)
            ]

            async def read(stream: Any) -> None:
                try:
                    async for _ in stream:
                        counts["events"] += 1
                except grpc.aio.AioRpcError:
                    counts["ended"] += 1

            readers = [asyncio.ensure_future(read(s)) for s in streams]
            await asyncio.sleep(1.0)
            print("subscribed", flush=True)
            rows = vectors(batch, 64)
            stop_at = time.perf_counter() + seconds
            while time.perf_counter() < stop_at:

                async def requests() -> AsyncIterator[pb.RememberRequest]:
                    for row in rows:
                        yield pb.RememberRequest(
                            space="busy", memory=pb.Memory(content="e", embedding=row.tolist())
                        )

                await stub.RememberBatch(requests())
                counts["batches"] += 1
                await asyncio.sleep(0.2)
            for stream in streams:
                stream.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        return counts

    print(json.dumps(asyncio.run(fan())), flush=True)


async def paced_p99(call: Callable[[], Awaitable[object]], samples: int, pace_s: float) -> float:
    for _ in range(20):
        await call()
    found = []
    for _ in range(samples):
        started = time.perf_counter()
        await call()
        found.append(time.perf_counter() - started)
        await asyncio.sleep(pace_s)
    return p99_ms(found)


async def fanout(results: dict[str, object], work: Path, quick: bool) -> None:
    """Space B's Remember p99 (paced, one at a time) alone, while space A has 1,000 subscribers
    and takes a batch every 0.2 s on the same server, and while A does so on a second server
    process (the machine's floor), in alternating rounds."""
    subscribers = 200 if quick else 1000
    samples = 200 if quick else 500
    rounds = 1 if quick else 3
    pace = 0.005
    seconds = samples * (pace + 0.004) + 2.0
    alone: list[float] = []
    beside: dict[str, list[float]] = {"same": [], "apart": []}
    fans: dict[str, list[dict[str, int]]] = {"same": [], "apart": []}
    with (
        running(memspace_serve(work / "fanout", work / "fanout.log")) as server,
        running(memspace_serve(work / "fanout-apart", work / "fanout-apart.log")) as apart,
    ):
        async with (
            grpc.aio.insecure_channel(server.address) as channel,
            grpc.aio.insecure_channel(apart.address) as apart_channel,
        ):
            memories = pb_grpc.MemoryServiceStub(channel)
            for name in ("busy", "quiet"):
                await pb_grpc.SpaceServiceStub(channel).CreateSpace(
                    pb.CreateSpaceRequest(space=name, embedding_dim=64)
                )
            await pb_grpc.SpaceServiceStub(apart_channel).CreateSpace(
                pb.CreateSpaceRequest(space="busy", embedding_dim=64)
            )
            request = pb.RememberRequest(
                space="quiet", memory=pb.Memory(content="q", embedding=[0.25] * 64)
            )

            async def measure() -> float:
                return await paced_p99(lambda: memories.Remember(request), samples, pace)

            for n in range(rounds):
                for where, target in (("same", server), ("apart", apart)):
                    alone.append(await measure())
                    figure, counts = await beside_subscribers(
                        work,
                        f"fanout-{where}-{n}.out",
                        target.address,
                        subscribers,
                        seconds,
                        measure,
                    )
                    beside[where].append(figure)
                    fans[where].append(counts)
    baseline = statistics.median(alone)
    same, other = statistics.median(beside["same"]), statistics.median(beside["apart"])
    print(
        f"   fan-out: B's Remember p99 alone {alone} ms, beside A's subscribers on the same "
        f"server {beside['same']} ms ({fans['same']}), on another server {beside['apart']} ms "
        f"({fans['apart']})",
        flush=True,
    )
    results["subscribe_fanout_subscribers"] = subscribers
    results["subscribe_fanout_remember_p99_alone_ms"] = round(baseline, 2)
    results["subscribe_fanout_remember_p99_ms"] = round(same, 2)
    results["subscribe_fanout_remember_p99_ratio"] = round(same / baseline, 2)
    results["subscribe_fanout_apart_p99_ratio"] = round(other / baseline, 2)
    results["subscribe_fanout_vs_apart"] = round(same / other, 2)
    results["subscribe_fanout_events_delivered"] = sum(f.get("events", 0) for f in fans["same"])


async def beside_subscribers(
    work: Path,
    name: str,
    address: str,
    subscribers: int,
    seconds: float,
    measure: Callable[[], Awaitable[float]],
) -> tuple[float, dict[str, int]]:
    """`measure()` while the subscribers' process (`fanout_main`, its output in `work / name`)
    reads space "busy" on the server at `address`; its figure and the process's counts."""
    command = ["subscribers", address, str(subscribers), str(seconds), "100"]
    return await beside_process(
        [sys.executable, "-m", "benchmarks.grpc_bench", *command],
        work / name,
        measure,
        "subscribed",
    )


async def beside_process(
    command: list[str],
    log: Path,
    measure: Callable[[], Awaitable[float]],
    ready: str | None = None,
) -> tuple[float, dict[str, int]]:
    """`measure()` while `command` runs (its output in `log`): from once it prints `ready` (or a
    second after its start, without), until it ends by itself; the figure and the JSON of its
    last line (empty if it printed none)."""
    other = Process(command, log)
    try:
        if ready is None:
            await asyncio.sleep(1.0)  # at full speed
        else:
            await printed(other, ready)
        figure = await measure()
        while other.popen.poll() is None:  # noqa: ASYNC110  # another process
            await asyncio.sleep(0.1)
    finally:
        other.stop()
    return figure, last_json(other)


async def printed(process: Process, ready: str, limit_s: float = 60.0) -> None:
    """Wait until `process` has printed `ready` (its start done); fail if it ends first."""
    deadline = time.monotonic() + limit_s
    while ready not in process.log.read_text():
        if process.popen.poll() is not None or time.monotonic() > deadline:
            command = shlex.join(process.command[1:])
            raise RuntimeError(f"{command} did not start:\n{process.log.read_text()}")
        await asyncio.sleep(0.1)


def last_json(process: Process) -> dict[str, int]:
    """The JSON object of the last line `process` printed (empty if it printed none)."""
    lines = process.log.read_text().strip().splitlines()
    found: dict[str, int] = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return found


# -- entry point ---------------------------------------------------------------------------


async def _run(
    results: dict[str, object], quick: bool, work: Path, parts: tuple[str, ...] = PARTS
) -> None:
    if "throughput" in parts:
        await _throughput(results, quick, work)
    if "restart" in parts:
        started = time.perf_counter()
        await restart(results, work, quick)
        print(f"   restart and idle spaces: {time.perf_counter() - started:.0f} s", flush=True)
    if "many" in parts:
        started = time.perf_counter()
        await many_spaces(results, work, quick)
        print(f"   1,000 spaces: {time.perf_counter() - started:.0f} s", flush=True)
    if "fanout" in parts:
        started = time.perf_counter()
        await fanout(results, work, quick)
        print(f"   fan-out: {time.perf_counter() - started:.0f} s", flush=True)
    if "tls" in parts:
        started = time.perf_counter()
        await tls(results, work / "tls-bench", quick)
        print(f"   TLS vs plaintext: {time.perf_counter() - started:.0f} s", flush=True)


async def _throughput(results: dict[str, object], quick: bool, work: Path) -> None:
    started = time.perf_counter()
    await throughput(results, work, quick)
    print(f"   throughput and latency: {time.perf_counter() - started:.0f} s", flush=True)


def run(results: dict[str, object], quick: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="memspace-grpc-bench-") as tmp:
        asyncio.run(_run(results, quick, Path(tmp)))


def main() -> None:
    """`python -m benchmarks.grpc_bench [--quick] [PART...]` runs some parts alone (PARTS);
    `... echo` is the echo server, `... subscribers ADDRESS N SECONDS BATCH` the fan-out
    benchmark's subscribers."""
    args = sys.argv[1:]
    if args == ["echo"]:
        echo_main()
        return
    if args[:1] == ["subscribers"]:
        fanout_main(args[1], int(args[2]), float(args[3]), int(args[4]))
        return
    if args[:1] == ["compare"]:
        compare_main(args[1], args[2], args[3], args[4], int(args[5]))
        return
    parts = tuple(a for a in args if a in PARTS) or PARTS
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="memspace-grpc-bench-") as tmp:
        asyncio.run(_run(figures, "--quick" in args, Path(tmp), parts))
    print(json.dumps(figures, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
