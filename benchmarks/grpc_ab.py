"""Side-by-side gRPC figures of several `memspace serve` variants (other checkouts, other flags)
and a bare grpc.aio echo server, in one run with rounds interleaved, as the figures of
`grpc_bench` are taken: 32 concurrent unary Recalls (1,000 memories of 64 dimensions, k=10) and
Remembers per variant, calls per second, the server's CPU per call, its context switches per
call and the p99 latency (median over the rounds, and against the echo server's). On a shared
machine only such ratios within one run mean anything.

    python -m benchmarks.grpc_ab [--seconds S] [--rounds N] [--only recall|remember] VARIANT...

A VARIANT is NAME=[CHECKOUT][::FLAG ...]: the server of CHECKOUT (a directory holding another
version's `server/`, `contract/` and `cli/`, e.g. `git archive REV | tar -x -C DIR`; empty: this
one) started with the extra FLAGs of `memspace serve`, e.g.
`base=/tmp/base now= slow-switch=::--thread-switch-ms=5`. Nothing is written to results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from benchmarks import grpc_bench
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    checkout: str
    flags: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, _, rest = text.partition("=")
        checkout, _, flags = rest.partition("::")
        return cls(name, checkout, tuple(flags.split()))

    def start(self, work: Path) -> grpc_bench.Process:
        return self.serve(work / self.name, work / f"{self.name}.log")

    def serve(self, data: Path, log: Path, *extra: str) -> grpc_bench.Process:
        """`memspace serve` of this variant on `data`, with `extra` flags after its own."""
        saved = os.environ.get("PYTHONPATH")
        if self.checkout:
            parts = ("server", "contract", "cli", "operator")
            os.environ["PYTHONPATH"] = ":".join(f"{self.checkout}/{part}" for part in parts)
        try:
            return grpc_bench.memspace_serve(data, log, *self.flags, *extra)
        finally:
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of every thread of a process."""
    total = 0
    for thread in os.listdir(f"/proc/{pid}/task"):
        try:
            lines = Path(f"/proc/{pid}/task/{thread}/status").read_text().splitlines()
        except OSError:
            continue  # the thread ended
        total += sum(int(line.split()[1]) for line in lines if "ctxt_switches" in line)
    return total


@dataclasses.dataclass
class Target:
    process: grpc_bench.Process
    call: Callable[[], Awaitable[object]]
    rates: list[float] = dataclasses.field(default_factory=list)
    cpu_us: list[float] = dataclasses.field(default_factory=list)
    switches: list[float] = dataclasses.field(default_factory=list)
    p99_ms: list[float] = dataclasses.field(default_factory=list)


async def compare(variants: list[Variant], kinds: list[str], seconds: float, rounds: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="memspace-grpc-ab-"))
    echo = grpc_bench.Process(
        [sys.executable, "-m", "benchmarks.grpc_bench", "echo"], work / "echo.log"
    )
    servers = {variant.name: variant.start(work) for variant in variants}
    try:
        echo.wait_address()
        for server in servers.values():
            server.wait_address()
        await measure(echo, servers, kinds, seconds, rounds)
    finally:
        for process in (echo, *servers.values()):
            process.stop()
        shutil.rmtree(work, ignore_errors=True)


async def measure(
    echo: grpc_bench.Process,
    servers: dict[str, grpc_bench.Process],
    kinds: list[str],
    seconds: float,
    rounds: int,
) -> None:
    recall = pb.RecallRequest(space="recall", cue=grpc_bench.vectors(1, 64)[0].tolist(), k=10)
    remember = pb.RememberRequest(
        space="writes", memory=pb.Memory(content="x" * 100, embedding=[0.5] * 64)
    )
    payload = recall.SerializeToString()
    channels = [grpc.aio.insecure_channel(p.address) for p in (echo, *servers.values())]
    echo_call = channels[0].unary_unary(
        grpc_bench.ECHO_METHOD, request_serializer=None, response_deserializer=None
    )
    targets = {("echo", "echo"): Target(echo, lambda: echo_call(payload))}
    for (name, server), channel in zip(servers.items(), channels[1:], strict=True):
        stub = pb_grpc.MemoryServiceStub(channel)
        admin = pb_grpc.SpaceServiceStub(channel)
        for space in ("recall", "writes"):
            await admin.CreateSpace(pb.CreateSpaceRequest(space=space, embedding_dim=64))
        await grpc_bench.fill(stub, "recall", 1_000, 64)
        by_kind: dict[str, Callable[[], Awaitable[object]]] = {
            "recall": functools.partial(stub.Recall, recall),
            "remember": functools.partial(stub.Remember, remember),
        }
        for kind in kinds:
            targets[(name, kind)] = Target(server, by_kind[kind])
    for target in targets.values():
        for _ in range(50):
            await target.call()  # warm
    load_before = os.getloadavg()
    for _ in range(rounds):
        for target in targets.values():
            await asyncio.sleep(grpc_bench.ALONE_S)
            pid = target.process.popen.pid
            cpu, switches = target.process.cpu_s(), context_switches(pid)
            rate, latencies = await grpc_bench.closed_loop(
                target.call, grpc_bench.CONCURRENCY, seconds
            )
            calls = rate * seconds
            target.rates.append(rate)
            target.p99_ms.append(grpc_bench.p99_ms(latencies))
            target.cpu_us.append((target.process.cpu_s() - cpu) / calls * 1e6)
            target.switches.append((context_switches(pid) - switches) / calls)
    load_after = os.getloadavg()
    for channel in channels:
        await channel.close(None)
    report(targets, load_before, load_after)


def report(
    targets: dict[tuple[str, str], Target],
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> None:
    echo = targets[("echo", "echo")]
    echo_best, echo_p99 = max(echo.rates), statistics.median(echo.p99_ms)
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    print(
        "variant      call      best/s  vs echo  CPU us/call median (min)  switches/call"
        "  p99 ms median  vs echo"
    )
    for (name, kind), target in targets.items():
        best, p99 = max(target.rates), statistics.median(target.p99_ms)
        print(
            f"{name:<12} {kind:<9} {best:7.0f}  {best / echo_best:7.3f}  "
            f"{statistics.median(target.cpu_us):8.1f} ({min(target.cpu_us):6.1f})"
            f"  {statistics.median(target.switches):13.1f}  {p99:13.2f}  {p99 / echo_p99:7.2f}"
        )


def print_ratios(
    figures: dict[tuple[str, str], list[float]], keys: list[str], names: list[str], width: int
) -> None:
    """A table of each figure's median per variant and its ratio to the first variant's, from
    `figures[(key, variant name)]` (the values of every round)."""
    first = names[0]
    print(f"{'figure':<{width}} {'variant':<10} {'median':>10}  vs {first}  values")
    for key in keys:
        base = figures.get((key, first))
        reference = statistics.median(base) if base else 0.0
        for name in names:
            values = figures.get((key, name))
            if not values:
                continue
            median = statistics.median(values)
            ratio = median / reference if reference else float("nan")
            print(
                f"{key:<{width}} {name:<10} {median:10.3f}  {ratio:6.3f}  "
                f"{[round(v, 3) for v in values]}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", type=Variant.parse, metavar="VARIANT")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one closed loop")
    parser.add_argument("--rounds", type=int, default=6, help="rounds over every target")
    parser.add_argument("--only", choices=["recall", "remember"], action="append")
    args = parser.parse_args()
    asyncio.run(
        compare(args.variants, args.only or ["recall", "remember"], args.seconds, args.rounds)
    )


if __name__ == "__main__":
    main()
