"""Approximate search of a space's warm and cold tiers: one HNSW graph (faiss) per tier
generation, built in the background, saved beside the generation, and its recall measured.

The graph is derived data. It covers rows 0..R-1 of one generation of a tier (rows of a
generation never change: a tier only appends, and compaction writes a new generation), holds
their unit vectors, and answers by inner product, which is their cosine. Rows appended since
its build, R..N-1, are scanned exactly; tombstones and tag filters are applied inside the graph
search (a faiss ID selector), and a filter that leaves too few rows for the graph to find is
answered by an exact scan of those rows. The WAL and the tiers stay the truth: a graph that is
missing, cut short or of another generation is dropped and built again.

On disk, beside the generations of the tier (`warm/g000003/`):

    warm/.ann/g000003.faiss   the graph (faiss's own format)
    warm/.ann/g000003.json    {"format", "generation", "rows", "bytes", "m", "efConstruction",
                               "firstId", "lastId"}: what the graph covers, checked on load

The folder's name starts with a dot, so backups (which skip such names) do not copy it: a
restored space builds its graphs again.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import numpy.typing as npt

from memspace_contract import durable, index
from memspace_server import importing
from memspace_server.storage import memories, tiers, zarr_tiers

if TYPE_CHECKING:
    import faiss
else:
    faiss = importing.lazy("faiss")  # by the first graph built or loaded, not at the start

log = logging.getLogger(__name__)

FOLDER: Final = ".ann"
FORMAT: Final = 1
BUILD_BATCH: Final = 8192
"""Rows read from a tier (under the space's read lock) and added to a graph at a time."""
RECALL_WINDOW: Final = 100
"""Measured recalls averaged for Health: the last this many samples."""

BuildState = Literal["none", "building", "ready", "failed"]
"""none: exact search (no graph wanted); building: a graph is being built or extended (rows
not yet in one are scanned exactly); ready: every graph wanted is published; failed: the last
build failed (exact scans answer; the next consolidation tries again)."""

_builder_lock = threading.Lock()
_builder: concurrent.futures.ThreadPoolExecutor | None = None


def builder() -> concurrent.futures.ThreadPoolExecutor:
    """The server's one thread for graph builds: builds queue behind each other instead of
    taking every core from recalls (each build may still use `ann_build_threads`)."""
    global _builder  # noqa: PLW0603 - one build thread per process, made on first use
    with _builder_lock:
        if _builder is None:
            _builder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="memspace-ann")
        return _builder


@dataclasses.dataclass(frozen=True)
class Status:
    """What Health and the MemorySpace status show of a space's search index."""

    type: str
    """The search in effect for warm and cold: "exact" or "hnsw"."""
    configured: index.IndexType
    rows: int
    """Rows covered by the published graphs."""
    state: BuildState
    recall: float | None
    """Mean recall@k of the last sampled approximate recalls; None: none sampled yet."""
    samples: int
    """Approximate recalls sampled since the space was loaded."""


class Graph:
    """A published HNSW graph of one tier generation, rows 0..rows-1. Never changed once
    published (searches run on it from several threads); an extension is a copy."""

    def __init__(self, hnsw: Any, generation: int, params: index.SearchIndex) -> None:
        self.hnsw = hnsw
        self.generation = generation
        self.params = params

    @property
    def rows(self) -> int:
        return int(self.hnsw.ntotal)

    def nbytes(self) -> int:
        """Bytes the graph takes in RAM: its vectors and its links."""
        return int(faiss.serialize_index(self.hnsw).nbytes)

    def search(
        self,
        cue: npt.NDArray[np.float32],
        k: int,
        ef: int,
        allowed: npt.NDArray[np.bool_] | None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """The k best (scores, rows) among `allowed` rows (None: all), best first."""
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = max(ef, k)
        keep: list[Any] = []
        if allowed is not None:
            bits = np.packbits(allowed, bitorder="little")
            selector = faiss.IDSelectorBitmap(allowed.shape[0], faiss.swig_ptr(bits))
            keep.extend((bits, selector))  # alive while faiss reads them
            params.sel = selector
        scores, rows = self.hnsw.search(cue.reshape(1, -1), k, params=params)
        del keep
        found = rows[0] >= 0
        return scores[0][found], rows[0][found]


def new_hnsw(dim: int, params: index.SearchIndex) -> Any:
    hnsw = faiss.IndexHNSWFlat(dim, params.m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = params.ef_construction
    return hnsw


def started(graph: Graph | None, dim: int, params: index.SearchIndex) -> Any:
    """A copy of `graph` to extend, or a new empty graph. Blocking."""
    if graph is not None:
        return faiss.clone_index(graph.hnsw)
    return new_hnsw(dim, params)


def add(hnsw: Any, vectors: npt.NDArray[np.float32], threads: int) -> None:
    """Append `vectors` (as unit rows) to a graph being built. Blocking."""
    faiss.omp_set_num_threads(max(1, threads))
    hnsw.add(unit_rows(vectors))


def unit_rows(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = tiers.norms(vectors)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(vectors / norms[:, None], np.float32)


# -- on disk -------------------------------------------------------------------------------


def _paths(root: Path, generation: int) -> tuple[Path, Path]:
    folder = root / FOLDER
    return folder / f"g{generation:06d}.faiss", folder / f"g{generation:06d}.json"


def save(tier: zarr_tiers.ZarrTier, graph: Graph) -> None:
    """Write `graph` beside its tier generation (temporary file, fsync, rename; the
    description last) and delete the graphs of other generations. Blocking."""
    graph_path, meta_path = _paths(tier.root, graph.generation)
    graph_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = graph_path.with_name(f".{graph_path.name}.tmp")
    faiss.write_index(graph.hnsw, str(temporary))
    durable.fsync_paths([temporary])
    temporary.replace(graph_path)
    meta = {
        "format": FORMAT,
        "generation": graph.generation,
        "rows": graph.rows,
        "bytes": graph_path.stat().st_size,
        "m": graph.params.m,
        "efConstruction": graph.params.ef_construction,
        "firstId": tier.id_at(0) if graph.rows else "",
        "lastId": tier.id_at(graph.rows - 1) if graph.rows else "",
    }
    durable.atomic_write(meta_path, json.dumps(meta, sort_keys=True))
    sweep(tier.root, graph.generation)


def sweep(root: Path, keep: int) -> None:
    """Delete every file of the index folder but the graph of generation `keep`: graphs of
    other generations, and temporary files a build cut short by a crash left."""
    folder = root / FOLDER
    if not folder.is_dir():
        return
    wanted = {p.name for p in _paths(root, keep)}
    for path in folder.iterdir():
        if path.name not in wanted:
            path.unlink(missing_ok=True)


def load(tier: zarr_tiers.ZarrTier, params: index.SearchIndex) -> Graph | None:
    """The saved graph of the tier's generation if it is whole, made with `params`' m and
    efConstruction, and covers rows this generation holds; else None (and its files are
    deleted, so a build makes it again). Blocking."""
    sweep(tier.root, tier.generation)
    graph_path, meta_path = _paths(tier.root, tier.generation)
    if not meta_path.exists():
        graph_path.unlink(missing_ok=True)
        return None
    try:
        meta = json.loads(meta_path.read_text())
        rows = int(meta["rows"])
        whole = (
            meta["format"] == FORMAT
            and meta["generation"] == tier.generation
            and 0 < rows <= tier.rows
            and meta["m"] == params.m
            and meta["efConstruction"] == params.ef_construction
            and meta["firstId"] == tier.id_at(0)
            and meta["lastId"] == tier.id_at(rows - 1)
            and graph_path.stat().st_size == meta["bytes"]
        )
        hnsw = faiss.read_index(str(graph_path)) if whole else None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        log.warning("the search graph of %s is unreadable (%s); it is built again", tier.path, err)
        hnsw = None
    if hnsw is None or hnsw.ntotal != rows or hnsw.d != tier.dim:
        graph_path.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        return None
    return Graph(hnsw, tier.generation, params)


# -- search --------------------------------------------------------------------------------


def _exact_rows(
    tier: zarr_tiers.ZarrTier,
    cue: npt.NDArray[np.float32],
    rows: tiers.Rows,
    k: int,
    min_score: float,
) -> list[tuple[float, int]]:
    if rows.shape[0] == 0:
        return []
    scores = (tier.vectors(rows) @ cue) / tier.row_norms(rows)
    return tiers.best(scores.astype(np.float32, copy=False), rows, k, min_score)


def graph_top_k(
    tier: zarr_tiers.ZarrTier,
    *,
    graph: Graph,
    cue: npt.NDArray[np.float32],
    k: int,
    min_score: float,
    tags: Mapping[str, str],
    ef: int,
    filter_exact_fraction: float,
) -> tuple[list[tuple[float, str]], bool]:
    """The top k of `tier` through `graph` (rows it does not cover scanned exactly). Returns
    (hits, whether the graph answered); a selective tag filter is answered exactly instead.
    Blocking; call under the space's read lock."""
    total = tier.rows
    live = ~tier.deleted()
    allowed: npt.NDArray[np.bool_] | None = None
    if tags:
        rows = tier.tag_rows(tags)
        rows = rows[live[rows]]
        if rows.shape[0] < max(k, filter_exact_fraction * len(tier)):
            found = _exact_rows(tier, cue, np.sort(rows), k, min_score)
            return [(score, tier.id_at(row)) for score, row in found], False
        allowed = np.zeros(total, bool)
        allowed[rows] = True
    elif tier.tombstones():
        allowed = live
    covered = graph.rows
    scores, rows = graph.search(cue, k, ef, None if allowed is None else allowed[:covered])
    candidates = [(float(s), int(r)) for s, r in zip(scores, rows, strict=True) if s >= min_score]
    if covered < total:
        tail = np.arange(covered, total, dtype=np.int64)
        tail = tail[(allowed if allowed is not None else live)[covered:]]
        candidates.extend(_exact_rows(tier, cue, tail, k, min_score))
    candidates.sort(key=lambda c: (-c[0], c[1]))
    return [(score, tier.id_at(row)) for score, row in candidates[:k]], True


# -- recall measurement --------------------------------------------------------------------


class RecallMeter:
    """recall@k of sampled approximate recalls against the exact answer, the last
    RECALL_WINDOW of them averaged."""

    def __init__(self) -> None:
        self._window: list[float] = []
        self.samples = 0

    def note(self, approximate: list[str], exact: list[str]) -> float | None:
        if not exact:
            return None
        value = len(set(approximate) & set(exact)) / len(exact)
        self._window.append(value)
        del self._window[:-RECALL_WINDOW]
        self.samples += 1
        return value

    @property
    def recall(self) -> float | None:
        return sum(self._window) / len(self._window) if self._window else None


def persisted_files(root: Path) -> list[Path]:
    """The files of the index folder of a tier (for tests and tools)."""
    folder = root / FOLDER
    return sorted(folder.iterdir()) if folder.is_dir() else []


def remove_all(root: Path) -> None:
    """Delete a tier's saved graphs (the space was set to exact search)."""
    folder = root / FOLDER
    if folder.is_dir():
        for path in folder.iterdir():
            path.unlink(missing_ok=True)
        os.rmdir(folder)


# -- one space's index -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """A build to run: the graph of tier `name`, generation `generation`, from `base` (None:
    from scratch) to `rows` rows."""

    name: str
    generation: int
    base: Graph | None
    rows: int


class SpaceIndex:
    """The search index of one space: its graphs by tier, what to build next, the recall
    measured. Its methods are called on the event loop, except `top_k` and `load`."""

    def __init__(self, params: index.SearchIndex, settings: Any) -> None:
        self.params = params
        self.settings = settings
        self.graphs: dict[str, Graph] = {}
        self.building = False
        self.failed = False
        self.meter = RecallMeter()

    def wanted(self, warm: zarr_tiers.ZarrTier, cold: zarr_tiers.ZarrTier) -> bool:
        """Whether the warm and cold tiers are searched through graphs (`spec.index`)."""
        kind = self.params.type
        if kind == "auto":
            return len(warm) + len(cold) >= self.params.auto_threshold
        return kind == "hnsw"

    def reconfigure(self, params: index.SearchIndex) -> None:
        """New parameters: graphs made with another m or efConstruction are dropped (exact
        scans answer until they are rebuilt); efSearch applies from the next recall."""
        changed = (params.m, params.ef_construction) != (self.params.m, self.params.ef_construction)
        if changed or params.type == "exact":
            self.graphs.clear()
        self.params = params

    def load(self, warm: zarr_tiers.ZarrTier, cold: zarr_tiers.ZarrTier) -> None:
        """Take the graphs saved beside the tiers' generations (a restart does not rebuild
        them). Blocking."""
        for tier in (warm, cold):
            if tier.rows and self.params.type != "exact":
                graph = load(tier, self.params)
                if graph is not None:
                    self.graphs[tier.name] = graph
            elif self.params.type == "exact":
                remove_all(tier.root)

    def next_job(self, warm: zarr_tiers.ZarrTier, cold: zarr_tiers.ZarrTier) -> Job | None:
        """The next build due, if any: a tier without a graph of its generation, or with too
        many rows added since its graph was built."""
        if not self.wanted(warm, cold):
            return None
        for tier in (warm, cold):
            if tier.rows == 0:
                continue
            graph = self.graphs.get(tier.name)
            if graph is None or graph.generation != tier.generation:
                return Job(tier.name, tier.generation, None, tier.rows)
            behind = tier.rows - graph.rows
            if behind > 0 and behind >= self.settings.ann_extend_fraction * graph.rows:
                return Job(tier.name, tier.generation, graph, tier.rows)
        return None

    def approximate(self, warm: zarr_tiers.ZarrTier, cold: zarr_tiers.ZarrTier) -> bool:
        """Whether a recall now goes through at least one graph."""
        return self.wanted(warm, cold) and any(
            (graph := self.graphs.get(tier.name)) is not None
            and graph.generation == tier.generation
            for tier in (warm, cold)
        )

    def top_k(
        self,
        tier: zarr_tiers.ZarrTier,
        query: memories.Query,
        cue: npt.NDArray[np.float32],
        exact: bool,
        use_graphs: bool,
    ) -> list[tuple[float, str]]:
        """The tier's top k: through its graph when one of its generation is published and
        `use_graphs` (the space wants graphs) and not `exact`; else an exact scan."""
        graph = self.graphs.get(tier.name)
        if exact or not use_graphs or graph is None or graph.generation != tier.generation:
            return tier.top_k(cue, query.k, query.min_score, query.tags)
        if not len(tier):
            return []
        hits, _ = graph_top_k(
            tier,
            graph=graph,
            cue=cue,
            k=query.k,
            min_score=query.min_score,
            tags=query.tags,
            ef=self.params.ef_search,
            filter_exact_fraction=self.settings.ann_filter_exact_fraction,
        )
        return hits

    def status(self, warm: zarr_tiers.ZarrTier, cold: zarr_tiers.ZarrTier) -> Status:
        wanted = self.wanted(warm, cold)
        rows = sum(
            graph.rows
            for tier in (warm, cold)
            if (graph := self.graphs.get(tier.name)) is not None
            and graph.generation == tier.generation
        )
        state: BuildState
        if not wanted:
            state = "none"
        elif self.building or self.next_job(warm, cold) is not None:
            state = "failed" if self.failed and not self.building else "building"
        else:
            state = "ready"
        return Status(
            type="hnsw" if wanted else "exact",
            configured=self.params.type,
            rows=rows,
            state=state,
            recall=self.meter.recall,
            samples=self.meter.samples,
        )
