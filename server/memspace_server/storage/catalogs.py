"""The catalog: which spaces a server holds, read from a directory of index entries.

Standalone, the server owns the directory (under its data root) and writes it; under the
operator it is the projected index Secret, read-only, reloaded when it changes.

Under the operator a changed entry also arrives directly (`apply`, from the admin RPC
ApplyIndexEntry), long before the kubelet projects the Secret (about once a minute). An applied
entry, or an applied removal, is kept beside the directory's entries and wins over them until
the directory changes after it and then holds a newer generation (a later change the direct call
missed) or agrees with it (the projection caught up: the applied entry is dropped). A projection
of older content, which a kubelet's cache can produce, never undoes an applied change. Applied
entries live in memory only: after a restart the projected Secret, fresh at pod start, is the
truth."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from memspace_contract import index, spaces
from memspace_server import errors

log = logging.getLogger(__name__)

Signature = tuple[tuple[str, int, int], ...]
"""Name, mtime and size of every entry file: a cheap test for 'anything changed'."""


@dataclasses.dataclass(frozen=True)
class Scan:
    signature: Signature
    entries: dict[spaces.SpaceId, index.IndexEntry]
    problems: dict[str, str]


@dataclasses.dataclass(frozen=True)
class Applied:
    """An entry handed to the catalog directly: the entry, or None for a removal."""

    entry: index.IndexEntry | None
    generation: int
    signature: Signature | None
    """The directory's signature when it was applied (None: no scan yet)."""


class Catalog:
    def __init__(self, directory: Path, writable: bool) -> None:
        self.directory = directory
        self.writable = writable
        self._entries: dict[spaces.SpaceId, index.IndexEntry] = {}
        self._signature: Signature | None = None
        self._version = 0
        self.problems: dict[str, str] = {}
        self._scanned: dict[spaces.SpaceId, index.IndexEntry] = {}
        self._applied: dict[spaces.SpaceId, Applied] = {}

    def _current_signature(self) -> Signature:
        if not self.directory.is_dir():
            return ()
        found = []
        for path in self.directory.iterdir():
            if path.name.endswith(index.SUFFIX) and not path.name.startswith("."):
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                found.append((path.name, stat.st_mtime_ns, stat.st_size))
        return tuple(sorted(found))

    @property
    def version(self) -> int:
        """Changes made through this catalog (put/remove); a scan taken before one is stale."""
        return self._version

    def scan(self) -> Scan | None:
        """Read the directory if anything in it changed since the last applied scan; None if
        nothing did. Blocking (a directory listing and reads): call from a worker thread."""
        signature = self._current_signature()
        if signature == self._signature:
            return None
        entries, problems = index.read_directory(self.directory)
        return Scan(signature, entries, problems)

    def take(self, scan: Scan | None, version: int) -> bool:
        """Take a scan's entries unless the catalog was written since `version` (then the next
        scan sees the write). True when the entries changed."""
        if scan is None or version != self._version:
            return False
        self._signature = scan.signature
        for name, problem in scan.problems.items():
            if self.problems.get(name) != problem:
                log.error("ignoring spaces index file %s: %s", name, problem)
        self.problems = scan.problems
        self._scanned = scan.entries
        return self._merge()

    def _merge(self) -> bool:
        """Recompute the entries in effect from the directory's and the applied ones; True when
        they changed."""
        merged = dict(self._scanned)
        for space_id, applied in list(self._applied.items()):
            scanned = self._scanned.get(space_id)
            if scanned == applied.entry:
                del self._applied[space_id]  # the projection caught up
                continue
            moved = applied.signature != self._signature
            if moved and scanned is not None and scanned.generation > applied.generation:
                del self._applied[space_id]  # a later change reached the directory only
                continue
            if applied.entry is None:
                merged.pop(space_id, None)
            else:
                merged[space_id] = applied.entry
        changed = merged != self._entries
        self._entries = merged
        return changed

    def apply(
        self, space_id: spaces.SpaceId, entry: index.IndexEntry | None, generation: int
    ) -> bool:
        """Take one entry (None: the space's removal at `generation`) at once, ahead of the
        directory. True when the entries in effect changed."""
        if entry is not None and entry.space_id != space_id:
            raise errors.InvalidArgumentError(
                f"the entry names space {entry.space_id!r}, the call {space_id!r}"
            )
        self._applied[space_id] = Applied(entry, generation, self._signature)
        return self._merge()

    def generation(self, space_id: spaces.SpaceId) -> int:
        """The generation of the space's entry in effect (of its removal when it has none)."""
        entry = self._entries.get(space_id)
        if entry is not None:
            return entry.generation
        applied = self._applied.get(space_id)
        return applied.generation if applied is not None else 0

    def refresh(self) -> bool:
        """scan + apply in one call (blocking); True when the entries changed."""
        return self.take(self.scan(), self._version)

    def get(self, space_id: spaces.SpaceId) -> index.IndexEntry | None:
        return self._entries.get(space_id)

    def entries(self) -> dict[spaces.SpaceId, index.IndexEntry]:
        return dict(self._entries)

    def _require_writable(self) -> None:
        if not self.writable:
            raise errors.ManagedIndexError(
                "this server's spaces are managed by the memspace operator: create or delete a "
                "MemorySpace resource instead"
            )

    def put(self, entry: index.IndexEntry) -> None:
        self._require_writable()
        # The version moves before and after the write, so a scan that overlaps it in another
        # thread is never applied over it.
        self._version += 1
        index.write_entry(self.directory, entry)
        self._scanned[entry.space_id] = entry
        self._entries[entry.space_id] = entry
        self._signature = None
        self._version += 1

    def remove(self, space_id: spaces.SpaceId) -> bool:
        self._require_writable()
        self._version += 1
        removed = index.remove_entry(self.directory, space_id)
        self._scanned.pop(space_id, None)
        self._entries.pop(space_id, None)
        self._signature = None
        self._version += 1
        return removed
