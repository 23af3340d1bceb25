"""Backups of a space to a target (`objects`), incremental, verified on restore.

In the target, per space:

    spaces/<spaceId>/backups/<backupId>.json   the manifest: LSN, memories, every file with its
                                               size and SHA-256, the space's index entry
    spaces/<spaceId>/blobs/<sha256[:2]>/<sha256>  file contents, by checksum

A backup holds the space's files as of one LSN: `space.json`, the checkpoint and what it names
(`hot/`), the Zarr tier generations (`warm/`, `cold/`) and the WAL segments up to that LSN. It is
taken while the space is frozen (`Space.frozen`: no consolidation, the WAL on a new segment), so
the files do not change under it while writes go on. Contents are stored by checksum, so a second
backup uploads only files that changed (a new hot run, new tier chunks, new WAL), and a backup
retried after a failure uploads only what is missing. The manifest is written last: a backup that
failed midway has none and is not listed.

A restore downloads every file into `.restore/` on the destination volume, checks each one's size
and SHA-256, and refuses (`errors.BackupRefusedError`, nothing served) when one is missing or
differs. Only then are the parts moved into place, `space.json` last: a restore cut short leaves
a volume without identity, which the server refuses to serve and a retried restore replaces.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from memspace_contract import durable, index, spaces
from memspace_server import errors, spans
from memspace_server.storage import layout, objects, wal
from memspace_server.storage.spaces import Space

log = logging.getLogger(__name__)

FORMAT = 1
STAGING = layout.RESTORING
"""The directory on a destination volume that a restore fills before moving the parts in."""
SMALL_FILE = 16 * 1024 * 1024
"""Files up to this size are read once into memory, hashed and uploaded from there; larger ones
are hashed as a stream, then uploaded from the file by obstore, in parts."""
CONCURRENCY = 8
"""Files uploaded or downloaded at once."""
BACKUP_ID = re.compile(r"^[0-9]{8}t[0-9]{6}z-[0-9a-f]{6}$")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str
    """Relative to the space's directory, `/`-separated."""
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    backup_id: str
    space_id: spaces.SpaceId
    embedding_dim: int
    lsn: int
    memories: int
    created: str
    files: tuple[FileEntry, ...]
    entry: dict[str, Any]
    """The space's index entry (tiers, quota) when the backup was taken, token excluded."""
    bytes_uploaded: int = 0
    """Bytes this backup uploaded (the rest were in the target already)."""

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "backupId": self.backup_id,
            "spaceId": self.space_id,
            "embeddingDim": self.embedding_dim,
            "lsn": self.lsn,
            "memories": self.memories,
            "created": self.created,
            "bytes": self.bytes,
            "bytesUploaded": self.bytes_uploaded,
            "entry": self.entry,
            "files": [dataclasses.asdict(f) for f in self.files],
        }

    @classmethod
    def from_json(cls, doc: Any) -> Manifest:
        if not isinstance(doc, dict) or int(doc.get("format", 0)) > FORMAT:
            raise ValueError("not a memspace backup manifest this server can read")
        files = []
        for item in doc["files"]:
            path = str(item["path"])
            pure = PurePosixPath(path)
            if pure.is_absolute() or ".." in pure.parts or not pure.parts:
                raise ValueError(f"file path {path!r} leaves the space's directory")
            sha = str(item["sha256"])
            if not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise ValueError(f"file {path!r} has no valid sha256")
            files.append(FileEntry(path, int(item["size"]), sha))
        return cls(
            backup_id=str(doc["backupId"]),
            space_id=spaces.parse_space_id(str(doc["spaceId"])),
            embedding_dim=int(doc["embeddingDim"]),
            lsn=int(doc["lsn"]),
            memories=int(doc["memories"]),
            created=str(doc["created"]),
            files=tuple(files),
            entry=dict(doc.get("entry") or {}),
            bytes_uploaded=int(doc.get("bytesUploaded", 0)),
        )


def _space_prefix(space_id: str) -> str:
    return f"spaces/{space_id}"


def manifest_key(space_id: str, backup_id: str) -> str:
    return f"{_space_prefix(space_id)}/backups/{backup_id}.json"


def blob_key(space_id: str, sha256: str) -> str:
    return f"{_space_prefix(space_id)}/blobs/{sha256[:2]}/{sha256}"


def new_backup_id(now: datetime.datetime | None = None) -> str:
    """A backup ID that sorts by time to the millisecond: `20260102t030405123z-1a2b3c`."""
    now = now or datetime.datetime.now(datetime.UTC)
    return f"{now:%Y%m%dt%H%M%S}{now.microsecond // 1000:03d}z-{secrets.token_hex(3)}"


# -- taking a backup -----------------------------------------------------------------------


def _files_of(root: Path, lsn: int) -> list[tuple[str, Path]]:
    """The files of a frozen space at `lsn`: everything but temporary files (dot names) and WAL
    segments that start after `lsn` (the one taking writes now). Blocking."""
    found: list[tuple[str, Path]] = []
    wal_dir = root / "wal"
    sealed = {path for first, path in wal.list_segments(wal_dir) if first <= lsn}
    for directory, dirnames, filenames in os.walk(root):
        here = Path(directory)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = here / name
            if name.startswith("."):
                continue
            if here == wal_dir and path not in sealed:
                continue
            found.append((path.relative_to(root).as_posix(), path))
    if not sealed:
        # Everything is consolidated: an empty segment names the LSN the log continues from.
        found.append((f"wal/{wal.segment_name(lsn + 1)}", Path()))
    return found


def _read(path: Path) -> tuple[bytes | Path, int, str]:
    """(what to upload, size, sha256) of a file. Blocking."""
    if path == Path():
        data = wal.MAGIC
        return data, len(data), hashlib.sha256(data).hexdigest()
    size = path.stat().st_size
    if size <= SMALL_FILE:
        data = path.read_bytes()
        return data, len(data), hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while piece := file.read(4 * 1024 * 1024):
            digest.update(piece)
    return path, size, digest.hexdigest()


async def _bounded(items: Iterable[T], work: Callable[[T], Awaitable[None]]) -> None:
    """Run `work` on every item, CONCURRENCY at a time; the first failure cancels the rest."""
    queue = list(items)
    queue.reverse()

    async def worker() -> None:
        while queue:
            await work(queue.pop())

    async with asyncio.TaskGroup() as group:
        for _ in range(CONCURRENCY):
            group.create_task(worker())


def _unwrap(err: BaseException) -> BaseException:
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    return err


def _traced(span: Any, manifest: Manifest) -> Manifest:
    if span is not None:
        span.set_attributes(
            {
                "memspace.backup.id": manifest.backup_id,
                "memspace.backup.lsn": manifest.lsn,
                "memspace.backup.files": len(manifest.files),
                "memspace.backup.bytes": manifest.bytes,
                "memspace.backup.bytes_uploaded": manifest.bytes_uploaded,
            }
        )
    return manifest


async def create(
    space: Space,
    target: objects.Target,
    executor: concurrent.futures.Executor | None = None,
    backup_id: str | None = None,
) -> Manifest:
    """Back up a loaded space to `target` while it keeps serving. Raises ObjectStoreError when
    the target fails (no manifest is written; a retry uploads only what is missing)."""
    attributes = {spans.SPACE: space.id} if spans.ENABLED else None
    with spans.span("memspace.backup.create", attributes) as span:
        return _traced(span, await _create(space, target, executor, backup_id))


async def _create(
    space: Space,
    target: objects.Target,
    executor: concurrent.futures.Executor | None,
    backup_id: str | None,
) -> Manifest:
    loop = asyncio.get_running_loop()
    backup_id = backup_id or new_backup_id()
    space_id = space.id
    root = space.directory.root
    async with space.frozen() as (lsn, count):
        listing = await loop.run_in_executor(executor, _files_of, root, lsn)
        present = await target.keys(f"{_space_prefix(space_id)}/blobs")
        entries: dict[str, FileEntry] = {}
        uploading: set[str] = set()
        uploaded = 0

        async def one(item: tuple[str, Path]) -> None:
            nonlocal uploaded
            relative, path = item
            try:
                data, size, sha = await loop.run_in_executor(executor, _read, path)
            except FileNotFoundError as err:
                raise errors.UnavailableError(
                    f"space {space_id!r}: {relative} vanished during the backup; retry it"
                ) from err
            entries[relative] = FileEntry(relative, size, sha)
            key = blob_key(space_id, sha)
            if key in present or sha in uploading:
                return
            uploading.add(sha)
            await target.put(key, data)
            uploaded += size

        try:
            await _bounded(listing, one)
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
    entry = space.entry.to_json()
    entry.pop("tokenSha256", None)
    manifest = Manifest(
        backup_id=backup_id,
        space_id=space_id,
        embedding_dim=space.dim,
        lsn=int(lsn),
        memories=count,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        files=tuple(entries[relative] for relative, _ in listing),
        entry=entry,
        bytes_uploaded=uploaded,
    )
    body = json.dumps(manifest.to_json(), indent=1).encode()
    await target.put(manifest_key(space_id, backup_id), body)
    log.info(
        "space %s: backup %s at LSN %d, %d files, %d bytes (%d uploaded) to %s",
        space_id,
        backup_id,
        lsn,
        len(manifest.files),
        manifest.bytes,
        uploaded,
        target.where,
    )
    return manifest


# -- reading, listing, deleting ---------------------------------------------------------------


async def read(target: objects.Target, space_id: str, backup_id: str) -> Manifest:
    """The manifest of one backup; BackupNotFoundError if there is none."""
    try:
        body = await target.get(manifest_key(space_id, backup_id))
    except objects.MissingObjectError as err:
        raise errors.BackupNotFoundError(
            f"no backup {backup_id!r} of space {space_id!r} in {target.where}"
        ) from err
    try:
        return Manifest.from_json(json.loads(body))
    except (ValueError, KeyError, TypeError) as err:
        raise errors.BackupRefusedError(
            f"the manifest of backup {backup_id!r} of space {space_id!r} is unreadable ({err})"
        ) from err


async def list_backups(target: objects.Target, space_id: str) -> list[Manifest]:
    """The space's backups, oldest first (unreadable manifests are skipped with a warning)."""
    keys = await target.keys(f"{_space_prefix(space_id)}/backups")
    found = []
    for key in sorted(keys):
        backup_id = key.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            found.append(await read(target, space_id, backup_id))
        except errors.BackupRefusedError as err:
            log.warning("%s", err)
    # Two backups in one millisecond (or IDs given by hand) still come in the order they were
    # taken: by LSN first, then by when.
    found.sort(key=lambda b: (b.lsn, b.created, b.backup_id))
    return found


async def list_spaces(target: objects.Target) -> list[str]:
    """The IDs of the spaces with anything in the target."""
    return await target.children("spaces")


async def delete(target: objects.Target, space_id: str, backup_id: str) -> int:
    """Delete a backup: its manifest, then the files no other backup of the space names.
    Returns the number of files deleted."""
    files, _ = await delete_measured(target, space_id, backup_id)
    return files


async def delete_measured(target: objects.Target, space_id: str, backup_id: str) -> tuple[int, int]:
    """`delete`, returning the files deleted and the bytes they and the manifest held."""
    key = manifest_key(space_id, backup_id)
    manifest_bytes = (await target.keys(key.rsplit("/", 1)[0])).get(key, 0)
    doomed = await read(target, space_id, backup_id)
    await target.delete([key])
    kept: set[str] = set()
    for other in await list_backups(target, space_id):
        kept.update(f.sha256 for f in other.files)
    blobs = {blob_key(space_id, f.sha256): f.size for f in doomed.files if f.sha256 not in kept}
    keys = sorted(blobs)
    await target.delete(keys)
    return len(keys), manifest_bytes + sum(blobs.values())


async def prune(target: objects.Target, space_id: str, keep: int) -> list[str]:
    """Delete the oldest backups of the space beyond the newest `keep`; returns their IDs."""
    backups = await list_backups(target, space_id)
    doomed = [b.backup_id for b in backups[: max(0, len(backups) - keep)]]
    for backup_id in doomed:
        await delete(target, space_id, backup_id)
    return doomed


# -- restoring ---------------------------------------------------------------------------------


def _prepare(volume: Path, space_id: str) -> Path:
    """Make the destination ready for a restore into `volume`; returns the staging directory.
    A volume that holds a space is refused; parts left by a restore cut short are removed.
    Blocking."""
    volume.mkdir(parents=True, exist_ok=True)
    identity = volume / layout.IDENTITY
    staging = volume / STAGING
    if identity.exists():
        raise errors.BackupRefusedError(
            f"the volume of space {space_id!r} already holds a space ({identity} exists); a "
            "restore goes to a new space or an empty volume"
        )
    leftovers = [p for p in volume.iterdir() if p.name in layout.PARTS]
    if any(p.is_dir() and any(p.iterdir()) for p in leftovers) and not staging.exists():
        raise errors.BackupRefusedError(
            f"the volume of space {space_id!r} holds data without identity; not restoring over it"
        )
    for part in leftovers:
        shutil.rmtree(part)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def _finish(volume: Path, staging: Path, manifest: Manifest, space_id: str) -> None:
    """Flush the directories of the verified files, give them the new identity, move them into
    place with `space.json` last. Blocking."""
    # Each file was flushed as it was written; their directories now.
    for directory in sorted({(staging / f.path).parent for f in manifest.files}):
        durable.fsync_dir(directory)
    identity = staging / layout.IDENTITY
    doc = json.loads(identity.read_text())
    doc["spaceId"] = space_id
    doc["restoredFrom"] = {"spaceId": manifest.space_id, "backupId": manifest.backup_id}
    durable.atomic_write(identity, json.dumps(doc))
    for part in sorted(staging.iterdir()):
        if part.name != layout.IDENTITY:
            part.rename(volume / part.name)
    for name in layout.PARTS:
        (volume / name).mkdir(exist_ok=True)
    durable.fsync_dir(volume)
    identity.rename(volume / layout.IDENTITY)
    durable.fsync_dir(volume)
    staging.rmdir()
    durable.fsync_dir(volume)


async def restore(
    target: objects.Target,
    source_space: str,
    backup_id: str,
    volume: Path,
    *,
    space_id: spaces.SpaceId | None = None,
    executor: concurrent.futures.Executor | None = None,
) -> Manifest:
    """Restore a backup of `source_space` into the volume directory `volume`, as space
    `space_id` (default: the same). Every file is checked before any is put in place; a missing
    or corrupt one raises BackupRefusedError and leaves the volume unservable (no identity)."""
    attributes = {spans.SPACE: space_id or source_space} if spans.ENABLED else None
    with spans.span("memspace.backup.restore", attributes) as span:
        return _traced(
            span,
            await _restore(
                target, source_space, backup_id, volume, space_id=space_id, executor=executor
            ),
        )


async def _restore(
    target: objects.Target,
    source_space: str,
    backup_id: str,
    volume: Path,
    *,
    space_id: spaces.SpaceId | None,
    executor: concurrent.futures.Executor | None,
) -> Manifest:
    loop = asyncio.get_running_loop()
    manifest = await read(target, source_space, backup_id)
    new_id = space_id or manifest.space_id
    if not any(f.path == layout.IDENTITY for f in manifest.files):
        raise errors.BackupRefusedError(f"backup {backup_id!r} has no {layout.IDENTITY}")
    staging = await loop.run_in_executor(executor, _prepare, volume, new_id)

    async def one(item: FileEntry) -> None:
        path = staging / item.path
        await loop.run_in_executor(executor, lambda: path.parent.mkdir(parents=True, exist_ok=True))
        digest = hashlib.sha256()
        size = 0
        fd = await loop.run_in_executor(
            executor, os.open, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640
        )
        try:
            async for piece in target.stream(blob_key(manifest.space_id, item.sha256)):
                size += len(piece)
                # Hashed and written in a worker thread (hashlib lets go of the GIL), not on
                # the event loop: several files check at once.
                await loop.run_in_executor(executor, _write_all, fd, piece, digest)
            await loop.run_in_executor(executor, os.fsync, fd)
        except objects.MissingObjectError as err:
            raise errors.BackupRefusedError(
                f"backup {backup_id!r} of space {manifest.space_id!r} is incomplete: "
                f"{item.path} (sha256 {item.sha256}) is missing from {target.where}; "
                "nothing was restored"
            ) from err
        finally:
            os.close(fd)
        if size != item.size or digest.hexdigest() != item.sha256:
            raise errors.BackupRefusedError(
                f"backup {backup_id!r} of space {manifest.space_id!r} is corrupt: {item.path} "
                f"has {size} bytes with sha256 {digest.hexdigest()}, the manifest says "
                f"{item.size} bytes with sha256 {item.sha256}; nothing was restored"
            )

    try:
        await _bounded(manifest.files, one)
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None
    await loop.run_in_executor(executor, _finish, volume, staging, manifest, new_id)
    log.info(
        "space %s: restored backup %s of space %s (LSN %d, %d files)",
        new_id,
        backup_id,
        manifest.space_id,
        manifest.lsn,
        len(manifest.files),
    )
    return manifest


def restored_from(volume: Path) -> tuple[str, str] | None:
    """(space, backup) a complete restore put on `volume` came from; None if it holds no
    restored space. Blocking."""
    try:
        origin = json.loads((volume / layout.IDENTITY).read_text()).get("restoredFrom") or {}
        return str(origin["spaceId"]), str(origin["backupId"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_all(fd: int, data: memoryview, digest: Any) -> None:
    digest.update(data)
    while data:
        data = data[os.write(fd, data) :]


def index_entry(manifest: Manifest, space_id: spaces.SpaceId) -> index.IndexEntry:
    """The index entry of a space restored from `manifest` (tiers and quota as backed up)."""
    doc = dict(manifest.entry)
    doc.update(spaceId=space_id, embeddingDim=manifest.embedding_dim, tokenSha256=None)
    return index.parse_entry(doc)
