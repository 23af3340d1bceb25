"""`make bench`: run every benchmark and write the figures to benchmarks/results.json."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

# As `memspace serve` does: one BLAS/OpenMP thread per scan (concurrent requests use the cores),
# for the server and its baselines (numpy, faiss) alike. Set before numpy is imported.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

RESULTS = Path(__file__).with_name("results.json")
BUSY_LOAD = 1.5
"""A suite that starts with the 1-minute load average above this is marked busy: its figures
are not the machine's (ratios flatter or worse)."""
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
        start = time.perf_counter()
        load_before = os.getloadavg()[0]
        busy = load_before > BUSY_LOAD
        print(f"== {name} (load {load_before:.2f}{', BUSY' if busy else ''})", flush=True)
        module.run(results, quick=args.quick)
        load_after = os.getloadavg()[0]
        results[f"load_{name}"] = {
            "before": round(load_before, 2),
            "after": round(load_after, 2),
            "busy": busy,
        }
        print(
            f"   {name} took {time.perf_counter() - start:.0f} s (load {load_after:.2f} after)",
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
