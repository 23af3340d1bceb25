"""What every tier store offers (the contract its test suite checks), and the pieces they share:
columnar batches of memories, the tag index and the exact top-k cosine scan."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from memspace_contract import wire
from memspace_server import importing
from memspace_server.storage import memories

if TYPE_CHECKING:
    import faiss
else:
    faiss = importing.lazy("faiss")  # by the first scan past SMALL_PRODUCT, not at the start

HOT: Final = wire.HOT
WARM: Final = wire.WARM
COLD: Final = wire.COLD
NAMES = wire.TIERS

Scores = npt.NDArray[np.float32]
Rows = npt.NDArray[np.int64]


@dataclasses.dataclass
class Columns:
    """A batch of memories, column by column (what moves between tiers)."""

    ids: list[str]
    contents: list[str]
    embeddings: npt.NDArray[np.float32]
    confidence: npt.NDArray[np.float32]
    tags: list[dict[str, str]]
    created_at: npt.NDArray[np.float64]
    last_recalled_at: npt.NDArray[np.float64]
    recall_count: npt.NDArray[np.uint64]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty(cls, dim: int) -> Columns:
        return cls(
            ids=[],
            contents=[],
            embeddings=np.zeros((0, dim), np.float32),
            confidence=np.zeros(0, np.float32),
            tags=[],
            created_at=np.zeros(0, np.float64),
            last_recalled_at=np.zeros(0, np.float64),
            recall_count=np.zeros(0, np.uint64),
        )

    @classmethod
    def of(cls, items: Sequence[memories.Memory], dim: int) -> Columns:
        if not items:
            return cls.empty(dim)
        return cls(
            ids=[m.id for m in items],
            contents=[m.content for m in items],
            embeddings=np.stack([m.embedding for m in items]).astype(np.float32, copy=False),
            confidence=np.array([m.confidence for m in items], np.float32),
            tags=[dict(m.tags) for m in items],
            created_at=np.array([m.created_at for m in items], np.float64),
            last_recalled_at=np.array([m.last_recalled_at for m in items], np.float64),
            recall_count=np.array([m.recall_count for m in items], np.uint64),
        )

    def slice(self, start: int, end: int) -> Columns:
        """Rows start..end-1 (views of the arrays)."""
        return Columns(
            ids=self.ids[start:end],
            contents=self.contents[start:end],
            embeddings=self.embeddings[start:end],
            confidence=self.confidence[start:end],
            tags=self.tags[start:end],
            created_at=self.created_at[start:end],
            last_recalled_at=self.last_recalled_at[start:end],
            recall_count=self.recall_count[start:end],
        )

    def take(self, rows: Rows) -> Columns:
        """The given rows (copies)."""
        return Columns(
            ids=[self.ids[r] for r in rows],
            contents=[self.contents[r] for r in rows],
            embeddings=self.embeddings[rows],
            confidence=self.confidence[rows],
            tags=[self.tags[r] for r in rows],
            created_at=self.created_at[rows],
            last_recalled_at=self.last_recalled_at[rows],
            recall_count=self.recall_count[rows],
        )

    def memory(self, i: int) -> memories.Memory:
        return memories.Memory(
            id=memories.MemoryId(self.ids[i]),
            content=self.contents[i],
            embedding=self.embeddings[i].copy(),
            confidence=float(self.confidence[i]),
            tags=self.tags[i],
            created_at=float(self.created_at[i]),
            last_recalled_at=float(self.last_recalled_at[i]),
            recall_count=int(self.recall_count[i]),
        )

    def __iter__(self) -> Iterator[memories.Memory]:
        return (self.memory(i) for i in range(len(self)))


class TierStore(Protocol):
    """One tier of one space. Blocking methods are called from worker threads; mutations happen
    under the space's write lock, scans under its read lock."""

    name: wire.TierName

    def __len__(self) -> int: ...
    def __contains__(self, memory_id: object) -> bool: ...
    def ids(self) -> Iterable[str]: ...
    def get(self, memory_id: str, with_embedding: bool = True) -> memories.Memory | None: ...
    def add(self, batch: Columns) -> None: ...
    def remove(self, memory_id: str) -> bool: ...
    def get_many(
        self, memory_ids: Iterable[str], with_embedding: bool, hit_at: float = 0.0
    ) -> dict[str, memories.Memory]: ...
    def touch(self, memory_id: str, at: float) -> None: ...
    def touch_many(self, memory_ids: Iterable[str], at: float) -> None: ...
    def top_k(
        self, cue: npt.NDArray[np.float32], k: int, min_score: float, tags: Mapping[str, str]
    ) -> list[tuple[float, str]]: ...
    def take_least_recent(self, count: int) -> Columns: ...


class ObjectColumn:
    """A growable column of Python objects (a tier's ids, texts, tags), kept in a numpy array of
    objects rather than a list. Python's cyclic collector walks every slot of a list at each
    full collection, a cache miss per memory with every thread stopped (a list of 1,000,000 ids
    cost 25 to 70 ms a collection, a set 100 ms more); it does not walk a numpy array. What a
    column holds must not refer back to it (strings and flat dicts of strings), so no cycle
    runs through one."""

    __slots__ = ("_items", "_n")

    def __init__(self, items: Iterable[Any] = ()) -> None:
        given = np.fromiter(items, dtype=object)
        self._n = int(given.shape[0])
        self._items = np.empty(max(16, self._n), dtype=object)
        self._items[: self._n] = given

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, row: int) -> Any:
        return self._items[row] if 0 <= row < self._n else self._missing(row)

    def __setitem__(self, row: int, value: Any) -> None:
        if not 0 <= row < self._n:
            self._missing(row)
        self._items[row] = value

    def __iter__(self) -> Iterator[Any]:
        return iter(self.tolist())

    def _missing(self, row: int) -> Any:
        raise IndexError(f"row {row} of a column of {self._n}")

    def _room(self, need: int) -> None:
        if need > self._items.shape[0]:
            grown = np.empty(max(need, 2 * self._items.shape[0]), dtype=object)
            grown[: self._n] = self._items[: self._n]
            self._items = grown

    def append(self, value: Any) -> None:
        self._room(self._n + 1)
        self._items[self._n] = value
        self._n += 1

    def extend(self, values: Sequence[Any]) -> None:
        count = len(values)
        self._room(self._n + count)
        self._items[self._n : self._n + count] = np.fromiter(values, dtype=object, count=count)
        self._n += count

    def pop(self) -> Any:
        """Remove and return the last value (its slot let go)."""
        if self._n == 0:
            raise IndexError("pop from an empty column")
        self._n -= 1
        value = self._items[self._n]
        self._items[self._n] = None
        return value

    def take(self, rows: Iterable[int]) -> list[Any]:
        """The values at `rows` (numpy row numbers), in that order."""
        picked = np.asarray(rows, dtype=np.int64)
        if picked.shape[0]:
            low, high = int(picked.min()), int(picked.max())
            if low < 0 or high >= self._n:
                self._missing(low if low < 0 else high)
        return list(self._items[picked].tolist())

    def tolist(self) -> list[Any]:
        values: list[Any] = self._items[: self._n].tolist()
        return values


class TagIndex:
    """(key, value) -> rows holding that tag; answers 'rows matching every filter'.

    A tag's rows are the keys of a dict of ints, not a set: a set is always tracked by the
    cyclic garbage collector, a dict of ints never is. A tag with a value per memory (an ID
    from elsewhere, say) made a set per memory, and every full collection (which stops the
    whole server, every tenant of it) visited them all: 18 ms at 20,000 memories, growing with
    the space."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], dict[int, None]] = {}

    def add(self, row: int, tags: Mapping[str, str]) -> None:
        for pair in tags.items():
            rows = self._rows.get(pair)
            if rows is None:
                self._rows[pair] = {row: None}
            else:
                rows[row] = None

    def discard(self, row: int, tags: Mapping[str, str]) -> None:
        for pair in tags.items():
            rows = self._rows.get(pair)
            if rows is not None:
                rows.pop(row, None)
                if not rows:
                    del self._rows[pair]

    def matching(self, filters: Mapping[str, str]) -> Rows:
        """Rows that carry every (key, value) of `filters` (which must not be empty)."""
        postings: list[dict[int, None]] = []
        for pair in filters.items():
            rows = self._rows.get(pair)
            if rows is None:
                return np.zeros(0, np.int64)
            postings.append(rows)
        if not postings:
            return np.zeros(0, np.int64)
        postings.sort(key=len)
        fewest, *rest = postings
        found: Collection[int] = fewest.keys()
        for rows in rest:  # in C, walking the smaller side
            found = found & rows.keys()
        return np.fromiter(found, np.int64, len(found))


def count_recalls(
    row_of: Mapping[str, int],
    recalled: npt.NDArray[np.float64],
    counts: npt.NDArray[np.uint64],
    memory_ids: Iterable[str],
    at: float,
) -> None:
    """A recall at `at` of each of `memory_ids` (each at most once) that `row_of` maps to a row
    of the columns `recalled` (when last recalled) and `counts` (recalls so far)."""
    rows = [row for i in memory_ids if (row := row_of.get(i)) is not None]
    if rows:
        picked = np.array(rows, np.int64)
        recalled[picked] = at
        counts[picked] += np.uint64(1)


def squared_norms(matrix: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Each row's sum of squares in float32: faiss's kernel for a contiguous float32 matrix
    (5x quicker than einsum for 100 x 768 here), einsum for anything else."""
    if matrix.dtype == np.float32 and matrix.ndim == 2 and matrix.flags.c_contiguous:
        rows, dim = matrix.shape
        out = np.empty(rows, np.float32)
        if rows and dim:
            faiss.fvec_norms_L2sqr(faiss.swig_ptr(out), faiss.swig_ptr(matrix), dim, rows)  # type: ignore[attr-defined]
        else:
            out[:] = 0
        return out
    squares: npt.NDArray[np.float32] = np.einsum("ij,ij->i", matrix, matrix)
    return squares


def norms(matrix: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Row norms in float32, without the temporaries np.linalg.norm makes."""
    return np.sqrt(squared_norms(matrix)).astype(np.float32, copy=False)


SMALL_PRODUCT = 1 << 17
"""Values of a matrix below which numpy's product is as quick (the kernel's call costs more
than the reading saves)."""


def products(
    matrix: npt.NDArray[np.float32], cue: npt.NDArray[np.float32], out: npt.NDArray[np.float32]
) -> None:
    """`out[:] = matrix @ cue` through faiss's inner-product kernel, which streams the rows at
    memory speed without the GIL; numpy's matrix-vector product (OpenBLAS sgemv on one thread)
    took twice as long here (100k x 768: 22 ms against 11.7 ms). Anything not contiguous
    float32 goes to numpy."""
    rows = matrix.shape[0]
    if out.shape != (rows,):
        raise ValueError(f"{rows} rows need an output of {rows}, got {out.shape}")
    stacked_products([matrix], cue, out)


def stacked_products(
    blocks: Iterable[npt.NDArray[np.float32]],
    cue: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
) -> None:
    """`out[:] = stack(blocks)[:len(out)] @ cue` without stacking: each block's products go
    straight into its run of `out` (a block past the end of `out` is cut to fit), through
    faiss's kernel as `products` does. A tier stored in many blocks (the warm tier's chunk
    files: 98 for 100k x 768) pays only the kernel call per block: looking faiss up through
    the lazy module and checking `cue` and `out` again for every block cost 18 us a block
    against 6 us (a busy machine), about a millisecond of such a scan."""
    total, dim = out.shape[0], cue.shape[0]
    vectors_fit = (
        cue.dtype == np.float32
        and out.dtype == np.float32
        and cue.flags.c_contiguous
        and out.flags.c_contiguous
        and cue.ndim == 1
    )
    kernel: Any = None  # faiss's, looked up at the first block that goes to it
    start = 0
    for whole in blocks:
        if start >= total:
            break
        block = whole[: total - start]
        end = start + block.shape[0]
        if (
            vectors_fit
            and block.size >= SMALL_PRODUCT
            and block.dtype == np.float32
            and block.flags.c_contiguous
            and block.shape[1:] == (dim,)
        ):
            if kernel is None:
                kernel, pointer = faiss.fvec_inner_products_ny, faiss.swig_ptr  # type: ignore[attr-defined]
                cue_pointer = pointer(cue)
            kernel(pointer(out[start:end]), cue_pointer, pointer(block), dim, end - start)
        else:
            np.matmul(block, cue, out=out[start:end])
        start = end
    if start != total:
        raise ValueError(f"the blocks hold {start} rows, fewer than the {total} of the output")


def unit(vector: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """`vector` scaled to norm 1 (its norm in float32 as np.linalg.norm takes it, without that
    function's checks: this runs once per recall)."""
    norm = np.sqrt(vector.dot(vector))
    scaled: npt.NDArray[np.float32] = (vector / norm).astype(np.float32, copy=False)
    return scaled


def best(scores: Scores, rows: Rows | None, k: int, min_score: float) -> list[tuple[float, int]]:
    """The top k (score, row) of `scores` at or above min_score, best first. `rows` maps positions
    of `scores` to row numbers (None: the identity). Rows scored -inf are excluded."""
    count = scores.shape[0]
    if count == 0:
        return []
    top = scores.argpartition(count - k)[count - k :] if k < count else np.arange(count)
    picked = scores[top]
    order = (-picked).argsort(kind="stable")
    ranked = top[order]
    found = rows[ranked] if rows is not None else ranked
    out = []
    for score, row in zip(picked[order].tolist(), found.tolist(), strict=True):
        if score < min_score or score == -np.inf:
            break
        out.append((score, row))
    return out


Candidate = tuple[float, wire.TierName, str]
"""(score, tier, memory id) of one recall hit before the tiers' answers are merged."""


def merge(candidates: Iterable[Candidate], k: int) -> list[Candidate]:
    """Merge (score, tier, id) candidates of several tiers into the overall top k."""
    return sorted(candidates, key=lambda c: (-c[0], c[2]))[:k]
