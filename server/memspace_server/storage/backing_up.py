"""Backups and restores of a serving server's spaces, asked for by an admin call (SpaceService's
BackupSpace, RestoreSpace, DeleteBackup): `backups` does the copying, this module the rest.

- One backup, restore or backup deletion per space at a time: a second call for the same
  space waits for the first to end. Other spaces, and the space's own calls, go on meanwhile (a
  backup freezes the space's files, not its writes); the files are read and checked in the
  server's own backup threads, never on the event loop nor in the threads that serve other
  spaces' I/O.
- Backups are idempotent by ID: a backup whose manifest is in the target already is answered
  from it; one cut short (the store went away, the server was killed) is taken again and
  uploads only the files the target lacks.
- A final backup (offloading) seals the space before it starts: every write acknowledged
  before it is in the backup, and the space refuses writes from then on (FAILED_PRECONDITION)
  until its index entry releases it (`registry`): Offloaded unloads it, a newer generation in
  state Active lifts the seal.
- A restore fills the space's volume, which must be mounted and hold no memories (nothing in
  its WAL either). Its calls get UNAVAILABLE meanwhile; every file is checked before the space
  serves (`backups.restore`); a restore that fails or is killed leaves a volume that is not
  served until a restore succeeds, and a retried restore replaces it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime
import json
import logging
import re
import shutil
from pathlib import Path

from memspace_contract import durable, spaces, wire
from memspace_server import errors
from memspace_server.storage import backups, checkpoints, layout, objects, registry

log = logging.getLogger(__name__)

BACKUP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
"""A backup ID given by the caller: a Kubernetes object name fits, and it is a safe key."""


@dataclasses.dataclass(frozen=True)
class Taken:
    """A backup as BackupSpace answers it."""

    manifest: backups.Manifest
    bytes_uploaded: int
    """What this call uploaded (0 when the backup was complete already)."""
    started: datetime.datetime
    completed: datetime.datetime


@dataclasses.dataclass(frozen=True)
class Deleted:
    files: int
    bytes: int


def check_backup_id(backup_id: str) -> str:
    if not BACKUP_ID.fullmatch(backup_id) or ".." in backup_id:
        raise errors.InvalidArgumentError(
            f"backup_id {backup_id[:80]!r} is not a valid backup ID: up to 253 characters of "
            "letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return backup_id


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Backups:
    """The backups and restores of one server's spaces (`registry`)."""

    def __init__(self, spaces_registry: registry.Registry, threads: int = 2) -> None:
        self.registry = spaces_registry
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="memspace-backup"
        )
        self._locks: dict[spaces.SpaceId, asyncio.Lock] = {}

    def _lock(self, space_id: spaces.SpaceId) -> asyncio.Lock:
        lock = self._locks.get(space_id)
        if lock is None:
            lock = self._locks[space_id] = asyncio.Lock()
        return lock

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- backups --------------------------------------------------------------------------

    async def backup(
        self,
        space_id: spaces.SpaceId,
        config: objects.TargetConfig,
        backup_id: str = "",
        *,
        final: bool = False,
    ) -> Taken:
        """Back up the space to the target as `backup_id` (empty: a new ID)."""
        backup_id = check_backup_id(backup_id) if backup_id else backups.new_backup_id()
        target = objects.Target(config)
        entry = self.registry.entry(space_id)
        async with self._lock(space_id), self.registry.lease(space_id, entry) as space:
            started = _now()
            if final and space.sealed is None:
                await self.registry.seal(
                    space,
                    f"space {space_id!r} is being Offloaded: its final backup {backup_id!r} "
                    "holds its last writes, and it takes no more until its state is Active "
                    "again (reads are served until it is Offloaded)",
                )
            try:
                done = await backups.read(target, space_id, backup_id)
            except errors.BackupNotFoundError:
                done = None
            if done is not None:
                if final and done.lsn != space.durable_lsn:
                    raise errors.FailedPreconditionError(
                        f"backup {backup_id!r} of space {space_id!r} exists at LSN {done.lsn} "
                        f"but the space has written through LSN {space.durable_lsn} since: it "
                        "cannot be the final backup; take the final backup under a new ID"
                    )
                created = datetime.datetime.fromisoformat(done.created)
                return Taken(done, 0, created, created)
            manifest = await backups.create(space, target, self.executor, backup_id)
        return Taken(manifest, manifest.bytes_uploaded, started, _now())

    async def delete(
        self, space_id: spaces.SpaceId, config: objects.TargetConfig, backup_id: str
    ) -> Deleted:
        """Delete one backup of the space (which need not be on this server any more). It
        waits for a backup of the space in progress here: that backup may name files the
        deletion would otherwise take as unused."""
        target = objects.Target(config)
        check_backup_id(backup_id)
        async with self._lock(space_id):
            files, size = await backups.delete_measured(target, space_id, backup_id)
        return Deleted(files, size)

    # -- restores -------------------------------------------------------------------------

    async def restore(
        self,
        space_id: spaces.SpaceId,
        config: objects.TargetConfig,
        backup_id: str,
        source_space: spaces.SpaceId | None = None,
    ) -> backups.Manifest:
        """Fill the space's empty volume from a backup of `source_space` (default: the same
        space) and serve it (if its state is Active)."""
        source = source_space or space_id
        if not backup_id:
            raise errors.InvalidArgumentError("RestoreSpace needs the backup_id to restore")
        check_backup_id(backup_id)
        target = objects.Target(config)
        entry = self.registry.entry(space_id)
        if entry.state not in (wire.ACTIVE, wire.RESTORING):
            raise errors.FailedPreconditionError(
                f"space {space_id!r} is {entry.state}: a restore goes into an Active or "
                "Restoring space (with its volume mounted)"
            )
        manifest = await backups.read(target, source, backup_id)
        if manifest.embedding_dim != entry.embedding_dim:
            raise errors.FailedPreconditionError(
                f"backup {backup_id!r} of space {source!r} holds {manifest.embedding_dim}-"
                f"dimensional embeddings; space {space_id!r} has embeddingDim "
                f"{entry.embedding_dim}"
            )
        root = self.registry.volume(space_id)
        loop = asyncio.get_running_loop()
        async with self._lock(space_id):
            if await loop.run_in_executor(self.executor, _restored, root, source, backup_id):
                return manifest  # a retry after the restore completed: nothing to do
            loaded = self.registry.loaded().get(space_id)
            if (
                loaded is not None
                and not loaded.closing
                and (loaded.count() or loaded.next_lsn > 1)
            ):
                raise errors.BackupRefusedError(
                    f"space {space_id!r} holds {loaded.count()} memories (written through LSN "
                    f"{loaded.durable_lsn}); a restore goes only into an empty space (a new "
                    "MemorySpace, or a new volume)"
                )
            self.registry.restoring(
                space_id,
                f"space {space_id!r} is Restoring: backup {backup_id!r} of space {source!r} is "
                "being restored into it; retry shortly",
            )
            try:
                await self.registry.unload(space_id, consolidate=False)
                done = await loop.run_in_executor(
                    self.executor, _prepare, root, space_id, source, backup_id
                )
                if not done:
                    manifest = await backups.restore(
                        target, source, backup_id, root, space_id=space_id, executor=self.executor
                    )
            finally:
                self.registry.restoring(space_id, None)
        if self.registry.entry(space_id).state == wire.ACTIVE:
            await self.registry.load(space_id)
        return manifest


def _restored(root: Path, source: str, backup_id: str) -> bool:
    """Whether a restore of `backup_id` of `source` completed on this volume. Blocking."""
    return not (root / layout.RESTORING).exists() and backups.restored_from(root) == (
        source,
        backup_id,
    )


def _prepare(root: Path, space_id: spaces.SpaceId, source: str, backup_id: str) -> bool:
    """Ready the space's volume for a restore of `backup_id`; True when that restore is done
    already (a retry after it completed). Refuses a volume that is not mounted or holds memories
    (or any WAL record); empties one that holds an empty space. Blocking."""
    if not root.is_dir():
        raise errors.UnavailableError(
            f"the volume of space {space_id!r} is not mounted yet; retry the restore shortly"
        )
    staging = root / layout.RESTORING
    identity = root / layout.IDENTITY
    if not staging.exists() and backups.restored_from(root) == (source, backup_id):
        return True
    if identity.exists() and not staging.exists():
        try:
            found = json.loads(identity.read_text()).get("spaceId")
        except (OSError, ValueError, AttributeError):
            found = None
        if found != space_id:
            raise errors.BackupRefusedError(
                f"the volume of space {space_id!r} holds another space ({found!r}); not "
                "restoring over it"
            )
        try:
            counts = checkpoints.read_manifest(root / "hot").counts
        except errors.MemspaceError as err:
            raise errors.BackupRefusedError(
                f"space {space_id!r} is not empty or not readable ({err}); a restore goes "
                "into an empty space"
            ) from err
        memories = sum(counts.values())
        if memories or registry.wal_holds_records(root / "wal"):
            raise errors.BackupRefusedError(
                f"space {space_id!r} holds {memories} memories or unconsolidated writes; a "
                "restore goes only into an empty space (a new MemorySpace, or a new volume)"
            )
    # From here the volume is not served until the restore completes.
    staging.mkdir(exist_ok=True)
    durable.fsync_dir(root)
    identity.unlink(missing_ok=True)
    # Everything else too: the parts, and what the space keeps beside them (its seal, search
    # and keyword indexes of the empty space, which must not pass for the restored one's).
    for path in root.iterdir():
        if path.name in (layout.RESTORING, "lost+found"):  # lost+found: a file system's own
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    durable.fsync_dir(root)
    return False
