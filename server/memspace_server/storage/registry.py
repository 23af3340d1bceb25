"""The registry of the spaces one server holds: lazy loading, leases, idle unload.

A space is loaded on its first request and unloaded (consolidated, files closed, RAM freed) when
idle, Inactive, Offloaded, Restoring or deleted. While a restore fills a space's volume
(`backing_up`) the space is not loaded and its calls get UNAVAILABLE; a space sealed by a final
backup takes no writes until its index entry releases it (a newer generation, Active). Loads of
one space are serialised; loads of different spaces run concurrently. All methods run on the
server's event loop; blocking work goes to the executor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import time
import types
from pathlib import Path

from memspace_contract import durable, index, spaces, wire
from memspace_server import errors
from memspace_server.storage import (
    catalogs,
    checkpoints,
    consolidating,
    layout,
    scheduling,
    tiers,
    wal,
)
from memspace_server.storage.settings import EngineSettings
from memspace_server.storage.spaces import Health, Space

log = logging.getLogger(__name__)

REFUSAL_BACKOFF_S = 5.0
SEAL = ".sealed"
"""`{"generation": N, "reason": "..."}` in a sealed space's directory: the seal outlives a
restart. A dot name, so no backup holds it."""
COUNT_FIGURES = ("memories", "tier_memories", "pressure", "wal_lag_ms")
"""The figures an unloaded space's checkpoint gives, unknown when its WAL holds more."""


def _owns(root: Path, space_id: spaces.SpaceId) -> bool:
    """Whether the volume at `root` is the space's own (or empty, or not mounted): its
    identity file names the space. Blocking."""
    try:
        found = json.loads((root / layout.IDENTITY).read_text()).get("spaceId")
    except FileNotFoundError:
        return True
    except (OSError, ValueError, AttributeError):
        return False
    return bool(found == space_id)


def wal_holds_records(directory: Path) -> bool:
    """Whether any WAL segment holds a record (a consolidated, closed space keeps at most one
    empty segment). Blocking."""
    for _, path in wal.list_segments(directory):
        try:
            if path.stat().st_size > len(wal.MAGIC):
                return True
        except FileNotFoundError:
            continue
    return False


def _read_seal(root: Path) -> tuple[int, str] | None:
    """(generation, reason) of the space's seal, None when it has none. Blocking."""
    try:
        doc = json.loads((root / SEAL).read_text())
        return int(doc["generation"]), str(doc["reason"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        # Unreadable: stay sealed (refusing writes loses nothing; taking them might).
        return 1 << 62, f"the space's seal {root / SEAL} is unreadable ({err})"


def _write_seal(root: Path, generation: int, reason: str) -> None:
    durable.atomic_write(root / SEAL, json.dumps({"generation": generation, "reason": reason}))


def _remove_seal(root: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (root / SEAL).unlink()


class Registry:
    def __init__(
        self,
        catalog: catalogs.Catalog,
        volumes: Path,
        settings: EngineSettings | None = None,
        executor: concurrent.futures.Executor | None = None,
        idle_unload_s: float = 300.0,
    ) -> None:
        self.catalog = catalog
        self.volumes = volumes
        self.settings = settings or EngineSettings()
        self._own_executor = executor is None
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="memspace-io"
        )
        self.pools = scheduling.Pools.create(self.settings, self.executor)
        self.idle_unload_s = idle_unload_s
        self._data_root_lock: int | None = None
        self._spaces: dict[spaces.SpaceId, Space] = {}
        self._locks: dict[spaces.SpaceId, asyncio.Lock] = {}
        self._refused: dict[spaces.SpaceId, tuple[errors.MemspaceError, float]] = {}
        self._closed = False
        self._started = time.monotonic()
        self._history: dict[spaces.SpaceId, consolidating.Rate] = {}
        """Consolidations of the last minute of spaces unloaded since (for their Health)."""
        self._restoring: dict[spaces.SpaceId, str] = {}
        """Spaces whose volume a restore is filling, with what their calls are told."""
        self._seals: dict[spaces.SpaceId, tuple[int, str]] = {}
        """Sealed spaces (loaded or not): the generation of the entry in effect when sealed,
        and why."""

    # -- discovery -------------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Re-read the index; unload spaces that left it or turned Inactive."""
        version = self.catalog.version
        scanned = await asyncio.get_running_loop().run_in_executor(self.executor, self.catalog.scan)
        changed = self.catalog.take(scanned, version)
        if changed:
            await self._settle()
        return changed

    async def apply(
        self, space_id: spaces.SpaceId, entry: index.IndexEntry | None, generation: int
    ) -> tuple[str, int]:
        """Apply one index entry (None: the space's removal at `generation`) at once, ahead of
        the index directory. From its return on new calls see it (an Inactive or removed space
        refuses them) and a loaded space it stops serving is unloaded. Returns the space's
        state in effect ("Active", "Inactive" or "Absent") and that entry's generation."""
        if self.catalog.writable:
            raise errors.ManagedIndexError(
                "this server keeps its own index (standalone): use CreateSpace and DeleteSpace"
            )
        if self.catalog.apply(space_id, entry, generation):
            await self._settle()
        found = self.catalog.get(space_id)
        state = wire.ABSENT if found is None else found.state
        return state, self.catalog.generation(space_id)

    async def _settle(self) -> None:
        """Unload the loaded spaces the index no longer serves; reconfigure the others; lift
        the seals their entries release."""
        await self._release_seals()
        for space_id, space in list(self._spaces.items()):
            entry = self.catalog.get(space_id)
            if entry is None or entry.state == wire.INACTIVE:
                await self.unload(space_id)
            elif entry.state in (wire.OFFLOADED, wire.RESTORING):
                # Its data is in a backup (or coming from one): nothing to consolidate for.
                await self.unload(space_id, consolidate=False)
            else:
                try:
                    space.reconfigure(entry)
                except errors.SpaceConflictError as err:
                    log.error("%s", err)

    def entries(self) -> dict[spaces.SpaceId, index.IndexEntry]:
        return self.catalog.entries()

    def loaded(self) -> dict[spaces.SpaceId, Space]:
        return dict(self._spaces)

    def volume(self, space_id: spaces.SpaceId) -> Path:
        return self.volumes / space_id

    # -- loading ---------------------------------------------------------------------------

    def _lock(self, space_id: spaces.SpaceId) -> asyncio.Lock:
        lock = self._locks.get(space_id)
        if lock is None:
            lock = self._locks[space_id] = asyncio.Lock()
        return lock

    def entry(self, space_id: spaces.SpaceId) -> index.IndexEntry:
        entry = self.catalog.get(space_id)
        if entry is None:
            raise errors.SpaceNotFoundError(f"no space {space_id!r} on this server")
        return entry

    async def load(self, space_id: spaces.SpaceId, entry: index.IndexEntry | None = None) -> Space:
        """The loaded space; `entry` is its index entry where the caller looked it up already
        (None: look it up)."""
        if self._closed:
            raise errors.UnavailableError("the server is shutting down; retry on another shard")
        if entry is None:
            entry = self.entry(space_id)
        self._check_servable(space_id, entry)
        space = self._spaces.get(space_id)
        if space is not None and not space.failed and not space.closing:
            if space.entry is not entry and space.entry != entry:
                space.reconfigure(entry)
            return space
        async with self._lock(space_id):
            space = self._spaces.get(space_id)
            if space is not None and (space.failed or space.closed):
                if space.failed:
                    log.warning("space %s: reloading after a failure", space_id)
                del self._spaces[space_id]
                await space.close(consolidate=False)
                space = None
            if space is None:
                space = await self._open(space_id, entry)
                self._spaces[space_id] = space
            return space

    def _check_servable(self, space_id: spaces.SpaceId, entry: index.IndexEntry) -> None:
        """Refuse a call to a space its state (or a restore in progress) does not serve."""
        restoring = self._restoring.get(space_id)
        if restoring is not None:
            raise errors.SpaceRestoringError(restoring)
        if entry.state == wire.INACTIVE:
            raise errors.SpaceInactiveError(
                f"space {space_id!r} is Inactive: its data is kept but not served. Set its "
                "state to Active to use it"
            )
        if entry.state == wire.OFFLOADED:
            raise errors.SpaceOffloadedError(
                f"space {space_id!r} is Offloaded: its data lives in its final backup, not on "
                "this server. Set its state to Active to restore it and use it"
            )
        if entry.state == wire.RESTORING:
            raise errors.SpaceRestoringError(
                f"space {space_id!r} is Restoring: its data is being restored from a backup; "
                "retry shortly"
            )

    async def _open(self, space_id: spaces.SpaceId, entry: index.IndexEntry) -> Space:
        refused = self._refused.get(space_id)
        if refused is not None and time.monotonic() < refused[1]:
            raise refused[0]
        root = self.volume(space_id)
        try:
            space = await Space.open(root, entry, self.settings, self.pools)
        except errors.SpaceRefusedError as err:
            if refused is None or str(refused[0]) != str(err):
                log.error("space %s refused: %s", space_id, err)
            self._refused[space_id] = (err, time.monotonic() + REFUSAL_BACKOFF_S)
            raise
        self._refused.pop(space_id, None)
        seal = self._seals.get(space_id)
        if seal is None:
            seal = await asyncio.get_running_loop().run_in_executor(self.executor, _read_seal, root)
        if seal is not None:
            if self._releases(entry, seal[0]):
                await asyncio.get_running_loop().run_in_executor(self.executor, _remove_seal, root)
                self._seals.pop(space_id, None)
            else:
                self._seals[space_id] = seal
                space.sealed = seal[1]
        return space

    # -- restores and seals (backing_up) ---------------------------------------------------

    def restoring(self, space_id: spaces.SpaceId, why: str | None) -> None:
        """Mark the space as being restored (its calls get UNAVAILABLE with `why`), or, with
        None, no longer: it loads on its next call."""
        if why is None:
            self._restoring.pop(space_id, None)
            self._refused.pop(space_id, None)
        else:
            self._restoring[space_id] = why

    def is_restoring(self, space_id: spaces.SpaceId) -> bool:
        return space_id in self._restoring

    async def seal(self, space: Space, reason: str) -> None:
        """Refuse the loaded space's writes from now on, with `reason`, until an entry of a
        newer generation than the one in effect now sets it Active (a restart keeps it)."""
        generation = self.catalog.generation(space.id)
        await asyncio.get_running_loop().run_in_executor(
            self.executor, _write_seal, space.directory.root, generation, reason
        )
        self._seals[space.id] = (generation, reason)
        space.sealed = reason

    @staticmethod
    def _releases(entry: index.IndexEntry | None, sealed_at: int) -> bool:
        return entry is not None and entry.state == wire.ACTIVE and entry.generation > sealed_at

    async def _release_seals(self) -> None:
        loop = asyncio.get_running_loop()
        for space_id, (generation, _) in list(self._seals.items()):
            entry = self.catalog.get(space_id)
            if entry is None:
                self._seals.pop(space_id, None)
            elif self._releases(entry, generation):
                await loop.run_in_executor(self.executor, _remove_seal, self.volume(space_id))
                self._seals.pop(space_id, None)
                space = self._spaces.get(space_id)
                if space is not None:
                    space.sealed = None
                log.info(
                    "space %s: its seal is lifted (Active at generation %d)",
                    space_id,
                    entry.generation,
                )

    def lease(self, space_id: spaces.SpaceId, entry: index.IndexEntry | None = None) -> Lease:
        """The loaded space, kept loaded while the caller uses it (`entry` as for `load`):
        `async with registry.lease(space_id) as space`."""
        return Lease(self, space_id, entry)

    # -- standalone management ---------------------------------------------------------------

    async def create(
        self,
        space_id: spaces.SpaceId,
        embedding_dim: int,
        tiers_config: index.Tiers | None = None,
        *,
        quota: index.Quota | None = None,
        token_sha256: str | None = None,
        search: index.SearchIndex | None = None,
        embedding: index.Embedding | None = None,
    ) -> tuple[index.IndexEntry, bool]:
        """Create a space (standalone only). Creating an existing space with the same
        embedding size and model returns it unchanged: (entry, False)."""
        if not self.catalog.writable:
            raise errors.ManagedIndexError(
                "this server's spaces are managed by the memspace operator: create a MemorySpace "
                "resource instead"
            )
        try:
            space_id = spaces.parse_space_id(space_id)
        except spaces.InvalidSpaceIdError as err:
            raise errors.InvalidSpaceIdError(str(err)) from err
        if not 1 <= embedding_dim <= index.MAX_EMBEDDING_DIM:
            raise errors.InvalidArgumentError(
                f"embedding_dim is {embedding_dim}; allowed 1..{index.MAX_EMBEDDING_DIM}"
            )
        async with self._lock(space_id):
            existing = self.catalog.get(space_id)
            if existing is not None:
                if existing.embedding_dim != embedding_dim:
                    raise errors.SpaceConflictError(
                        f"space {space_id!r} exists with embedding_dim {existing.embedding_dim}, "
                        f"not {embedding_dim}"
                    )
                if existing.embedding != embedding:
                    have = existing.embedding.model if existing.embedding else "none"
                    want = embedding.model if embedding else "none"
                    raise errors.SpaceConflictError(
                        f"space {space_id!r} exists with embedding model {have}, not {want}"
                    )
                return existing, False
            entry = index.IndexEntry(
                space_id=space_id,
                embedding_dim=embedding_dim,
                token_sha256=token_sha256,
                tiers=tiers_config or index.Tiers(),
                quota=quota or index.Quota(),
                search=search or index.SearchIndex(),
                embedding=embedding,
            )
            root = self.volume(space_id)
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self.executor, self._make_volume, root, entry)
                await loop.run_in_executor(self.executor, self.catalog.put, entry)
            except OSError as err:
                if not durable.is_disk_full(err):
                    raise
                raise errors.DiskFullError(
                    f"space {space_id!r} was not created: the data volume is full. Free space "
                    "or grow the volume, then retry"
                ) from err
            return entry, True

    @staticmethod
    def _make_volume(root: Path, entry: index.IndexEntry) -> None:
        root.mkdir(parents=True, exist_ok=True)
        layout.open_dir(root, entry.space_id, entry.embedding_dim)

    async def delete(self, space_id: spaces.SpaceId) -> bool:
        """Delete a space and its data (standalone only)."""
        if not self.catalog.writable:
            raise errors.ManagedIndexError(
                "this server's spaces are managed by the memspace operator: delete the "
                "MemorySpace resource instead"
            )
        async with self._lock(space_id):
            if self.catalog.get(space_id) is None:
                return False
            space = self._spaces.pop(space_id, None)
            if space is not None:
                await space.close(consolidate=False)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.executor, self.catalog.remove, space_id)
            await loop.run_in_executor(self.executor, shutil.rmtree, self.volume(space_id), True)
            self._refused.pop(space_id, None)
            self._seals.pop(space_id, None)
            return True

    # -- health and unloading -----------------------------------------------------------------

    async def health(self, space_id: spaces.SpaceId | None = None) -> list[Health]:
        """Health of one space or of all; an unloaded space is described from its checkpoint
        without loading it."""
        wanted = [space_id] if space_id is not None else sorted(self.catalog.entries())
        found = []
        loop = asyncio.get_running_loop()
        for sid in wanted:
            entry = self.entry(sid)
            space = self._spaces.get(sid)
            if space is not None and not space.closed:
                # Health walks the volume for its size (cached a few seconds): off the loop.
                figures = await loop.run_in_executor(self.executor, space.health)
            else:
                figures = await loop.run_in_executor(self.executor, self._unloaded_health, entry)
            found.append(dataclasses.replace(figures, index_generation=entry.generation))
        return found

    def _unloaded_health(self, entry: index.IndexEntry) -> Health:
        """An unloaded space, described without loading it: its counts from its checkpoint when
        its WAL holds nothing more (after a crash it does: the counts are then unknown, never
        0), its consolidation rate from what it did while loaded in the last minute. A volume
        that is not the space's own (refused) reports no figures of it at all."""
        root = self.volume(entry.space_id)
        counts: dict[str, int] = {}
        disk = 0
        unknown: set[str] = set()
        state: wire.SpaceState = entry.state if root.is_dir() else wire.UNMOUNTED
        foreign = entry.space_id in self._refused or not _owns(root, entry.space_id)
        if entry.state in (wire.OFFLOADED, wire.RESTORING) or entry.space_id in self._restoring:
            # Its data is in a backup, or on its way back from one: nothing here to count.
            state = wire.RESTORING if entry.space_id in self._restoring else entry.state
            unknown.update(COUNT_FIGURES)
        elif foreign:
            state = wire.FAILED
            unknown.update(COUNT_FIGURES)
        elif root.is_dir():
            try:
                counts = checkpoints.read_manifest(root / "hot").counts
            except errors.MemspaceError:
                state = wire.FAILED
                unknown.update(COUNT_FIGURES)
            if wal_holds_records(root / "wal"):
                unknown.update(COUNT_FIGURES)  # the WAL holds writes the checkpoint lacks
            disk = layout.SpaceDir(root).disk_bytes()
        history = self._history.get(entry.space_id)
        if history is None and time.monotonic() - self._started < consolidating.RATE_WINDOW_S:
            unknown.add("consolidation_rate")  # consolidations before this server started
        tier_counts = {name: counts.get(name, 0) for name in tiers.NAMES}
        return Health(
            space=entry.space_id,
            state=state,
            memories=sum(tier_counts.values()),
            tier_memories=tier_counts,
            pressure=tier_counts[tiers.HOT] / entry.tiers.hot_capacity,
            wal_lag_ms=0.0,
            consolidation_rate=history.per_second() if history is not None else 0.0,
            disk_bytes=disk,
            unknown=tuple(sorted(unknown)),
        )

    async def unload(self, space_id: spaces.SpaceId, *, consolidate: bool = True) -> bool:
        """Consolidate (unless told not to: the WAL keeps everything anyway) and close a space.
        It stays listed as loaded (and its health live) until it is closed; requests meanwhile
        wait for a fresh load."""
        async with self._lock(space_id):
            space = self._spaces.get(space_id)
            if space is None:
                return False
            try:
                await space.close(consolidate=consolidate)
            finally:
                if self._spaces.get(space_id) is space:
                    del self._spaces[space_id]
                self._history[space_id] = space.rate
            return True

    def close_feeds(self) -> None:
        """End every change-feed stream (at drain), leaving the spaces loaded."""
        for space in self._spaces.values():
            space.end_subscriptions()

    async def maintain(self) -> None:
        """One round of housekeeping: consolidate spaces that are due, unload idle ones."""
        now = time.monotonic()
        for space_id, space in list(self._spaces.items()):
            if space.idle_s(now) > self.idle_unload_s:
                await self.unload(space_id)
            elif space.due_for_consolidation() and not space.failed:
                with contextlib.suppress(errors.MemspaceError):
                    await space.consolidate()

    def hold(self, lock: int | None) -> None:
        """Keep the data root's lock (a file descriptor) until `close`."""
        self._data_root_lock = lock

    async def close(self) -> None:
        """Unload every space (flushing its WAL and tiers) and stop the executor."""
        self._closed = True
        try:
            pending = list(self._spaces)
            # Flush several spaces at a time: each waits mostly on its own fsyncs.
            for start in range(0, len(pending), 16):
                await asyncio.gather(*(self.unload(s) for s in pending[start : start + 16]))
            self.pools.shutdown()
            if self._own_executor:
                self.executor.shutdown(wait=True)
        finally:
            lock, self._data_root_lock = self._data_root_lock, None
            if lock is not None:
                os.close(lock)


class Lease:
    """`Registry.lease`: an async context manager of its own rather than a generator one, as
    every call of every space takes one (a generator's costs two more awaitables a call)."""

    __slots__ = ("_entry", "_held", "_registry", "_space_id")

    def __init__(
        self, registry: Registry, space_id: spaces.SpaceId, entry: index.IndexEntry | None
    ) -> None:
        self._registry = registry
        self._space_id = space_id
        self._entry = entry
        self._held: contextlib.AbstractContextManager[Space] | None = None

    async def __aenter__(self) -> Space:
        space = await self._registry.load(self._space_id, self._entry)
        held = space.leased()
        held.__enter__()
        self._held = held
        return space

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.__exit__(kind, error, traceback)


@dataclasses.dataclass(frozen=True)
class Standalone:
    """Paths of a standalone server's data root."""

    root: Path

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def volumes(self) -> Path:
        return self.root / "spaces"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"


def lock_data_root(root: Path) -> int:
    """Hold a standalone data root for this process (an exclusive flock on `.lock`, released
    when the returned descriptor is closed or the process ends, however it ends); refuse when
    another process holds it. Blocking."""
    paths = Standalone(root)
    paths.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        os.close(fd)
        raise errors.DataRootInUseError(
            f"the data root {paths.root} is in use by another memspace process (a running "
            "server, or a backup or restore); stop it first"
        ) from err
    return fd


def standalone(
    root: Path,
    settings: EngineSettings | None = None,
    idle_unload_s: float = 300.0,
    *,
    exclusive: bool = False,
) -> Registry:
    """The registry of a standalone data root. `exclusive`: hold the data root until the
    registry closes (a server, `memspace backup`), refusing one another process holds."""
    paths = Standalone(root)
    lock = lock_data_root(root) if exclusive else None
    catalog = catalogs.Catalog(paths.index, writable=True)
    catalog.refresh()
    reg = Registry(catalog, paths.volumes, settings, idle_unload_s=idle_unload_s)
    reg.hold(lock)
    return reg
