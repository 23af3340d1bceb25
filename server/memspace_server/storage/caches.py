"""The decompressed-chunk cache of one server: cold-tier embedding chunks kept in RAM so that a
repeated recall does not decompress them again.

Bounded in bytes for the whole server and shared fairly: when it is full, the least recently used
chunk of the space holding the most bytes goes first, and only for a space holding fewer, so a
space scanning a huge cold tier takes the cache only as far as no other space wants it.
Thread-safe (scans run in worker threads); loading happens outside the lock, so two threads may
decompress the same chunk at once, and the second copy simply replaces the first.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable

import numpy as np
import numpy.typing as npt

Chunk = npt.NDArray[np.float32]


class ChunkCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._spaces: dict[str, collections.OrderedDict[Hashable, Chunk]] = {}
        self._bytes: collections.Counter[str] = collections.Counter()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(self._bytes.values())

    def space_bytes(self, space: str) -> int:
        return self._bytes[space]

    def for_space(self, space: str) -> SpaceChunks:
        return SpaceChunks(self, space)

    def get(self, space: str, key: Hashable) -> Chunk | None:
        with self._lock:
            entries = self._spaces.get(space)
            found = entries.get(key) if entries is not None else None
            if found is None:
                self.misses += 1
                return None
            entries.move_to_end(key)  # type: ignore[union-attr]  # found implies entries
            self.hits += 1
            return found

    def put(self, space: str, key: Hashable, chunk: Chunk) -> None:
        """Keep a chunk if there is room, making room from the space holding the most. When
        that is the space itself, the chunk is not kept: a recall scans every chunk of a tier
        in turn, so for a tier larger than the cache, evicting its own chunks to keep newer
        ones would miss on every chunk, while keeping the first ones hits on all of those."""
        size = chunk.nbytes
        if size > self.capacity_bytes:
            return
        chunk.flags.writeable = False
        with self._lock:
            entries = self._spaces.get(space)
            old = entries.pop(key, None) if entries is not None else None
            if old is not None:
                self._bytes[space] -= old.nbytes
            if not self._make_room(space, size):
                return
            self._spaces.setdefault(space, collections.OrderedDict())[key] = chunk
            self._bytes[space] += size

    def _make_room(self, space: str, size: int) -> bool:
        total = sum(self._bytes.values())
        while total + size > self.capacity_bytes:
            largest = max(self._bytes, key=self._bytes.__getitem__)
            if largest == space or self._bytes[largest] <= self._bytes[space] + size:
                return False
            entries = self._spaces[largest]
            _key, chunk = entries.popitem(last=False)
            self._bytes[largest] -= chunk.nbytes
            total -= chunk.nbytes
            if not entries:
                del self._spaces[largest]
                del self._bytes[largest]
        return True

    def discard(self, space: str, keep: Callable[[Hashable], bool]) -> None:
        """Drop the space's chunks whose key `keep` refuses."""
        with self._lock:
            entries = self._spaces.get(space)
            if entries is None:
                return
            for key in [k for k in entries if not keep(k)]:
                self._bytes[space] -= entries.pop(key).nbytes
            if not entries:
                del self._spaces[space]
                del self._bytes[space]

    def clear(self) -> None:
        with self._lock:
            self._spaces.clear()
            self._bytes.clear()


class SpaceChunks:
    """The cache as one space sees it."""

    def __init__(self, cache: ChunkCache, space: str) -> None:
        self.cache = cache
        self.space = space

    def get(self, key: Hashable) -> Chunk | None:
        return self.cache.get(self.space, key)

    def put(self, key: Hashable, chunk: Chunk) -> None:
        self.cache.put(self.space, key, chunk)

    def discard(self, keep: Callable[[Hashable], bool]) -> None:
        self.cache.discard(self.space, keep)
