"""Checkpoints of a space (in `hot/`): what lets recovery skip the WAL it has consolidated.

A checkpoint is a manifest, `checkpoint.json`, replaced atomically, naming:
- hot runs: append-only files of memories that entered the hot tier, each written once;
- the hot index: which run holds each live hot memory, with its recall statistics;
- per Zarr tier: its generation, committed rows and a state file (tombstones, recall statistics).
A checkpoint writes only the memories that arrived since the previous one; runs are rewritten
into one when most of their rows are dead. Files the manifest no longer names are deleted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from numpy.lib import format as npy

from memspace_contract import durable
from memspace_server import errors
from memspace_server.storage import hot as hot_tier
from memspace_server.storage import tiers, zarr_tiers

MANIFEST = "checkpoint.json"
AHEAD_MIN_ROWS = 4096
"""New memories in the hot tier from which a consolidation writes their run before it takes the
space's write lock (`Space.consolidate`); fewer are written under it, with the checkpoint."""
RUN_CHUNK_ROWS = 4096
"""Rows of embeddings a run's writer gathers at a time (12 MiB of 768 floats)."""
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class TierRef:
    generation: int = 1
    rows: int = 0
    state: str | None = None


@dataclasses.dataclass(frozen=True)
class Ahead:
    """A run written before the checkpoint that names it, and the memories it holds."""

    run: str
    memory_ids: list[str]


@dataclasses.dataclass(frozen=True)
class Manifest:
    seq: int = 0
    lsn: int = 0
    runs: tuple[str, ...] = ()
    index: str | None = None
    warm: TierRef = TierRef()
    cold: TierRef = TierRef()
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    """Live memories per tier when the checkpoint was written."""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "seq": self.seq,
            "lsn": self.lsn,
            "hot": {"runs": list(self.runs), "index": self.index},
            "warm": dataclasses.asdict(self.warm),
            "cold": dataclasses.asdict(self.cold),
            "counts": self.counts,
        }


def _save(path: Path, arrays: dict[str, npt.NDArray[Any]]) -> None:
    """`arrays` into a new file at `path`, flushed; written as numpy makes it (a buffer of the
    whole first would copy a run of hundreds of megabytes into fresh memory once more)."""
    with path.open("wb") as file:
        np.savez(file, allow_pickle=False, **arrays)
        file.flush()
        os.fsync(file.fileno())


def _load(path: Path) -> dict[str, npt.NDArray[Any]]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _joined(arrays: list[npt.NDArray[Any]], dtype: type[np.generic]) -> npt.NDArray[Any]:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)


def _json_array(value: Any) -> npt.NDArray[np.uint8]:
    return np.frombuffer(json.dumps(value, separators=(",", ":")).encode(), np.uint8)


def _from_json_array(array: npt.NDArray[Any]) -> Any:
    return json.loads(array.tobytes().decode())


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    if not path.exists():
        return Manifest()
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT:
            raise errors.SpaceRefusedError(
                f"checkpoint format {doc.get('format')} is not supported (expected {FORMAT})"
            )
        return Manifest(
            seq=int(doc["seq"]),
            lsn=int(doc["lsn"]),
            runs=tuple(doc["hot"]["runs"]),
            index=doc["hot"]["index"],
            warm=TierRef(**doc["warm"]),
            cold=TierRef(**doc["cold"]),
            counts={str(k): int(v) for k, v in doc.get("counts", {}).items()},
        )
    except (ValueError, KeyError, TypeError) as err:
        raise errors.SpaceRefusedError(f"checkpoint manifest {path} is unreadable: {err}") from err


class Checkpointer:
    """Reads and writes the checkpoints of one space. Blocking: call from a worker thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.manifest = read_manifest(directory)
        self._run_of: dict[str, str] = {}
        self._run_rows: dict[str, int] = {}

    def state(self, ref: TierRef) -> dict[str, npt.NDArray[Any]] | None:
        return _load(self.directory / ref.state) if ref.state else None

    def restore_hot(self, dim: int) -> hot_tier.HotTier:
        """The hot tier as of the checkpoint (a missing file is a refused space, never a loss)."""
        hot = hot_tier.HotTier(dim)
        manifest = self.manifest
        if manifest.index is None:
            return hot
        try:
            index = _load(self.directory / manifest.index)
            ids: list[str] = _from_json_array(index["ids"])
            runs: list[str] = _from_json_array(index["runs"])
            stats = {
                i: (float(r), int(c))
                for i, r, c in zip(ids, index["recalled"], index["count"], strict=True)
            }
            self._run_of = dict(zip(ids, runs, strict=True))
            for run in manifest.runs:
                data = _load(self.directory / run)
                meta = _from_json_array(data["meta"])
                self._run_rows[run] = len(meta["ids"])
                keep = [
                    i
                    for i, memory_id in enumerate(meta["ids"])
                    if self._run_of.get(memory_id) == run
                ]
                if not keep:
                    continue
                batch = tiers.Columns(
                    ids=[meta["ids"][i] for i in keep],
                    contents=[meta["contents"][i] for i in keep],
                    embeddings=data["embeddings"][keep],
                    confidence=data["confidence"][keep],
                    tags=[meta["tags"][i] for i in keep],
                    created_at=data["created_at"][keep],
                    last_recalled_at=np.array([stats[meta["ids"][i]][0] for i in keep]),
                    recall_count=np.array([stats[meta["ids"][i]][1] for i in keep], np.uint64),
                )
                hot.add(batch)
        except (OSError, KeyError, ValueError) as err:
            raise errors.SpaceRefusedError(
                f"the hot checkpoint in {self.directory} is damaged ({err}); the WAL it replaced "
                "is gone, so the space is refused rather than served with memories missing"
            ) from err
        hot.mark_saved()
        return hot

    def ahead_of_checkpoint(self, hot: hot_tier.HotTier) -> list[str] | None:
        """The new memories of the hot tier a checkpoint now would write as a run of its own,
        if there are enough to be worth writing before it (`write_run_ahead`), else None."""
        fresh = hot.unsaved_ids()
        if len(fresh) < AHEAD_MIN_ROWS or self._rewrites_runs(len(fresh), len(hot)):
            return None
        return fresh

    def _rewrites_runs(self, fresh: int, live: int) -> bool:
        """Whether a checkpoint of `fresh` new memories, `live` in all, writes every live one
        into one new run instead (most rows of the present runs dead), not only the new."""
        runs_total = sum(self._run_rows.get(r, 0) for r in set(self._run_of.values()))
        return runs_total + fresh > 2 * live + 4096

    def write_run_ahead(
        self, hot: hot_tier.HotTier, memory_ids: list[str], rows: npt.NDArray[np.int64]
    ) -> Ahead:
        """Blocking: write the run of the given hot memories (at `rows`, which must not move
        meanwhile) for the next checkpoint to name (`write(ahead=...)`), while the space goes
        on serving. Until a checkpoint names it, the file is a leftover it sweeps."""
        name = f"run-{self.manifest.seq + 1:08d}-ahead.npz"
        self._write_run(name, hot, memory_ids, rows)
        return Ahead(name, memory_ids)

    def write(
        self,
        lsn: int,
        hot: hot_tier.HotTier,
        warm: zarr_tiers.ZarrTier,
        cold: zarr_tiers.ZarrTier,
        ahead: Ahead | None = None,
    ) -> Manifest:
        """Write a checkpoint of the current state as of `lsn` and make it the current one.
        `ahead`: a run written before (`write_run_ahead`) of memories still in the hot tier as
        they were written there (none removed since, not even to be written again)."""
        seq = self.manifest.seq + 1
        live = list(hot.ids())
        fresh = hot.unsaved_ids()
        saved: list[str] = []
        if ahead is not None:
            self._run_rows[ahead.run] = len(ahead.memory_ids)
            for memory_id in ahead.memory_ids:
                self._run_of[memory_id] = ahead.run
            written = set(ahead.memory_ids)
            saved = ahead.memory_ids
            fresh = [memory_id for memory_id in fresh if memory_id not in written]
        if self._rewrites_runs(len(fresh), len(live)):
            fresh = live
        if fresh:
            run = f"run-{seq:08d}.npz"
            self._write_run(run, hot, fresh, hot.rows_of(fresh))
            self._run_rows[run] = len(fresh)
            for memory_id in fresh:
                self._run_of[memory_id] = run
        self._run_of = {i: self._run_of[i] for i in live}
        index = f"hot-index-{seq:08d}.npz"
        recalled, count = hot.recall_stats()  # in the order of `ids()`
        _save(
            self.directory / index,
            {
                "ids": _json_array(live),
                "runs": _json_array([self._run_of[i] for i in live]),
                "recalled": recalled,
                "count": count,
            },
        )
        refs = {}
        for tier in (warm, cold):
            state = f"{tier.name}-state-{seq:08d}.npz"
            _save(self.directory / state, tier.state())
            refs[tier.name] = TierRef(generation=tier.generation, rows=tier.rows, state=state)
        manifest = Manifest(
            seq=seq,
            lsn=lsn,
            runs=tuple(sorted(set(self._run_of.values()))),
            index=index,
            warm=refs[tiers.WARM],
            cold=refs[tiers.COLD],
            counts={tiers.HOT: len(hot), tiers.WARM: len(warm), tiers.COLD: len(cold)},
        )
        durable.atomic_write(self.directory / MANIFEST, json.dumps(manifest.to_json(), indent=1))
        self.manifest = manifest
        hot.mark_saved(None if fresh is live else [*saved, *fresh])
        self._sweep()
        return manifest

    def _write_run(
        self,
        name: str,
        hot: hot_tier.HotTier,
        memory_ids: list[str],
        rows: npt.NDArray[np.int64],
    ) -> None:
        """A run of the given hot memories, an npz file like `_save`'s. Its embeddings go
        into the file RUN_CHUNK_ROWS rows at a time: gathered whole, a run of 80,000 memories
        of 768 floats took 250 MB of fresh memory, the costliest step of a consolidation (which
        holds the space's write lock)."""
        confidence: list[npt.NDArray[np.float32]] = []
        created: list[npt.NDArray[np.float64]] = []
        contents: list[str] = []
        tags: list[dict[str, str]] = []
        header = {
            "descr": npy.dtype_to_descr(np.dtype("<f4")),
            "fortran_order": False,
            "shape": (len(memory_ids), hot.dim),
        }
        with (self.directory / name).open("wb") as file:
            with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                with archive.open("embeddings.npy", "w", force_zip64=True) as entry:
                    npy.write_array_header_2_0(entry, header)
                    for start in range(0, len(memory_ids), RUN_CHUNK_ROWS):
                        part = hot.rows(rows[start : start + RUN_CHUNK_ROWS])
                        entry.write(np.ascontiguousarray(part.embeddings, "<f4").data)
                        confidence.append(part.confidence)
                        created.append(part.created_at)
                        contents += part.contents
                        tags += part.tags
                columns = {
                    "confidence": _joined(confidence, np.float32),
                    "created_at": _joined(created, np.float64),
                    "meta": _json_array({"ids": memory_ids, "contents": contents, "tags": tags}),
                }
                for key, array in columns.items():
                    with archive.open(f"{key}.npy", "w", force_zip64=True) as entry:
                        npy.write_array(entry, array, allow_pickle=False)
            file.flush()
            os.fsync(file.fileno())

    def _sweep(self) -> None:
        keep = {MANIFEST, *self.manifest.runs}
        keep.update(
            n
            for n in (self.manifest.index, self.manifest.warm.state, self.manifest.cold.state)
            if n
        )
        for path in self.directory.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)
        self._run_rows = {r: n for r, n in self._run_rows.items() if r in keep}
