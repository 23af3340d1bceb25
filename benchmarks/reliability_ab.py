"""Side-by-side reliability figures of several `memspace serve` variants (other checkouts, other
flags), in one run with rounds interleaved: the load of `reliability_bench` (calls/s, p50 and
p99), the quiet space's Recall p99 alone on a server that never saw a flood, and the noisy
neighbour figures (the quiet p99 alone between floods and its ratios beside them). Each round
starts a fresh server per variant. On a shared machine only ratios within one run mean anything.

    python -m benchmarks.reliability_ab [--rounds N] [--calls N] [--part PART] VARIANT...

A VARIANT is as in `benchmarks.grpc_ab`: NAME=[CHECKOUT][::FLAG ...]. Nothing is written to
results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import secrets
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc

from benchmarks import grpc_ab, grpc_bench, reliability_bench
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc

PARTS = ("load", "alone", "noisy")


@contextlib.contextmanager
def served_by(variant: grpc_ab.Variant) -> Iterator[None]:
    """The reliability bench's servers are `variant`'s while this lasts."""
    original = reliability_bench.start_server

    def serve(data: Path, log: Path, *extra: str) -> grpc_bench.Process:
        return variant.serve(data, log, *extra)

    reliability_bench.start_server = serve
    try:
        yield
    finally:
        reliability_bench.start_server = original


async def alone_figures(results: dict[str, object], work: Path, samples: int) -> None:
    """The quiet space's Recall p99 (ms) on a server with the noisy bench's two spaces seeded
    and no flood ever: three measurements, their median."""
    quiet = reliability_bench.Tenant("quiet", secrets.token_urlsafe(16))
    other = reliability_bench.Tenant("noisy", secrets.token_urlsafe(16))
    with reliability_bench.managed_server(work, "alone") as (process, index_dir):
        volumes = work / "alone-volumes"
        for tenant in (quiet, other):
            reliability_bench.put_entry(index_dir, volumes, tenant, 64)
        async with grpc.aio.insecure_channel(process.address) as channel:
            memories = pb_grpc.MemoryServiceStub(channel)
            for tenant in (quiet, other):
                await reliability_bench.until_served(memories, tenant)
                await reliability_bench.seed(
                    memories, tenant, 5000 if tenant is quiet else 20000, 64
                )
            await asyncio.sleep(1.0)
            found = [
                await reliability_bench.quiet_p99(memories, quiet, samples, 0.005) for _ in range(3)
            ]
    results["alone_p99_ms"] = statistics.median(found)


async def one(part: str, variant: grpc_ab.Variant, calls: int, samples: int) -> dict[str, object]:
    results: dict[str, object] = {}
    with (
        tempfile.TemporaryDirectory(prefix="memspace-reliability-ab-") as tmp,
        served_by(variant),
    ):
        work = Path(tmp)
        if part == "load":
            plan = reliability_bench.LoadPlan(calls=calls, seconds=120.0)
            await reliability_bench.load_figures(results, work, quick=True, plan=plan)
        elif part == "alone":
            await alone_figures(results, work, samples)
        else:
            await reliability_bench.noisy_figures(results, work, quick=True)
    return results


KEYS = {
    "load": ("load_rps", "load_p50_ms", "load_p99_ms", "load_errors"),
    "alone": ("alone_p99_ms",),
    "noisy": (
        "noisy_neighbour_quiet_p99_ms",
        "noisy_neighbour_p99_ratio",
        "noisy_neighbour_p99_ratio_no_quota",
        "noisy_neighbour_writes_p99_ratio",
        "noisy_neighbour_writes_p99_ratio_no_quota",
    ),
}


async def compare(
    variants: list[grpc_ab.Variant], parts: list[str], rounds: int, calls: int, samples: int
) -> None:
    found: dict[tuple[str, str, str], list[float]] = collections.defaultdict(list)
    load_before = os.getloadavg()
    for number in range(rounds):
        for part in parts:
            for variant in variants if number % 2 == 0 else variants[::-1]:
                results = await one(part, variant, calls, samples)
                for key in KEYS[part]:
                    value = results.get(key)
                    if isinstance(value, int | float):
                        found[(part, key, variant.name)].append(float(value))
                print(
                    f"round {number + 1} {part} {variant.name}: "
                    + ", ".join(f"{key} {results.get(key)}" for key in KEYS[part])
                    + f" (load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    by_part = {(f"{part}:{key}", name): values for (part, key, name), values in found.items()}
    keys = [f"{part}:{key}" for part in parts for key in KEYS[part]]
    grpc_ab.print_ratios(by_part, keys, [v.name for v in variants], width=52)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", type=grpc_ab.Variant.parse, metavar="VARIANT")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every variant")
    parser.add_argument("--calls", type=int, default=4000, help="calls of one load run")
    parser.add_argument("--samples", type=int, default=300, help="Recalls of one alone p99")
    parser.add_argument("--part", choices=PARTS, action="append")
    args = parser.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    asyncio.run(
        compare(args.variants, args.part or list(PARTS), args.rounds, args.calls, args.samples)
    )


if __name__ == "__main__":
    main()
