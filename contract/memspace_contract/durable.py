"""Durable file I/O, once for every part that writes files it must find again after a crash: the
WAL, checkpoints, the Zarr tiers, a space's identity file and the spaces index.

- `fsync_file` / `fsync_dir`: flush a file's data, or a directory's entries (a new, renamed or
  removed name survives a power cut only once its directory is flushed).
- `write_file`: write a new file and flush it; `truncate`: cut a file short and flush it.
- `atomic_write`: replace a file whole: a temporary file beside it, flushed, renamed over it, and
  the directory flushed; a reader sees the old content or the new, never a mix.
- `is_disk_full`: whether an OSError means the volume has no room (ENOSPC, or EDQUOT where a
  quota is the limit), which callers report as "disk full" rather than as a fault.

Blocking: call from a worker thread in async code.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(err: BaseException) -> bool:
    """The error says the volume (or the quota on it) has no room left."""
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries: the names created, renamed or removed in it."""
    fsync_file(path)


def fsync_paths(paths: Iterable[Path]) -> None:
    """Flush each existing file of `paths`, then each directory holding one, once."""
    directories: dict[Path, None] = {}
    for path in paths:
        if path.is_file():
            fsync_file(path)
            directories[path.parent] = None
    for directory in directories:
        fsync_dir(directory)


def write_file(path: Path, data: bytes | memoryview, mode: int = 0o666) -> None:
    """Create (or truncate) `path` with `data` and flush it; its directory is not flushed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def truncate(path: Path, size: int) -> None:
    """Cut `path` to `size` bytes, durably."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str, mode: int = 0o666) -> None:
    """Replace `path` with `data` whole and durably (temporary file `.<name>.tmp` beside it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write_file(tmp, data.encode() if isinstance(data, str) else data, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
