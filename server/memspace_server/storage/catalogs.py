"""The catalog: which spaces a server holds, read from a directory of index entries.

Standalone, the server owns the directory (under its data root) and writes it; under the
operator it is the projected index Secret, read-only, reloaded when it changes."""

from __future__ import annotations

import logging
from pathlib import Path

from memspace_contract import index, spaces
from memspace_server import errors

log = logging.getLogger(__name__)


class Catalog:
    def __init__(self, directory: Path, writable: bool) -> None:
        self.directory = directory
        self.writable = writable
        self._entries: dict[spaces.SpaceId, index.IndexEntry] = {}
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self.problems: dict[str, str] = {}

    def _current_signature(self) -> tuple[tuple[str, int, int], ...]:
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

    def refresh(self) -> bool:
        """Re-read the directory if anything in it changed; True when the entries changed.
        Blocking (a directory listing): call from a worker thread on a large index."""
        signature = self._current_signature()
        if signature == self._signature:
            return False
        self._signature = signature
        entries, problems = index.read_directory(self.directory)
        for name, problem in problems.items():
            if self.problems.get(name) != problem:
                log.error("ignoring spaces index file %s: %s", name, problem)
        self.problems = problems
        changed = entries != self._entries
        self._entries = entries
        return changed

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
        index.write_entry(self.directory, entry)
        self._entries[entry.space_id] = entry
        self._signature = None

    def remove(self, space_id: spaces.SpaceId) -> bool:
        self._require_writable()
        self._signature = None
        self._entries.pop(space_id, None)
        return index.remove_entry(self.directory, space_id)
