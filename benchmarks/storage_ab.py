"""Side-by-side storage figures of several checkouts' engines, in one run with rounds
interleaved: each round runs `storage_bench`'s recall figures (hot, warm, cold from the chunk
cache, each against faiss in the same process) and its remember figures (batches and single
writes against a raw append+fdatasync) once per checkout, in a process of its own whose
`memspace_server` is that checkout's. On a shared machine only ratios within one run mean
anything.

    python -m benchmarks.storage_ab [--rounds N] [--rows N] [--part recall|remember] VARIANT...

A VARIANT is NAME=[CHECKOUT] (as in `benchmarks.grpc_ab`; flags do not apply). Nothing is
written to results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import grpc_ab

REPO = Path(__file__).resolve().parents[1]
PARTS = ("recall", "remember")
KEYS = {
    "recall": (
        "faiss_flat_100k_ms",
        "recall_hot_vs_faiss",
        "recall_warm_vs_faiss",
        "recall_cold_cached_vs_faiss",
        "wal_replay_vs_read",
    ),
    "remember": (
        "remember_per_s",
        "remember_records_per_fsync",
        "remember_vs_raw",
        "remember_single_per_s",
        "remember_single_records_per_fsync",
        "remember_single_vs_raw",
    ),
}


async def measure(part: str, rows: int, seconds: float) -> dict[str, object]:
    """One part's figures with the `memspace_server` this process imports."""
    import numpy as np  # noqa: PLC0415 - after the environment is set

    from benchmarks import storage_bench  # noqa: PLC0415
    from memspace_contract import index, spaces  # noqa: PLC0415
    from memspace_server.storage import registry, settings  # noqa: PLC0415

    results: dict[str, object] = {}
    figures: dict[str, float] = {}
    dim = storage_bench.DIM
    with tempfile.TemporaryDirectory(prefix="memspace-storage-ab-") as tmp:
        root = Path(tmp)
        big = settings.EngineSettings(consolidate_wal_bytes=1 << 40)
        if part == "recall":
            rng = np.random.default_rng(0)
            matrix = rng.normal(size=(rows, dim)).astype(np.float32)
            cues = rng.normal(size=(10, dim)).astype(np.float32)
            search = storage_bench._baselines(matrix, cues, figures)
            reg = registry.standalone(
                root / "recall",
                dataclasses.replace(big, cold_cache_bytes=storage_bench.COLD_CACHE_BYTES),
            )
            try:
                space_id = spaces.SpaceId("bench")
                await reg.create(space_id, dim, tiers_config=index.Tiers(hot_capacity=rows * 2))
                await storage_bench._recall_figures(
                    reg, space_id, matrix, cues, figures, results, search
                )
            finally:
                await reg.close()
            for tier in ("hot", "warm", "cold_cached"):
                figures[f"recall_{tier}_vs_faiss"] = (
                    figures[f"recall_{tier}_100k_ms"] / figures[f"faiss_beside_{tier}_ms"]
                )
        else:
            for label, writers, per_call in (("remember", 8, 100), ("remember_single", 64, 1)):
                reg = registry.standalone(root / label, big)
                try:
                    space_id = spaces.SpaceId(label.replace("_", "-"))
                    await reg.create(space_id, dim, tiers_config=index.Tiers(hot_capacity=10**7))
                    rate, batch = await storage_bench._remember_rate(
                        reg, space_id, writers, per_call, seconds
                    )
                finally:
                    await reg.close()
                raw = storage_bench._raw_group_commit_rate(root, writers * per_call, seconds)
                results[f"{label}_per_s"] = rate
                results[f"{label}_records_per_fsync"] = batch
                results[f"{label}_vs_raw"] = rate / raw
    results.update(figures)
    return results


def run_one(
    variant: grpc_ab.Variant, part: str, rows: int, seconds: float, switch_ms: float | None
) -> dict[str, object]:
    env = dict(os.environ)
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, "1")
    if variant.checkout:
        parts = ("server", "contract", "cli", "operator")
        env["PYTHONPATH"] = ":".join(f"{variant.checkout}/{p}" for p in parts)
    command = [sys.executable, "-m", "benchmarks.storage_ab", "--child", part]
    command += ["--rows", str(rows), "--seconds", str(seconds)]
    if switch_ms:
        command += ["--switch-ms", str(switch_ms)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{variant.name} {part} failed:\n{done.stderr[-3000:]}")
    found: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def compare(
    variants: list[grpc_ab.Variant],
    parts: list[str],
    rounds: int,
    rows: int,
    seconds: float,
    switch_ms: float | None = None,
) -> None:
    found: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    load_before = os.getloadavg()
    for number in range(rounds):
        for part in parts:
            for variant in variants if number % 2 == 0 else variants[::-1]:
                results = run_one(variant, part, rows, seconds, switch_ms)
                for key in KEYS[part]:
                    value = results.get(key)
                    if isinstance(value, int | float):
                        found[(key, variant.name)].append(float(value))
                print(
                    f"round {number + 1} {part} {variant.name}: "
                    + ", ".join(f"{key} {results.get(key)}" for key in KEYS[part])
                    + f" (load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    keys = [key for part in parts for key in KEYS[part]]
    grpc_ab.print_ratios(found, keys, [v.name for v in variants], width=36)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", type=grpc_ab.Variant.parse, metavar="VARIANT")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every variant")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the recall figures")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one remember run")
    parser.add_argument("--part", choices=PARTS, action="append")
    parser.add_argument(
        "--switch-ms", type=float, help="the interpreter's switch interval (a server sets 0.5)"
    )
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.switch_ms:
            sys.setswitchinterval(args.switch_ms / 1000)
        found = asyncio.run(measure(args.child, args.rows, args.seconds))
        print(json.dumps(found, default=str))
        return
    parts = args.part or list(PARTS)
    compare(args.variants, parts, args.rounds, args.rows, args.seconds, args.switch_ms)


if __name__ == "__main__":
    main()
