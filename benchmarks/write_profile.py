"""Where a durable RememberBatch's time goes: the storage suite's remember figure (8 writers of
100 memories of 768 floats), the engine beside the write floor (`write_floor`), in rounds that
alternate them, each on a fresh directory after `os.sync`, as `storage_bench` runs them.

Per call (a batch of 100), medians over the rounds:
- the CPU time of each thread of the process (`time.pthread_getcpuclockid`): the event loop,
  the log's writer, the thread that faults in the hot tier's pages ahead;
- the thread time of the steps of a write, each timed by wrapping its function for the run:
  on the loop, the validation into columns, the WAL's queue, the hot tier's append and the
  keyword index (the rest of the loop's time is the lock, the events, the futures and the task
  switches); on the writer, the frame's encoding and CRC, the writev and the fdatasync (with
  their wall time: a thread that waits for the interpreter or the disk takes longer than its
  CPU time).

    python -m benchmarks.write_profile [--rounds N] [--seconds S] [--json]

A profile, not a figure of `make bench`: wrapping the steps costs a few microseconds a call.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks import storage_bench
from memspace_server.storage import hot, keywords, settings, validating, wal

WRITERS = 8
PER_CALL = 100
SIDES = ("engine", "floor")
STEPS: tuple[tuple[Any, str, str], ...] = (
    (validating, "validate", "loop: validation into columns"),
    (wal.Wal, "append", "loop: the WAL's queue"),
    (hot.HotTier, "add", "loop: the hot tier's append"),
    (keywords.KeywordIndex, "add", "loop: the keyword index"),
    (wal.Wal, "_frames", "writer: the frame, encoded and CRC'd"),
    (os, "writev", "writer: writev"),
    (os, "fdatasync", "writer: fdatasync"),
)
THREADS = {
    "MainThread": "loop",
    "memspace-wal": "writer",
    "group-commit": "writer",
    "memspace-pages": "pages ahead",
}


class _Steps:
    """Thread time and wall time spent in each wrapped function, while `wrapped`."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = collections.defaultdict(float)
        self.wall: dict[str, float] = collections.defaultdict(float)

    def _wrap(self, function: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.cpu[label] += time.thread_time() - cpu
                self.wall[label] += time.perf_counter() - wall

        return timed

    @contextlib.contextmanager
    def wrapped(self) -> Iterator[None]:
        originals = [(owner, name, getattr(owner, name)) for owner, name, _label in STEPS]
        try:
            for (owner, name, label), (_o, _n, function) in zip(STEPS, originals, strict=True):
                setattr(owner, name, self._wrap(function, label))
            yield
        finally:
            for owner, name, function in originals:
                setattr(owner, name, function)


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each Python thread so far, by role (`THREADS`; others by name)."""
    found: dict[str, float] = collections.defaultdict(float)
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        try:
            clock = time.pthread_getcpuclockid(thread.ident)
            seconds = time.clock_gettime(clock)
        except OSError:  # ended meanwhile
            continue
        base = thread.name.split("_")[0]
        found[THREADS.get(base, base)] += seconds
    return found


async def _side(side: str, directory: Path, seconds: float) -> dict[str, float]:
    """One run of a side: its rate, records per fsync, and µs per call of each thread and
    step (threads that ended during the run are not counted: the pools outlive it)."""
    steps = _Steps()
    figures: dict[str, float] = {}
    calls = 0

    async def counted(
        remember_many: storage_bench.RememberMany, writers: int, per_call: int, seconds: float
    ) -> float:
        nonlocal calls
        before = thread_cpu()
        start = time.perf_counter()
        rate = await storage_bench._drive(remember_many, writers, per_call, seconds)
        calls = round(rate * (time.perf_counter() - start) / per_call)
        after = thread_cpu()
        for role, spent in after.items():
            figures[f"thread {role}"] = spent - before.get(role, 0.0)
        return rate

    with steps.wrapped():
        if side == "engine":
            engine = settings.EngineSettings(consolidate_wal_bytes=1 << 40)
            rate, batch = await storage_bench._engine_rate(
                directory, engine, "remember", WRITERS, PER_CALL, seconds, counted
            )
        else:
            rate, batch = await storage_bench._floor_rate(
                directory, WRITERS, PER_CALL, seconds, counted
            )
    per_call = {key: value * 1e6 / max(1, calls) for key, value in figures.items()}
    for label, spent in steps.cpu.items():
        per_call[f"{label} (cpu)"] = spent * 1e6 / max(1, calls)
        per_call[f"{label} (wall)"] = steps.wall[label] * 1e6 / max(1, calls)
    return {"memories_per_s": rate, "records_per_fsync": batch, **per_call}


async def profile(rounds: int, seconds: float, root: Path) -> dict[str, dict[str, float]]:
    """The median of each figure of each side over `rounds` rounds."""
    found: dict[str, dict[str, list[float]]] = {side: {} for side in SIDES}
    for turn in range(rounds):
        for side in SIDES[turn % 2 :] + SIDES[: turn % 2]:
            os.sync()
            directory = root / f"{side}-{turn}"
            directory.mkdir()
            try:
                figures = await _side(side, directory, seconds)
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            for key, value in figures.items():
                found[side].setdefault(key, []).append(value)
    return {
        side: {key: round(statistics.median(values), 1) for key, values in figures.items()}
        for side, figures in found.items()
    }


def table(medians: dict[str, dict[str, float]]) -> str:
    keys = sorted({key for figures in medians.values() for key in figures})
    width = max(len(key) for key in keys)
    lines = [f"{'per call of 100 memories (µs)':{width}}  {'engine':>10}  {'floor':>10}"]
    for key in keys:
        cells = [medians[side].get(key) for side in SIDES]
        lines.append(
            f"{key:{width}}  "
            + "  ".join(f"{cell:>10,.1f}" if cell is not None else f"{'-':>10}" for cell in cells)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--json", action="store_true", help="print the medians as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(
        prefix="memspace-profile-", dir=os.environ.get("MEMSPACE_BENCH_DIR")
    ) as tmp:
        medians = asyncio.run(profile(args.rounds, args.seconds, Path(tmp)))
    load = os.getloadavg()
    if args.json:
        print(json.dumps({"load_average": load, **medians}, indent=2))
    else:
        print(table(medians))
        print(f"load average (1, 5, 15 min) after: {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
