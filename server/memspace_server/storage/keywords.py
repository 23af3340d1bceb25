"""The keyword index of a space: BM25 over each memory's content and tags (tantivy), beside
the tiers, in `<space>/.keyword/` (tantivy's own segment files and `meta.json`).

The index follows the writes in LSN order; it is committed (a tantivy commit, which is atomic)
with a meta document that records the LSN the index reflects. It is opened only when needed
(the first keyword or hybrid recall of a load, or a consolidation once it is open) and closed
with the space, so a space that is not searched by keyword pays nothing for it.

- Writes while it is closed are kept as pending operations (references to strings the hot tier
  holds anyway) and applied when it opens, if the index on disk was at the LSN the space
  loaded at; otherwise (a crash, a restore, writes past `MAX_PENDING`) it is rebuilt from the
  tiers, which then hold exactly what the space recovered plus what was written since.
- It is derived data: a failure to commit leaves it stale on disk (its LSN then differs from
  the space's, so the next load rebuilds it), never the space failed.
- Backups skip it (a dot folder): a restored space rebuilds it on first use.
"""

from __future__ import annotations

import functools
import logging
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from memspace_contract import wire
from memspace_contract.wire import Lsn
from memspace_server import importing
from memspace_server.storage import tiers

if TYPE_CHECKING:
    import tantivy
else:
    tantivy = importing.lazy("tantivy")  # by the first keyword index opened, not at the start

log = logging.getLogger(__name__)

FOLDER: Final = ".keyword"
FORMAT: Final = 1
"""The schema version; an index of another format is rebuilt."""
WRITER_HEAP: Final = 15_000_000
"""Bytes of tantivy's indexing arena (its minimum for one thread), held only while committing."""
MAX_PENDING: Final = 100_000
"""Writes kept while the index is closed; past that it is rebuilt on its next use instead."""
MAX_PENDING_CHARS: Final = 8 * 1024 * 1024
"""Characters of content those writes may hold (they keep the strings alive after the hot tier
lets them go): past that, too, the index is rebuilt on its next use instead."""
TOKENIZER: Final = "memspace"
STAMP: Final = "stamp"
"""The `meta` term of the one document that records the LSN and format of the index."""

Text = tuple[str, str, Mapping[str, str]]
"""(memory ID, content, tags) of one memory."""


@functools.cache
def _analyzer() -> Any:
    """Words of letters and digits, lowercased, those over 40 characters dropped: the same for
    memories and queries (made once, on first use)."""
    return (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(40))
        .filter(tantivy.Filter.lowercase())
        .build()
    )


def _schema() -> Any:
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("id", stored=True, tokenizer_name="raw")
    builder.add_text_field("content", tokenizer_name=TOKENIZER)
    builder.add_text_field("tags", tokenizer_name=TOKENIZER)
    builder.add_text_field("tag", tokenizer_name="raw")
    builder.add_text_field("meta", tokenizer_name="raw")
    builder.add_unsigned_field("lsn", stored=True)
    builder.add_unsigned_field("format", stored=True)
    return builder.build()


def terms(text: str) -> list[str]:
    """The distinct terms of a query, in order."""
    return list(dict.fromkeys(_analyzer().analyze(text)))


def _tag_text(tags: Mapping[str, str]) -> str:
    return " ".join(f"{key} {value}" for key, value in tags.items())


def _document(memory_id: str, content: str, tags: Mapping[str, str]) -> Any:
    doc = tantivy.Document()
    doc.add_text("id", memory_id)
    doc.add_text("content", content)
    doc.add_text("tags", _tag_text(tags))
    for key, value in tags.items():
        doc.add_text("tag", f"{key}={value}")
    return doc


_Add = tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[tuple[str, str], ...], ...]]
"""A write waiting for the index: its memories' IDs, contents and tags (as (key, value) pairs),
all in plain tuples of strings. The cyclic garbage collector stops tracking such a tuple at its
first look (not a tuple of a subclass, nor one holding a dict), so the writes pending, up to
`MAX_PENDING`, cost its full collections nothing. A dataclass holding the write's lists was
four objects it visited at every full collection for each write: at 20,000 single Remembers to
a space nobody searched by keyword, a full collection stopped the whole process for 52 ms."""

_Remove = str
"""A forget waiting for the index: the memory's ID."""


class KeywordIndex:
    """The keyword index of one loaded space. Blocking methods run in worker threads; writes
    (`add`, `remove`) are called under the space's write lock, searches under its read lock."""

    rebuilds = 0
    """Rebuilds in this process (all spaces), for tests and tools."""

    def __init__(self, root: Path, loaded_lsn: Lsn) -> None:
        self.directory = root / FOLDER
        self._loaded_lsn = loaded_lsn
        self._applied = loaded_lsn
        self._index: Any = None
        self._schema: Any = None
        self._pending: list[_Add | _Remove] = []
        self._pending_count = 0
        self._pending_chars = 0
        self._stale = False
        """Pending writes were dropped: the next open rebuilds."""
        self._committed = Lsn(-1)
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._index is not None

    # -- writes (on the event loop, under the space's write lock) ------------------------------

    def add(
        self,
        ids: Sequence[str],
        contents: Sequence[str],
        tags: Sequence[Mapping[str, str]],
        lsn: int,
    ) -> None:
        """Index memories written at LSN `lsn` (the last of them): a memory given again replaces
        its earlier version."""
        chars = sum(map(len, contents)) if self._index is None else 0
        pairs = (
            tuple(tuple(t.items()) if t else () for t in tags) if any(tags) else ((),) * len(ids)
        )
        self._note((tuple(ids), tuple(contents), pairs), len(ids), chars, lsn)

    def remove(self, memory_id: str, lsn: int) -> None:
        self._note(memory_id, 1, 0, lsn)

    def _note(self, op: _Add | _Remove, count: int, chars: int, lsn: int) -> None:
        self._applied = Lsn(max(self._applied, lsn))
        if self._stale:
            return
        self._pending.append(op)
        self._pending_count += count
        self._pending_chars += chars
        if self._index is None and (
            self._pending_count > MAX_PENDING or self._pending_chars > MAX_PENDING_CHARS
        ):
            self._clear_pending()
            self._stale = True

    def _clear_pending(self) -> None:
        self._pending.clear()
        self._pending_count = 0
        self._pending_chars = 0

    # -- blocking work (worker threads) -----------------------------------------------------

    def ensure_open(self, memories: Callable[[], Iterable[Text]]) -> None:
        """Open the index, rebuilding it from `memories` (every memory the space holds now)
        unless it is at the LSN the space loaded at. Blocking; under the space's read lock."""
        with self._lock:
            if self._index is not None:
                return
            self._schema = _schema()
            index = None
            lsn = None
            if not self._stale and (self.directory / "meta.json").exists():
                try:
                    index = tantivy.Index.open(str(self.directory))
                    index.register_tokenizer(TOKENIZER, _analyzer())
                    lsn = self._stamp(index)
                except Exception:  # a damaged index is rebuilt, never served
                    log.warning("keyword index in %s is unreadable; rebuilding", self.directory)
                    index = None
            if index is not None and lsn == self._loaded_lsn:
                self._index = index
                self._committed = Lsn(lsn)
                self._commit_pending()
                return
            self._rebuild(memories)

    def _stamp(self, index: Any) -> int | None:
        """The LSN a committed index reflects (None: not of this format)."""
        searcher = index.searcher()
        query = tantivy.Query.term_query(index.schema, "meta", STAMP)
        found = searcher.search(query, 1, count=False).hits
        if not found:
            return None
        doc = searcher.doc(found[0][1])
        if doc.get_first("format") != FORMAT:
            return None
        return int(doc.get_first("lsn"))

    def _rebuild(self, memories: Callable[[], Iterable[Text]]) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)
        index = tantivy.Index(self._schema, path=str(self.directory))
        index.register_tokenizer(TOKENIZER, _analyzer())
        writer = index.writer(WRITER_HEAP, 1)
        count = 0
        for memory_id, content, tags in memories():
            writer.add_document(_document(memory_id, content, tags))
            count += 1
        self._clear_pending()
        self._stale = False
        self._index = index
        self._finish(writer)
        KeywordIndex.rebuilds += 1
        log.info(
            "keyword index of %s rebuilt: %d memories at LSN %d",
            self.directory.parent.name,
            count,
            self._applied,
        )

    def _commit_pending(self) -> None:
        if not self._pending and self._committed == self._applied:
            return
        writer = self._index.writer(WRITER_HEAP, 1)
        for op in self._pending:
            if isinstance(op, str):  # a forget
                writer.delete_documents_by_term("id", op)
                continue
            ids, contents, tags = op
            for memory_id, content, pairs in zip(ids, contents, tags, strict=True):
                writer.delete_documents_by_term("id", memory_id)
                writer.add_document(_document(memory_id, content, dict(pairs)))
        self._clear_pending()
        self._finish(writer)

    def _finish(self, writer: Any) -> None:
        """Stamp the LSN, commit (atomic: the stamp and the documents together) and publish."""
        writer.delete_documents_by_term("meta", STAMP)
        stamp = tantivy.Document()
        stamp.add_text("meta", STAMP)
        stamp.add_unsigned("lsn", int(self._applied))
        stamp.add_unsigned("format", FORMAT)
        writer.add_document(stamp)
        writer.commit()
        writer.wait_merging_threads()
        self._committed = self._applied
        self._index.reload()

    def flush(self) -> None:
        """Commit pending writes if the index is open (a consolidation, a close). Blocking."""
        with self._lock:
            if self._index is None:
                return
            try:
                self._commit_pending()
            except Exception:  # derived data: stale on disk, rebuilt at the next load
                log.exception("keyword index in %s: commit failed", self.directory)
                self._index = None
                self._stale = True

    def search(
        self,
        text: str,
        k: int,
        tags: Mapping[str, str],
        min_score: float,
        memories: Callable[[], Iterable[Text]],
    ) -> list[tuple[float, str]]:
        """The top `k` (BM25 score, memory ID) for `text` among memories whose tags match all
        of `tags`, scores at least `min_score`. Blocking; under the space's read lock."""
        self.ensure_open(memories)
        with self._lock:
            self._commit_pending()
            words = terms(text)
            if not words:
                return []
            schema = self._schema
            any_term = tantivy.Query.boolean_query(
                [
                    (tantivy.Occur.Should, tantivy.Query.term_query(schema, field, word))
                    for word in words
                    for field in ("content", "tags")
                ]
            )
            clauses = [(tantivy.Occur.Must, any_term)]
            for key, value in tags.items():
                wanted = tantivy.Query.term_query(schema, "tag", f"{key}={value}")
                clauses.append((tantivy.Occur.Must, tantivy.Query.const_score_query(wanted, 0.0)))
            searcher = self._index.searcher()
            hits = searcher.search(tantivy.Query.boolean_query(clauses), k, count=False).hits
            return [
                (float(score), str(searcher.doc(address).get_first("id")))
                for score, address in hits
                if score >= min_score
            ]

    def close(self, commit: bool = True) -> None:
        """Commit what is pending (if open and `commit`) and let go of the index: no files stay
        open. Without `commit` (a failed space), an index opened in this load loses its stamp:
        it may hold writes the log never made durable, so the next load rebuilds it, even if
        the space's LSN comes back to the same number with other writes."""
        if commit:
            self.flush()
        with self._lock:
            if not commit and self._index is not None:
                self._unstamp()
            self._index = None
            self._clear_pending()

    def _unstamp(self) -> None:
        try:
            writer = self._index.writer(WRITER_HEAP, 1)
            writer.delete_documents_by_term("meta", STAMP)
            writer.commit()
            writer.wait_merging_threads()
        except Exception:  # derived data: without an index the next load rebuilds it
            log.warning("keyword index in %s: removing it after a failure", self.directory)
            shutil.rmtree(self.directory, ignore_errors=True)


RRF_K: Final = 60
"""The constant k of reciprocal-rank fusion: a hit at rank r (from 1) of a list adds
1 / (RRF_K + r). 60 is the value of the paper that introduced it (Cormack et al., 2009)."""


def depth(k: int) -> int:
    """Candidates taken from each list of a hybrid recall before fusing: 2k, at least 50."""
    return min(MAX_DEPTH, max(2 * k, 50))


MAX_DEPTH: Final = 2000


def fuse(lists: Sequence[Sequence[tiers.Candidate]], k: int) -> list[tiers.Candidate]:
    """Reciprocal-rank fusion of ranked (score, tier, id) lists: the top `k` by
    sum over lists of 1 / (RRF_K + rank), ties broken by ID; the score becomes that sum."""
    fused: dict[str, float] = {}
    tier_of: dict[str, wire.TierName] = {}
    for ranked in lists:
        for rank, (_score, tier, memory_id) in enumerate(ranked, start=1):
            fused[memory_id] = fused.get(memory_id, 0.0) + 1.0 / (RRF_K + rank)
            tier_of[memory_id] = tier
    order = sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:k]
    return [(score, tier_of[memory_id], memory_id) for memory_id, score in order]
