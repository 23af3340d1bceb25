"""Backups to a local MinIO (built by `make k8s-tools`) against the library's plain transfers of
the same files, in one run:

- backup_vs_copy: a full backup of a 100k x 768 space vs uploading its files with obstore's
  plain put (same concurrency); >= 0.7 means the backup takes at most 1/0.7 of the copy's time.
- backup_incremental_bytes_ratio: bytes a second backup uploads after 1% new memories, over the
  backup's bytes (<= 0.05).
- restore_vs_copy: a verified restore vs downloading the same objects to files with obstore's
  plain get (>= 0.7).

`python -m benchmarks.run --only backup_bench` runs it alone (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from memspace_contract import durable, index, spaces
from memspace_server.storage import backups, memories, objects, registry, settings
from tests.support import minio

DIM = 768


async def _fill(reg: registry.Registry, space_id: spaces.SpaceId, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for start in range(0, rows, 2000):
        matrix = rng.normal(size=(min(2000, rows - start), DIM)).astype(np.float32)
        drafts = [
            memories.Draft(content=f"memory {start + i}", embedding=v) for i, v in enumerate(matrix)
        ]
        async with reg.lease(space_id) as space:
            await space.remember_many(drafts)
    async with reg.lease(space_id) as space:
        await space.consolidate()


def _files(root: Path) -> list[tuple[str, Path]]:
    return [
        (p.relative_to(root).as_posix(), p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    ]


async def _plain_upload(target: objects.Target, files: list[tuple[str, Path]]) -> None:
    """The baseline: each file read and put as it is, CONCURRENCY at a time."""
    loop = asyncio.get_running_loop()
    semaphore = asyncio.Semaphore(backups.CONCURRENCY)

    def read(path: Path) -> bytes | Path:
        return path.read_bytes() if path.stat().st_size <= backups.SMALL_FILE else path

    async def one(relative: str, path: Path) -> None:
        async with semaphore:
            data = await loop.run_in_executor(None, read, path)
            await target.put(f"copy/{relative}", data)

    await asyncio.gather(*(one(r, p) for r, p in files))


async def _plain_download(target: objects.Target, keys: list[str], into: Path) -> None:
    loop = asyncio.get_running_loop()
    semaphore = asyncio.Semaphore(backups.CONCURRENCY)

    async def one(number: int, key: str) -> None:
        async with semaphore:
            path = into / f"{number:06d}"
            with path.open("wb") as file:
                async for piece in target.stream(key):
                    await loop.run_in_executor(None, file.write, piece)
            await loop.run_in_executor(None, durable.fsync_file, path)

    await asyncio.gather(*(one(n, k) for n, k in enumerate(keys)))


async def _run(results: dict[str, object], quick: bool) -> None:
    rows = 10_000 if quick else 100_000
    with tempfile.TemporaryDirectory(
        prefix="memspace-bench-", dir=os.environ.get("MEMSPACE_BENCH_DIR")
    ) as tmp:
        root = Path(tmp)
        with minio.running(root / "minio", buckets=("backups", "copies")) as server:
            config = objects.TargetConfig(
                url=server.url("backups"),
                endpoint=server.endpoint,
                access_key_id=server.access_key,
                secret_access_key=server.secret_key,
            )
            target = objects.Target(config)
            plain = objects.Target(
                objects.TargetConfig(**{**config.__dict__, "url": server.url("copies")})
            )
            reg = registry.standalone(
                root / "data", settings.EngineSettings(consolidate_wal_bytes=1 << 40)
            )
            space_id = spaces.SpaceId("bench")
            try:
                await reg.create(
                    space_id,
                    DIM,
                    tiers_config=index.Tiers(hot_capacity=rows // 5, warm_capacity=rows * 10),
                )
                start = time.perf_counter()
                await _fill(reg, space_id, rows, 1)
                results["backup_fill_s"] = round(time.perf_counter() - start, 1)
                volume = reg.volume(space_id)
                async with reg.lease(space_id) as space:
                    async with space.frozen():
                        warm = _files(volume)
                        for _, path in warm:  # both sides read from the page cache
                            path.read_bytes()
                        # Both sides find MinIO and their connections warm.
                        await _plain_upload(target, warm[:32])
                        await _plain_upload(plain, warm[:32])
                    start = time.perf_counter()
                    first = await backups.create(space, target, reg.executor)
                    backup_s = time.perf_counter() - start
                    async with space.frozen():  # the same files, held still
                        files = [(f.path, volume / f.path) for f in first.files]
                        start = time.perf_counter()
                        await _plain_upload(plain, files)
                        copy_s = time.perf_counter() - start
                results["backup_rows"] = rows
                results["backup_bytes"] = first.bytes
                results["backup_s"] = round(backup_s, 2)
                results["backup_plain_upload_s"] = round(copy_s, 2)
                results["backup_vs_copy"] = round(copy_s / backup_s, 3)

                await _fill(reg, space_id, rows // 100, 2)
                async with reg.lease(space_id) as space:
                    second = await backups.create(space, target, reg.executor)
                results["backup_incremental_bytes_uploaded"] = second.bytes_uploaded
                results["backup_incremental_bytes_ratio"] = round(
                    second.bytes_uploaded / second.bytes, 4
                )
            finally:
                await reg.close()

            keys = sorted({backups.blob_key(space_id, f.sha256) for f in first.files})
            into = root / "download"
            into.mkdir()
            start = time.perf_counter()
            await _plain_download(target, keys, into)
            download_s = time.perf_counter() - start
            shutil.rmtree(into)
            start = time.perf_counter()
            await backups.restore(target, space_id, first.backup_id, root / "restored")
            restore_s = time.perf_counter() - start
            results["restore_s"] = round(restore_s, 2)
            results["restore_plain_download_s"] = round(download_s, 2)
            results["restore_vs_copy"] = round(download_s / restore_s, 3)


def run(results: dict[str, object], quick: bool = False) -> None:
    asyncio.run(_run(results, quick))
