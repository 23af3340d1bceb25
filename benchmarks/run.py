"""`make bench`: run every benchmark and write the figures to benchmarks/results.json."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

# As `memspace serve` does: one BLAS/OpenMP thread per scan (concurrent requests use the cores),
# for the server and its baselines (numpy, faiss) alike. Set before numpy is imported.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

RESULTS = Path(__file__).with_name("results.json")
BUSY_LOAD = 1.5
"""A suite that starts with the 1-minute load average above this is marked busy: its figures
are not the machine's (ratios flatter or worse)."""
SETTLE_S = 180.0
"""The longest a suite waits for the load average to fall to BUSY_LOAD before it starts: the
suite before it leaves the 1-minute average high for a while after it ends (from 2.5 it takes
about half a minute to reach 1.5), and a suite started at once would be marked busy for its
neighbour's load, not the machine's."""
SETTLE_POLL_S = 2.0
BUSY_STEAL = 5.0
"""A suite during which the host took more than this share (%) of the virtual machine's CPU time
(steal) is marked `host_busy`: the load average does not show it, and the machine ran slower."""
SUITES = (
    "benchmarks.storage_bench",
    "benchmarks.ann_bench",
    "benchmarks.keyword_bench",
    "benchmarks.grpc_bench",
    "benchmarks.http_bench",
    "benchmarks.reliability_bench",
    "benchmarks.limits_bench",
    "benchmarks.operator_bench",
    "benchmarks.backup_bench",
    "benchmarks.offload_bench",
    "benchmarks.shard_churn_bench",
    "benchmarks.embedding_bench",
)


def cpu_ticks(stat: str | None = None) -> tuple[int, int]:
    """(every tick, stolen ticks) of all CPUs so far, from /proc/stat (or its text `stat`);
    (0, 0) where there is none."""
    if stat is None:
        try:
            stat = Path("/proc/stat").read_text()
        except OSError:
            return 0, 0
    fields = stat.split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu":
        return 0, 0
    # user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    ticks = [int(f) for f in fields[1:9]]
    return sum(ticks), ticks[7] if len(ticks) > 7 else 0


def steal_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share (%) of CPU time the host took between two `cpu_ticks`."""
    total = after[0] - before[0]
    return 100.0 * (after[1] - before[1]) / total if total > 0 else 0.0


def settle(
    limit_s: float = SETTLE_S,
    load: Callable[[], float] = lambda: os.getloadavg()[0],
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> float:
    """Wait until the 1-minute load average is at most BUSY_LOAD, or for `limit_s`; return
    the load found last."""
    deadline = clock() + limit_s
    found = load()
    while found > BUSY_LOAD and clock() < deadline:
        sleep(SETTLE_POLL_S)
        found = load()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", choices=[s.rsplit(".", 1)[1] for s in SUITES], action="append")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    results: dict[str, object] = {}
    if args.output.exists() and args.only:
        results.update(json.loads(args.output.read_text()))
    for suite in SUITES:
        name = suite.rsplit(".", 1)[1]
        if args.only and name not in args.only:
            continue
        try:
            module = importlib.import_module(suite)
        except ModuleNotFoundError as err:
            print(f"skipping {name}: {err}", file=sys.stderr)
            continue
        waited = time.perf_counter()
        load_before = settle(0.0 if args.quick else SETTLE_S)
        waited = time.perf_counter() - waited
        start = time.perf_counter()
        busy = load_before > BUSY_LOAD
        settled = f", after {waited:.0f} s for it to settle" if waited >= 1 else ""
        print(f"== {name} (load {load_before:.2f}{settled}{', BUSY' if busy else ''})", flush=True)
        ticks_before = cpu_ticks()
        module.run(results, quick=args.quick)
        load_after = os.getloadavg()[0]
        stolen = steal_pct(ticks_before, cpu_ticks())
        results[f"load_{name}"] = {
            "before": round(load_before, 2),
            "after": round(load_after, 2),
            "busy": busy,
            "steal_pct": round(stolen, 1),
            "host_busy": stolen > BUSY_STEAL,
            "settled_s": round(waited),
        }
        host = f"the host took {stolen:.1f}% of the CPU time"
        print(
            f"   {name} took {time.perf_counter() - start:.0f} s (load {load_after:.2f} after; "
            f"{host}{', HOST BUSY' if stolen > BUSY_STEAL else ''})",
            flush=True,
        )
    results["quick"] = args.quick
    results["blas_threads"] = os.environ["OPENBLAS_NUM_THREADS"]
    args.output.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    width = max(len(k) for k in results)
    for key, value in sorted(results.items()):
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
