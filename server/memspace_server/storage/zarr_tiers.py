"""The warm and cold tiers: append-only rows in Zarr v3 arrays on the space's volume.

Warm stores embeddings with the raw `bytes` codec, so each chunk file is the rows themselves and
is memory-mapped for scans; cold compresses them (zstd, lz4 or none), losslessly. Arrays are
created with a fixed, very large shape so their metadata is written once and never rewritten;
the number of committed rows lives in the space's checkpoint. Tombstones and recall statistics
live in RAM while the space is loaded and are saved with each checkpoint. Every method here
blocks: the space calls them from worker threads.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import shutil
import struct
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from memspace_contract import durable, wire
from memspace_server import errors, importing
from memspace_server.storage import caches, memories, tiers

if TYPE_CHECKING:
    import zarr
    import zarr.codecs
    import zarr.core.sync as zarr_sync
else:
    # Imported once a tier has rows (an empty tier makes no Zarr call): not at the start.
    zarr = importing.lazy("zarr")
    zarr_sync = importing.lazy("zarr.core.sync")

MAX_ROWS = 2**25
"""Nominal rows of every array of a generation (the real count is in the checkpoint); zarr's
indexing sizes some work by the number of chunks, so it is large but not huge."""
META_CHUNK = 64
"""Rows per chunk of the text columns: a recall reads one such chunk per hit, so keep it small."""
FLOAT_COLUMNS = ("norms", "confidence", "created_at")
TEXT_COLUMNS = ("ids", "contents", "tags")
FEW_ROWS = 1000
"""Rows read at once up to which a compressed tier takes embeddings from the chunk cache (the
hits of a recall); larger reads (consolidation, compaction) go to zarr and leave it alone."""


def _compressors(compression: str) -> Any:
    if compression == "zstd":
        return zarr.codecs.ZstdCodec(level=1)
    if compression == "lz4":
        return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    return None


_LENGTH = struct.Struct("<I")


def _vlen_utf8(path: str, wanted: Collection[int]) -> dict[int, str]:
    """Items `wanted` (positions in the chunk) of a chunk file in zarr's vlen-utf8 encoding: a
    u32 count, then per item a u32 length and the UTF-8 bytes. The lengths are walked up to the
    last item wanted and only the wanted items are decoded."""
    try:
        with open(path, "rb") as source:
            data = source.read()
    except FileNotFoundError:
        # Zarr writes no chunk that holds only the fill value, "".
        return dict.fromkeys(wanted, "")
    found = {}
    unpack = _LENGTH.unpack_from
    pos = 4
    for item in range(max(wanted) + 1):
        (length,) = unpack(data, pos)
        pos += 4
        if item in wanted:
            found[item] = data[pos : pos + length].decode()
        pos += length
    return found


class ZarrTier:
    def __init__(
        self,
        root: Path,
        name: wire.TierName,
        dim: int,
        *,
        chunk_rows: int,
        compression: str,
        generation: int = 1,
        rows: int = 0,
        state: Mapping[str, npt.NDArray[Any]] | None = None,
        chunks: caches.SpaceChunks | None = None,
    ) -> None:
        self.name = name
        self.root = root
        self.dim = dim
        self.chunk_rows = chunk_rows
        self.compression = compression
        self.generation = generation
        self.path = root / f"g{generation:06d}"
        self.mapped = compression == "none" or name == tiers.WARM
        self._cache = None if self.mapped else chunks
        self._cache_key = str(self.path)
        self._arrays: dict[str, Any] = {}
        if rows:
            self._open_arrays(rows)
        self._n = rows
        self._ids = tiers.ObjectColumn()  # out of the cyclic collector's walk
        self._row: dict[str, int] = {}
        self._norms = np.zeros(0, np.float32)
        self._confidence = np.zeros(0, np.float32)
        self._created = np.zeros(0, np.float64)
        self._deleted = np.zeros(0, bool)
        self._recalled = np.zeros(0, np.float64)
        self._count = np.zeros(0, np.uint64)
        self._buffers: dict[str, npt.NDArray[Any]] = {}
        self._tag_index = tiers.TagIndex()
        self._maps: list[npt.NDArray[np.float32]] = []
        self._mmaps: list[mmap.mmap] = []
        if rows:
            self._load(rows, state)

    # -- opening -------------------------------------------------------------------------

    def _open_arrays(self, rows: int) -> None:
        """Open (creating them the first time rows arrive) the arrays of this generation. An
        empty tier costs no files and no Zarr calls, so a new space loads in milliseconds."""
        group = self._open_group(rows)
        self._arrays = {name: group[name] for name in ("embeddings", *FLOAT_COLUMNS, *TEXT_COLUMNS)}

    def _open_group(self, rows: int) -> Any:
        if rows:
            if not (self.path / "zarr.json").exists():
                raise errors.SpaceRefusedError(
                    f"the {self.name} tier {self.path} is missing but the checkpoint names {rows} "
                    "rows in it; refusing to serve the space with memories missing"
                )
            group: Any = zarr.open_group(self.path, mode="r+", zarr_format=3)
            self.chunk_rows = int(group["embeddings"].chunks[0])
            return group
        # No committed rows: anything here is what a consolidation cut short by a crash left
        # (perhaps arrays half created); mode "w" below starts the generation afresh.
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / "zarr.json").exists():
            zarr.open_group(self.root, mode="a", zarr_format=3, attributes={"tier": self.name})
        group = zarr.open_group(
            self.path,
            mode="w",
            zarr_format=3,
            attributes={"tier": self.name, "embeddingDim": self.dim},
        )
        group.create_array(
            "embeddings",
            shape=(MAX_ROWS, self.dim),
            chunks=(self.chunk_rows, self.dim),
            dtype="float32",
            compressors=None if self.mapped else _compressors(self.compression),
            fill_value=0.0,
        )
        for column, dtype in (("norms", "float32"), ("confidence", "float32")):
            group.create_array(
                column, shape=(MAX_ROWS,), chunks=(self.chunk_rows,), dtype=dtype, fill_value=0.0
            )
        group.create_array(
            "created_at", shape=(MAX_ROWS,), chunks=(self.chunk_rows,), dtype="float64"
        )
        for column in TEXT_COLUMNS:
            group.create_array(
                column,
                shape=(MAX_ROWS,),
                chunks=(META_CHUNK,),
                dtype=str,
                compressors=None if self.mapped else _compressors(self.compression),
            )
        durable.fsync_paths(self.path.rglob("zarr.json"))
        return group

    def _load(self, rows: int, state: Mapping[str, npt.NDArray[Any]] | None) -> None:
        group = self._arrays
        self._ids = tiers.ObjectColumn(str(i) for i in group["ids"][:rows])
        self._norms = np.asarray(group["norms"][:rows], np.float32)
        self._confidence = np.asarray(group["confidence"][:rows], np.float32)
        self._created = np.asarray(group["created_at"][:rows], np.float64)
        if state is not None:
            self._deleted = np.asarray(state["deleted"], bool)[:rows].copy()
            self._recalled = np.asarray(state["recalled"], np.float64)[:rows].copy()
            self._count = np.asarray(state["count"], np.uint64)[:rows].copy()
        else:
            self._deleted = np.zeros(rows, bool)
            self._recalled = np.zeros(rows, np.float64)
            self._count = np.zeros(rows, np.uint64)
        for row, tag_text in enumerate(group["tags"][:rows]):
            if tag_text:
                self._tag_index.add(row, json.loads(str(tag_text)))
        for row, memory_id in enumerate(self._ids):
            if not self._deleted[row]:
                self._row[memory_id] = row
        if self.mapped:
            self._map_chunks(0)

    def _chunk_file(self, chunk: int) -> Path:
        return self.path / "embeddings" / "c" / str(chunk) / "0"

    def _map_chunks(self, first: int) -> None:
        """(Re)map the embedding chunk files from chunk `first` on; earlier ones never change.
        A mapping is released (and its file closed) when no array refers to it any more."""
        del self._maps[first:]
        del self._mmaps[first:]
        last = (self._n + self.chunk_rows - 1) // self.chunk_rows
        for chunk in range(first, last):
            with self._chunk_file(chunk).open("rb") as source:
                mapped = mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ)
            self._mmaps.append(mapped)
            self._maps.append(np.frombuffer(mapped, dtype="<f4").reshape(self.chunk_rows, self.dim))

    def close(self) -> None:
        self._maps.clear()
        self._mmaps.clear()
        self._forget_chunks(0)

    def _forget_chunks(self, first: int) -> None:
        """Drop cached chunks from `first` on (rewritten by an append, or the tier closing)."""
        if self._cache is not None:
            path = self._cache_key
            self._cache.discard(lambda key: not (key[0] == path and key[1] >= first))  # type: ignore[index]

    # -- the tier contract ---------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, memory_id: object) -> bool:
        return memory_id in self._row

    @property
    def rows(self) -> int:
        """Committed rows, live and tombstoned."""
        return self._n

    def present(self, ids: Collection[str]) -> set[str]:
        """Those of `ids` the tier holds (one set operation: a dict view or a set is walked on
        the smaller side)."""
        return self._row.keys() & ids

    def ids(self) -> Iterable[str]:
        return list(self._row)

    def nbytes(self) -> int:
        return int(self._norms.nbytes * 8 + 100 * self._n)

    def add(self, batch: tiers.Columns) -> None:
        count = len(batch)
        if count == 0:
            return
        if not self._row.keys().isdisjoint(batch.ids):
            raise KeyError(f"memory already in the {self.name} tier; remove it first")
        start, end = self._n, self._n + count
        if not self._arrays:
            self._open_arrays(0)
        group = self._arrays
        norms = tiers.norms(batch.embeddings)
        group["embeddings"][start:end] = batch.embeddings
        group["norms"][start:end] = norms
        group["confidence"][start:end] = batch.confidence
        group["created_at"][start:end] = batch.created_at
        group["ids"][start:end] = np.array(batch.ids, dtype=object)
        group["contents"][start:end] = np.array(batch.contents, dtype=object)
        group["tags"][start:end] = np.array(
            [json.dumps(t, separators=(",", ":")) if t else "" for t in batch.tags], dtype=object
        )
        self._fsync_rows(start, end)
        self._ids.extend(batch.ids)
        self._append(
            start,
            end,
            _norms=norms,
            _confidence=batch.confidence,
            _created=batch.created_at,
            _deleted=False,
            _recalled=batch.last_recalled_at,
            _count=batch.recall_count,
        )
        self._row.update(zip(batch.ids, range(start, end), strict=True))
        if any(batch.tags):
            for row, tags in enumerate(batch.tags, start):
                self._tag_index.add(row, tags)
        self._n = end
        if self.mapped:
            self._map_chunks(start // self.chunk_rows)
        else:
            self._forget_chunks(start // self.chunk_rows)

    def _append(self, start: int, end: int, **values: npt.ArrayLike) -> None:
        """Rows start..end of the columns kept in RAM. Each column is a view of the first rows
        of a buffer that doubles when full, so an append copies the new rows only."""
        for name, value in values.items():
            column: npt.NDArray[Any] = getattr(self, name)
            buffer = self._buffers.get(name)
            if buffer is None or buffer.shape[0] < end:
                buffer = np.zeros(max(end, 2 * start, 64), column.dtype)
                buffer[:start] = column[:start]
                self._buffers[name] = buffer
            buffer[start:end] = value
            setattr(self, name, buffer[:end])

    def _fsync_rows(self, start: int, end: int) -> None:
        paths: list[Path] = []
        for column in ("embeddings", *FLOAT_COLUMNS, *TEXT_COLUMNS):
            rows = META_CHUNK if column in TEXT_COLUMNS else self.chunk_rows
            suffix = ("0",) if column == "embeddings" else ()
            paths.extend(
                self.path.joinpath(column, "c", str(chunk), *suffix)
                for chunk in range(start // rows, (end - 1) // rows + 1)
            )
        durable.fsync_paths(paths)

    def remove(self, memory_id: str) -> bool:
        row = self._row.pop(memory_id, None)
        if row is None:
            return False
        self._deleted[row] = True
        return True

    def tombstones(self) -> int:
        return self._n - len(self._row)

    def touch(self, memory_id: str, at: float) -> None:
        row = self._row.get(memory_id)
        if row is not None:
            self._recalled[row] = at
            self._count[row] += 1

    def touch_many(self, memory_ids: Iterable[str], at: float) -> None:
        """`touch` for several memories, each at most once (those the tier holds)."""
        tiers.count_recalls(self._row, self._recalled, self._count, memory_ids, at)

    def _embeddings(self, start: int, end: int) -> npt.NDArray[np.float32]:
        """Rows start..end of the embeddings, as a view where the tier is mapped."""
        if self.mapped and start // self.chunk_rows == (end - 1) // self.chunk_rows:
            chunk = start // self.chunk_rows
            base = chunk * self.chunk_rows
            return self._maps[chunk][start - base : end - base]
        return np.asarray(self._arrays["embeddings"][start:end], np.float32)

    def _decompressed(self, wanted: list[int]) -> list[npt.NDArray[np.float32]]:
        """Embedding chunks `wanted` of a compressed tier, from the server's chunk cache where
        it holds them; the others are read (all in one trip to zarr) and cached."""
        found: dict[int, npt.NDArray[np.float32]] = {}
        if self._cache is not None:
            for chunk in wanted:
                cached = self._cache.get((self._cache_key, chunk))
                if cached is not None:
                    found[chunk] = cached
        missing = [chunk for chunk in wanted if chunk not in found]
        if missing:
            read = zarr_sync.sync(self._read_chunks(missing))
            for chunk, block in zip(missing, read, strict=True):
                found[chunk] = block
                if self._cache is not None:
                    self._cache.put((self._cache_key, chunk), block)
        return [found[chunk] for chunk in wanted]

    async def _read_chunks(self, chunks: list[int]) -> list[npt.NDArray[np.float32]]:
        array = self._arrays["embeddings"].async_array
        step = self.chunk_rows
        blocks = await asyncio.gather(
            *(array.getitem(slice(c * step, min((c + 1) * step, self._n))) for c in chunks)
        )
        return [np.ascontiguousarray(block, np.float32) for block in blocks]

    def _scores(self, cue: npt.NDArray[np.float32]) -> tiers.Scores:
        scores = np.empty(self._n, np.float32)
        step = self.chunk_rows
        if self.mapped:
            tiers.stacked_products(self._maps, cue, scores)
        else:
            chunks = (self._n + step - 1) // step
            group = 8  # chunks read in one trip to zarr when not cached
            for first in range(0, chunks, group):
                last = min(first + group, chunks)
                blocks = self._decompressed(list(range(first, last)))
                tiers.stacked_products(blocks, cue, scores[first * step : last * step])
        scores /= self._norms
        if self._n != len(self._row):  # tombstones
            scores[self._deleted] = -np.inf
        return scores

    def top_k(
        self,
        cue: npt.NDArray[np.float32],
        k: int,
        min_score: float,
        tags: Mapping[str, str],
    ) -> list[tuple[float, str]]:
        if not self._row:
            return []
        if tags:
            rows = self._tag_index.matching(tags)
            rows = rows[~self._deleted[rows]] if rows.shape[0] else rows
            if rows.shape[0] == 0:
                return []
            scores = self._scores(cue)[rows]
            found = tiers.best(scores, rows, k, min_score)
        else:
            found = tiers.best(self._scores(cue), None, k, min_score)
        return [(score, self._ids[row]) for score, row in found]

    def get(self, memory_id: str, with_embedding: bool = True) -> memories.Memory | None:
        row = self._row.get(memory_id)
        if row is None:
            return None
        return self.get_rows(np.array([row], np.int64), with_embedding)[0]

    def get_many(
        self, memory_ids: Iterable[str], with_embedding: bool, hit_at: float = 0.0
    ) -> dict[str, memories.Memory]:
        """The memories by id; with `hit_at`, as a recall at that time returns them (their
        recall counted; the caller then `touch`es them)."""
        rows = np.array([self._row[i] for i in memory_ids if i in self._row], np.int64)
        if rows.shape[0] == 0:
            return {}
        columns = self._columns(rows, with_embedding)
        if hit_at:
            columns.last_recalled_at[:] = hit_at
            columns.recall_count += np.uint64(1)
        return {m.id: m for m in columns}

    def get_rows(self, rows: npt.NDArray[np.int64], with_embedding: bool) -> list[memories.Memory]:
        if rows.shape[0] == 0:
            return []
        columns = self._columns(rows, with_embedding)
        return list(columns)

    def _columns(self, rows: npt.NDArray[np.int64], with_embedding: bool) -> tiers.Columns:
        few = rows.shape[0] <= FEW_ROWS
        if self.mapped:
            found = {column: self._read_text(column, rows) for column in ("contents", "tags")}
        else:
            wanted = ["contents", "tags", *(["embeddings"] if with_embedding and not few else [])]
            found = zarr_sync.sync(self._read_rows(wanted, rows))
        if with_embedding and self.mapped:
            embeddings = np.stack([self._embeddings(int(r), int(r) + 1)[0] for r in rows])
        elif with_embedding and few:
            # The hits of a recall: their chunks are most likely cached by the scan just made.
            step = self.chunk_rows
            chunks = sorted({int(r) // step for r in rows})
            blocks = dict(zip(chunks, self._decompressed(chunks), strict=True))
            embeddings = np.stack([blocks[int(r) // step][int(r) % step] for r in rows])
        elif with_embedding:
            embeddings = np.stack(found["embeddings"])
        else:
            embeddings = np.zeros((rows.shape[0], 0), np.float32)
        return tiers.Columns(
            ids=self._ids.take(rows),
            contents=[str(c) for c in found["contents"]],
            embeddings=embeddings.astype(np.float32, copy=True),
            confidence=self._confidence[rows].copy(),
            tags=[json.loads(str(t)) if t else {} for t in found["tags"]],
            created_at=self._created[rows].copy(),
            last_recalled_at=self._recalled[rows].copy(),
            recall_count=self._count[rows].copy(),
        )

    def _read_text(self, column: str, rows: npt.NDArray[np.int64]) -> list[str]:
        """Rows of an uncompressed text column straight from its chunk files (`_vlen_utf8`),
        each file read once. (Zarr costs about a millisecond per chunk read; this costs
        microseconds.)"""
        places = [divmod(row, META_CHUNK) for row in rows.tolist()]
        by_chunk: dict[int, set[int]] = {}
        for index, offset in places:
            by_chunk.setdefault(index, set()).add(offset)
        prefix = f"{self.path}/{column}/c/"  # as text: pathlib joins cost more than a read
        items = {
            index: _vlen_utf8(prefix + str(index), offsets) for index, offsets in by_chunk.items()
        }
        return [items[index][offset] for index, offset in places]

    async def _read_rows(
        self, columns: list[str], rows: npt.NDArray[np.int64]
    ) -> dict[str, list[Any]]:
        """The given rows of several columns, reading every chunk involved once and all of them
        concurrently, in one trip to zarr's event loop."""
        plans = []
        for column in columns:
            step = self.chunk_rows if column == "embeddings" else META_CHUNK
            starts = sorted({int(r) // step * step for r in rows})
            plans.append((column, step, starts))
        reads = [
            self._arrays[column].async_array.getitem(slice(start, min(start + step, self._n)))
            for column, step, starts in plans
            for start in starts
        ]
        blocks = iter(await asyncio.gather(*reads))
        found: dict[str, list[Any]] = {}
        for column, step, starts in plans:
            by_start = {start: next(blocks) for start in starts}
            found[column] = [by_start[int(r) // step * step][int(r) % step] for r in rows]
        return found

    # -- what the search index (`ann`) reads -------------------------------------------------

    def id_at(self, row: int) -> str:
        return str(self._ids[row])

    def deleted(self) -> npt.NDArray[np.bool_]:
        """Per committed row, whether it is a tombstone (a view: do not change it)."""
        return self._deleted

    def tag_rows(self, tags: Mapping[str, str]) -> tiers.Rows:
        """Rows, live or not, carrying every tag of `tags` (not empty)."""
        return self._tag_index.matching(tags)

    def row_norms(self, rows: tiers.Rows) -> npt.NDArray[np.float32]:
        return self._norms[rows]

    def vectors(self, rows: tiers.Rows) -> npt.NDArray[np.float32]:
        """The embeddings of `rows` (sorted), copied: by chunk from the maps or the cache."""
        if rows.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        step = self.chunk_rows
        chunks = sorted({int(r) // step for r in rows})
        blocks = (
            dict(zip(chunks, (self._maps[c] for c in chunks), strict=True))
            if self.mapped
            else dict(zip(chunks, self._decompressed(chunks), strict=True))
        )
        out = np.empty((rows.shape[0], self.dim), np.float32)
        for chunk, block in blocks.items():
            picked = np.flatnonzero(rows // step == chunk)
            out[picked] = block[rows[picked] - chunk * step]
        return out

    def vectors_between(self, start: int, end: int) -> npt.NDArray[np.float32]:
        """The embeddings of rows start..end-1, copied."""
        if self.mapped:
            step = self.chunk_rows
            parts = [
                self._maps[c][max(start, c * step) - c * step : min(end, (c + 1) * step) - c * step]
                for c in range(start // step, (end - 1) // step + 1)
            ]
            return np.concatenate(parts).astype(np.float32, copy=True)
        return np.asarray(self._arrays["embeddings"][start:end], np.float32)

    def recency(self) -> npt.NDArray[np.float64]:
        return np.maximum(self._recalled, self._created)

    def take_least_recent(self, count: int) -> tiers.Columns:
        live = np.flatnonzero(~self._deleted)
        count = min(count, live.shape[0])
        if count == 0:
            return tiers.Columns.empty(self.dim)
        order = np.argsort(self.recency()[live], kind="stable")[:count]
        rows = np.sort(live[order])
        batch = self._columns(rows, with_embedding=True)
        for memory_id in batch.ids:
            self.remove(memory_id)
        return batch

    def compacted(self, compression: str) -> ZarrTier:
        """The next generation of this tier with only its live rows (its tombstones dropped),
        written with `compression`; this one is closed. Its files stay until a checkpoint names
        the new generation and `sweep_generations` runs."""
        fresh = ZarrTier(
            self.root,
            self.name,
            self.dim,
            chunk_rows=self.chunk_rows,
            compression=compression,
            generation=self.generation + 1,
            chunks=self._cache,
        )
        for batch in self.live_batches(self.chunk_rows * 4):
            fresh.add(batch)
        self.close()
        return fresh

    def sweep_generations(self) -> None:
        """Delete every generation but this one: call once a checkpoint names this one."""
        for stale in self.root.glob("g*"):
            if stale.is_dir() and stale != self.path:
                shutil.rmtree(stale, ignore_errors=True)

    def texts(self, size: int = 8192) -> Iterable[tuple[str, str, dict[str, str]]]:
        """(ID, content, tags) of every live memory, read a batch of rows at a time."""
        live = np.flatnonzero(~self._deleted)
        for start in range(0, live.shape[0], size):
            batch = self._columns(live[start : start + size], with_embedding=False)
            yield from zip(batch.ids, batch.contents, batch.tags, strict=True)

    def live_batches(self, size: int) -> Iterable[tiers.Columns]:
        live = np.flatnonzero(~self._deleted)
        for start in range(0, live.shape[0], size):
            yield self._columns(live[start : start + size], with_embedding=True)

    def state(self) -> dict[str, npt.NDArray[Any]]:
        return {
            "deleted": self._deleted.copy(),
            "recalled": self._recalled.copy(),
            "count": self._count.copy(),
        }
