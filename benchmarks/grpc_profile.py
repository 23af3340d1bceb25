"""Where a unary call's time goes in `memspace serve`, beside the floor server (`grpc_floor`:
the same calls with only the steps no implementation can skip), under the load `grpc_bench`
measures them with: 32 callers calling back to back, Recall (k=10 over 1,000 memories of 64
dimensions) and Remember (64 dimensions, durable). py-spy samples each server while it is
called; rounds alternate between the two servers.

For each server and call it prints, per call:
- the server's CPU time (all threads, from /proc) and its event loop thread's;
- the loop thread's sampled busy time, split into the call's own code (any stack through the
  server's own modules: memspace_server, or the floor's handler) and gRPC with the event loop
  (stacks only in grpc.aio's compiled core, the loop and asyncio: the same code for both);
- each other thread's sampled busy time (a thread waiting on the disk in fdatasync counts as
  busy: py-spy sees it running);
- memspace's own functions by their inclusive time (line numbers merged).

`--call fanout` profiles the gRPC suite's fan-out instead (`fanout`): 1,000 Subscribe streams
on one space taking a batch every 0.2 s while another space takes a Remember every 5 ms, with
the server's and the subscribers' shares of a core and where the loop thread's time goes.

Sampling slows a server a little, so its calls per second here are below `grpc_bench`'s; the
split is what to read. Needs py-spy (the `bench` extra) and the right to trace a process
(root, or CAP_SYS_PTRACE).

    python -m benchmarks.grpc_profile [--call recall|remember|fanout] [--rounds N]
                                      [--seconds S] [--subscribers N] [--top N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import functools
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from benchmarks import grpc_bench
from memspace_cli.serve import limit_blas_threads
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc

SAMPLES_PER_S = 200
CALLS = ("recall", "remember")
OWN_CODE = {"memspace": "memspace_server/", "floor": "benchmarks/grpc_floor.py"}
"""A stack through a file whose path holds this is the server's own code."""
LOOP = "gRPC and the event loop"
OWN = "the call's own code"
_LINE = re.compile(r":\d+\)$")
_THREAD = re.compile(r"^thread \(\d+\): (.*)$")
_DISPATCH = ("Runner.run (asyncio/runners.py", "Handle._run (asyncio/events.py")
"""Frames from which the event loop runs a callback: uvloop's loop (compiled) runs them from
the `asyncio.Runner`'s frame, asyncio's own from `Handle._run`."""


def py_spy() -> str:
    """The py-spy executable beside this Python, else on PATH."""
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed: `make venv` installs the bench extra")
    return found


def thread_group(name: str) -> str:
    """A thread's name without its number in a pool: memspace-wal_1 -> memspace-wal."""
    if "_poll_wrapper" in name:
        return "grpc-poller"
    return re.sub(r"_\d+$", "", name)


@dataclasses.dataclass
class Samples:
    """py-spy's raw samples of one server: the loop thread's by kind and own function, the
    other threads' by group."""

    own_code: str
    loop: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    functions: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    threads: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def add(self, raw: str) -> None:
        """Count the lines of py-spy's raw output (`thread (TID): NAME;frame;... COUNT`)."""
        for line in raw.splitlines():
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or not count.isdigit():
                continue
            head, *frames = stack.split(";")
            named = _THREAD.match(head)
            thread = named.group(1) if named else head
            if thread != "MainThread":
                self.threads[thread_group(thread)] += int(count)
                continue
            # Only what the loop runs counts: the frames above its dispatch (the server's
            # entry point is below it in every stack).
            cut = max((i for i, f in enumerate(frames) if f.startswith(_DISPATCH)), default=-1)
            own = [_LINE.sub(")", f) for f in frames[cut + 1 :] if self.own_code in f]
            self.loop[OWN if own else LOOP] += int(count)
            for function in set(own):
                self.functions[function] += int(count)


@dataclasses.dataclass
class Round:
    calls: int
    seconds: float
    cpu_s: float
    main_cpu_s: float


async def profiled(
    process: grpc_bench.Process,
    call: Callable[[], Awaitable[object]],
    seconds: float,
    samples: Samples,
) -> Round:
    """32 callers calling `call` back to back while py-spy samples `process` for `seconds`:
    the calls, CPU and time of the sampled window."""
    done = 0
    stop = False

    async def caller() -> None:
        nonlocal done
        while not stop:
            await call()
            done += 1

    callers = [asyncio.ensure_future(caller()) for _ in range(grpc_bench.CONCURRENCY)]
    try:
        await asyncio.sleep(0.5)  # at full speed
        pid = process.popen.pid
        before = (done, time.perf_counter(), process.cpu_s(), process.cpu_s(pid))
        await record(pid, seconds, samples)
        after = (done, time.perf_counter(), process.cpu_s(), process.cpu_s(pid))
    finally:
        stop = True
        await asyncio.gather(*callers, return_exceptions=True)
    return Round(
        after[0] - before[0], after[1] - before[1], after[2] - before[2], after[3] - before[3]
    )


async def record(pid: int, seconds: float, samples: Samples) -> None:
    """py-spy's samples of process `pid` for `seconds`, added to `samples`."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        spy = await asyncio.create_subprocess_exec(
            py_spy(),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            str(SAMPLES_PER_S),
            "--format",
            "raw",
            "--threads",
            "--nonblocking",
            "--output",
            out.name,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, errors = await spy.communicate()
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed: {errors.decode(errors='replace').strip()}")
        samples.add(await asyncio.to_thread(Path(out.name).read_text))


def summary(rounds: list[Round], samples: Samples, top: int) -> dict[str, object]:
    """Per call, in µs: the medians of the rounds' CPU, and the samples over all rounds."""
    calls = sum(r.calls for r in rounds)

    def us(count: int) -> float:
        return round(count / SAMPLES_PER_S / calls * 1e6, 1)

    return {
        "calls_per_s": round(statistics.median(r.calls / r.seconds for r in rounds)),
        "cpu_us_per_call": round(statistics.median(r.cpu_s / r.calls * 1e6 for r in rounds), 1),
        "loop_thread_cpu_us_per_call": round(
            statistics.median(r.main_cpu_s / r.calls * 1e6 for r in rounds), 1
        ),
        "loop_thread_busy_us_per_call": us(sum(samples.loop.values())),
        "loop_thread": {kind: us(samples.loop[kind]) for kind in (LOOP, OWN)},
        "other_threads_busy_us_per_call": {
            name: us(count) for name, count in samples.threads.most_common()
        },
        "own_functions_us_per_call": {
            name: us(count) for name, count in samples.functions.most_common(top)
        },
    }


async def profile(
    calls: tuple[str, ...], rounds: int, seconds: float, root: Path, top: int = 15
) -> dict[str, dict[str, object]]:
    """{"recall memspace": summary, "recall floor": ..., ...} for each of `calls`."""
    (root / "floor").mkdir()
    floor = grpc_bench.Process(
        [sys.executable, "-m", "benchmarks.grpc_floor", str(root / "floor")], root / "floor.log"
    )
    server = grpc_bench.memspace_serve(root / "memspace", root / "memspace.log")
    found: dict[str, dict[str, object]] = {}
    with grpc_bench.running(floor), grpc_bench.running(server):
        async with (
            grpc.aio.insecure_channel(server.address) as channel,
            grpc.aio.insecure_channel(floor.address) as floor_channel,
        ):
            stubs: dict[str, pb_grpc.MemoryServiceAsyncStub] = {
                "memspace": pb_grpc.MemoryServiceStub(channel),
                "floor": pb_grpc.MemoryServiceStub(floor_channel),
            }
            admin = pb_grpc.SpaceServiceStub(channel)
            for name in ("recall", "writes"):
                await admin.CreateSpace(pb.CreateSpaceRequest(space=name, embedding_dim=64))
            await grpc_bench.fill(stubs["memspace"], "recall", 1_000, 64)
            recall = pb.RecallRequest(
                space="recall", cue=grpc_bench.vectors(1, 64)[0].tolist(), k=10
            )
            remember = pb.RememberRequest(
                space="writes", memory=pb.Memory(content="x" * 100, embedding=[0.5] * 64)
            )
            processes = {"memspace": server, "floor": floor}
            requests: dict[str, Callable[[pb_grpc.MemoryServiceAsyncStub], Awaitable[object]]] = {
                "recall": lambda stub: stub.Recall(recall),
                "remember": lambda stub: stub.Remember(remember),
            }
            for kind in calls:
                taken: dict[str, list[Round]] = {side: [] for side in processes}
                sampled = {side: Samples(OWN_CODE[side]) for side in processes}
                for _ in range(rounds):
                    for side, process in processes.items():
                        call = functools.partial(requests[kind], stubs[side])
                        await asyncio.sleep(grpc_bench.ALONE_S)
                        taken[side].append(await profiled(process, call, seconds, sampled[side]))
                for side in processes:
                    found[f"{kind} {side}"] = summary(taken[side], sampled[side], top)
    return found


FANOUT_BATCH = 100
QUIET_PACE_S = 0.005


async def fanout(
    seconds: float, root: Path, subscribers: int = 1000, top: int = 15
) -> dict[str, object]:
    """The gRPC suite's fan-out on one `memspace serve`: `subscribers` Subscribe streams on
    space "busy" in another process (`grpc_bench.fanout_main`, which writes a batch of 100 to
    that space every 0.2 s) and a Remember to space "quiet" every 5 ms, while py-spy samples
    the server for `seconds`. Shares of a core: the server's and its loop thread's CPU (from
    /proc), the loop thread's sampled busy time split as for a call, the other threads', the
    subscribers' process's CPU; the events a second the subscribers took over their run."""
    server = grpc_bench.memspace_serve(root / "fanout", root / "fanout.log")
    with grpc_bench.running(server):
        async with grpc.aio.insecure_channel(server.address) as channel:
            admin = pb_grpc.SpaceServiceStub(channel)
            for name in ("busy", "quiet"):
                await admin.CreateSpace(pb.CreateSpaceRequest(space=name, embedding_dim=64))
            stub = pb_grpc.MemoryServiceStub(channel)
            quiet = pb.RememberRequest(
                space="quiet", memory=pb.Memory(content="q", embedding=[0.25] * 64)
            )
            run_s = seconds + 2.0
            command = [sys.executable, "-m", "benchmarks.grpc_bench", "subscribers"]
            command += [server.address, str(subscribers), str(run_s), str(FANOUT_BATCH)]
            fans = grpc_bench.Process(command, root / "subscribers.out")
            stop = False
            caller: asyncio.Future[None] | None = None

            async def calling() -> None:
                while not stop:
                    await stub.Remember(quiet)
                    await asyncio.sleep(QUIET_PACE_S)

            samples = Samples(OWN_CODE["memspace"])
            try:
                await grpc_bench.printed(fans, "subscribed")
                caller = asyncio.ensure_future(calling())
                await asyncio.sleep(0.5)  # the batches under way
                pid = server.popen.pid
                before = (time.perf_counter(), server.cpu_s(), server.cpu_s(pid), fans.cpu_s())
                await record(pid, seconds, samples)
                after = (time.perf_counter(), server.cpu_s(), server.cpu_s(pid), fans.cpu_s())
                stop = True
                await caller
                while fans.popen.poll() is None:  # noqa: ASYNC110  # another process
                    await asyncio.sleep(0.1)
            finally:
                stop = True
                if caller is not None:
                    await asyncio.gather(caller, return_exceptions=True)
                fans.stop()
    counts = grpc_bench.last_json(fans)
    wall = after[0] - before[0]
    taken = SAMPLES_PER_S * wall

    def share(count: int) -> float:
        return round(count / taken, 3)

    return {
        "subscribers": subscribers,
        "events_per_s": round(counts.get("events", 0) / run_s),
        "batches": counts.get("batches", 0),
        "server_cores": round((after[1] - before[1]) / wall, 3),
        "loop_thread_cores": round((after[2] - before[2]) / wall, 3),
        "subscribers_cores": round((after[3] - before[3]) / wall, 3),
        "loop_thread_busy": {kind: share(samples.loop[kind]) for kind in (LOOP, OWN)},
        "other_threads_busy": {name: share(n) for name, n in samples.threads.most_common()},
        "own_functions": {name: share(n) for name, n in samples.functions.most_common(top)},
    }


def fanout_table(found: dict[str, object]) -> str:
    """`fanout`'s figures, shares of a core."""
    lines = [
        f"fan-out to {found['subscribers']} subscribers: {found['events_per_s']} events/s "
        f"({found['batches']} batches); cores: server {found['server_cores']} (loop thread "
        f"{found['loop_thread_cores']}), subscribers' process {found['subscribers_cores']}"
    ]
    for label, key in (
        ("loop thread busy", "loop_thread_busy"),
        ("other threads", "other_threads_busy"),
    ):
        parts = found[key]
        assert isinstance(parts, dict)
        lines.append(f"  {label}: " + ", ".join(f"{n} {v}" for n, v in parts.items()))
    functions = found["own_functions"]
    assert isinstance(functions, dict)
    lines.extend(f"    {value:7.3f}  {name}" for name, value in functions.items())
    return "\n".join(lines)


def table(found: dict[str, dict[str, object]]) -> str:
    lines = []
    for name, side in found.items():
        lines.append(
            f"{name}: {side['calls_per_s']} calls/s sampled; per call: CPU "
            f"{side['cpu_us_per_call']} µs (loop thread {side['loop_thread_cpu_us_per_call']})"
        )
        split = side["loop_thread"]
        assert isinstance(split, dict)
        lines.append(
            f"  loop thread busy {side['loop_thread_busy_us_per_call']} µs: "
            + ", ".join(f"{kind} {value}" for kind, value in split.items())
        )
        others = side["other_threads_busy_us_per_call"]
        assert isinstance(others, dict)
        lines.append("  other threads busy: " + ", ".join(f"{n} {v}" for n, v in others.items()))
        functions = side["own_functions_us_per_call"]
        assert isinstance(functions, dict)
        for function, value in functions.items():
            lines.append(f"    {value:7.1f}  {function}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--call", choices=(*CALLS, "fanout"), action="append")
    parser.add_argument("--subscribers", type=int, default=1000, help="for --call fanout")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    limit_blas_threads()
    load = os.getloadavg()[0]
    calls = tuple(c for c in args.call or CALLS if c != "fanout")
    found: dict[str, dict[str, object]] = {}
    fanned: dict[str, object] | None = None
    with tempfile.TemporaryDirectory(prefix="memspace-grpc-profile-") as tmp:
        if calls:
            found = asyncio.run(profile(calls, args.rounds, args.seconds, Path(tmp), args.top))
        if "fanout" in (args.call or ()):
            fanned = asyncio.run(fanout(args.seconds, Path(tmp), args.subscribers, args.top))
    if args.json:
        print(json.dumps({**found, **({"fanout": fanned} if fanned else {})}, indent=2))
        return
    print(f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")
    if found:
        print(table(found))
    if fanned:
        print(fanout_table(fanned))


if __name__ == "__main__":
    main()
