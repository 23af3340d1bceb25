"""What the engine's write rate owes to the work it does beyond the write floor (`write_floor`):
the storage suite's remember figure (8 writers of 100 memories of 768 floats) on the engine as
it is, on the engine with parts of that work switched off, and on the floor, in rounds that
alternate them, each on a fresh directory after `os.sync`, as `storage_bench` runs them.

Sides, each switching off more:
- `engine`: the engine as it is;
- `rows and ids`: its hot tier keeps only what the floor keeps, the embedding rows and the id
  index (no norms, confidences, times, recall counts, texts, tags, unsaved flags);
- `bare`: that, no keyword index queue either, and the validation the floor's (the
  embeddings, their norms, confidences, texts; no times, tags or given ids);
- `floor`: the write floor.

What is left between `bare` and the floor is the engine's structure: the space's lock, the
events for Subscribe, the WAL's queue and segments, the frame encoded on the writer thread.

    python -m benchmarks.write_ablation [--rounds N] [--seconds S] [--json]

A profile, not a figure of `make bench`: the switched-off engines do not keep what a store
must (a recall of them would fail), and are put back as they were after each side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import storage_bench, write_floor
from memspace_server.storage import hot, keywords, memories, settings, tiers, validating

WRITERS = 8
PER_CALL = 100
SIDES = ("engine", "rows and ids", "bare", "floor")


def _rows_and_ids(tier: hot.HotTier, batch: tiers.Columns, checked: bool = False) -> None:
    """`HotTier.add` keeping only what the floor keeps: the rows, and each id's row."""
    start = len(tier)
    end = start + len(batch)
    tier._grow(end)
    tier._emb.write(start, batch.embeddings)
    tier._row.update(zip(batch.ids, range(start, end), strict=True))
    tier._n = end


def _floor_checks(drafts: Sequence[memories.Draft], dim: int, now: float) -> tiers.Columns:
    """`validating.validate` with only the floor's checks (`write_floor.checked`)."""
    count = len(drafts)
    matrix = np.array([d.embedding for d in drafts], np.float32)
    confidence, contents, _text = write_floor.checked(drafts, matrix, dim)
    return tiers.Columns(
        ids=validating.fresh_ids(count),
        contents=contents,
        embeddings=matrix,
        confidence=confidence,
        tags=[{}] * count,
        created_at=np.full(count, now),
        last_recalled_at=np.zeros(count, np.float64),
        recall_count=np.zeros(count, np.uint64),
    )


def _ignore(*_args: Any, **_kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def switched_off(side: str) -> Iterator[None]:
    """The engine with the work of `side` switched off, put back as it was afterwards."""
    patches: list[tuple[Any, str, Any]] = []
    if side in ("rows and ids", "bare"):
        patches.append((hot.HotTier, "add", _rows_and_ids))
    if side == "bare":
        patches.append((keywords.KeywordIndex, "add", _ignore))
        patches.append((validating, "validate", _floor_checks))
    originals = [(owner, name, getattr(owner, name)) for owner, name, _new in patches]
    try:
        for owner, name, new in patches:
            setattr(owner, name, new)
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


async def _rate(side: str, directory: Path, seconds: float) -> float:
    if side == "floor":
        rate, _batch = await storage_bench._floor_rate(directory, WRITERS, PER_CALL, seconds)
        return rate
    engine = settings.EngineSettings(consolidate_wal_bytes=1 << 40)
    with switched_off(side):
        rate, _batch = await storage_bench._engine_rate(
            directory, engine, "remember", WRITERS, PER_CALL, seconds
        )
    return rate


async def ablation(rounds: int, seconds: float, root: Path) -> dict[str, dict[str, float]]:
    """Each side's median rate (memories/s) over `rounds`, and its ratio to the floor's."""
    found: dict[str, list[float]] = {side: [] for side in SIDES}
    for turn in range(rounds):
        shift = turn % len(SIDES)
        for side in SIDES[shift:] + SIDES[:shift]:
            os.sync()
            directory = root / f"{side.replace(' ', '-')}-{turn}"
            directory.mkdir()
            try:
                found[side].append(await _rate(side, directory, seconds))
            finally:
                shutil.rmtree(directory, ignore_errors=True)
    floor = statistics.median(found["floor"])
    return {
        side: {
            "memories_per_s": round(statistics.median(rates)),
            "vs_floor": round(statistics.median(rates) / floor, 3),
            "rounds_low": round(min(rates)),
            "rounds_high": round(max(rates)),
        }
        for side, rates in found.items()
    }


def table(medians: dict[str, dict[str, float]]) -> str:
    lines = [f"{'side':14}  {'memories/s':>10}  {'vs floor':>8}  {'rounds':>17}"]
    for side, figures in medians.items():
        spread = f"{figures['rounds_low']:,.0f}-{figures['rounds_high']:,.0f}"
        lines.append(
            f"{side:14}  {figures['memories_per_s']:>10,.0f}  {figures['vs_floor']:>8.3f}"
            f"  {spread:>17}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", action="store_true", help="print the medians as JSON")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(
        prefix="memspace-ablation-", dir=os.environ.get("MEMSPACE_BENCH_DIR")
    ) as tmp:
        medians = asyncio.run(ablation(args.rounds, args.seconds, Path(tmp)))
    if args.json:
        print(json.dumps({"load_average_before": load, **medians}, indent=2))
    else:
        print(table(medians))
        print(f"load average (1, 5, 15 min) before: {load}, after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
