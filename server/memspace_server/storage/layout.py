"""The directory of one space (one volume) and its identity file, `space.json`.

    <root>/space.json   {"spaceId", "embeddingDim", "formatVersion", "created"}
    <root>/wal/ hot/ warm/ cold/

A directory holding another space's identity, or data without any identity, is refused: a wrong
volume is never served as another tenant's."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path

from memspace_contract import durable, spaces
from memspace_server import errors

IDENTITY = "space.json"
RESTORING = ".restore"
"""A restore in progress (or one that failed) fills this directory first (`backups`): a volume
holding it is not served until a restore completes."""
FORMAT_VERSION = 1
PARTS = ("wal", "hot", "warm", "cold")


@dataclasses.dataclass(frozen=True)
class SpaceDir:
    root: Path

    @property
    def wal(self) -> Path:
        return self.root / "wal"

    @property
    def hot(self) -> Path:
        return self.root / "hot"

    @property
    def warm(self) -> Path:
        return self.root / "warm"

    @property
    def cold(self) -> Path:
        return self.root / "cold"

    def disk_bytes(self) -> int:
        total = 0
        stack = [self.root]
        while stack:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
        return total


def _write_identity(root: Path, space_id: spaces.SpaceId, dim: int) -> None:
    doc = {
        "spaceId": space_id,
        "embeddingDim": dim,
        "formatVersion": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    durable.atomic_write(root / IDENTITY, json.dumps(doc))


def open_dir(root: Path, space_id: spaces.SpaceId, dim: int) -> SpaceDir:
    """Open (creating on an empty volume) the directory of `space_id`; refuse a foreign one.
    Blocking: call from a worker thread."""
    identity = root / IDENTITY
    if not root.is_dir():
        raise errors.UnavailableError(
            f"the volume of space {space_id!r} is not mounted yet; retry shortly"
        )
    if (root / RESTORING).exists():
        raise errors.SpaceRefusedError(
            f"a restore into the volume of space {space_id!r} has not completed; it is not "
            "served until a restore succeeds"
        )
    if identity.exists():
        try:
            doc = json.loads(identity.read_text())
            found, found_dim = doc["spaceId"], int(doc["embeddingDim"])
            version = int(doc.get("formatVersion", 1))
        except (ValueError, KeyError, TypeError) as err:
            raise errors.IdentityMismatchError(
                f"{identity} is unreadable ({err}); refusing to serve space {space_id!r} from it"
            ) from err
        if found != space_id:
            raise errors.IdentityMismatchError(
                f"the volume mounted for space {space_id!r} belongs to space {found!r}; "
                "refusing to serve it (check the volume's claim and the spaces index)"
            )
        if found_dim != dim:
            raise errors.IdentityMismatchError(
                f"space {space_id!r} stores {found_dim}-dimensional embeddings but its index "
                f"entry says {dim}; embeddingDim cannot change"
            )
        if version > FORMAT_VERSION:
            raise errors.SpaceRefusedError(
                f"space {space_id!r} has on-disk format {version}; this server reads up to "
                f"{FORMAT_VERSION}: upgrade the server"
            )
    else:
        leftovers = [p.name for p in root.iterdir() if p.name in PARTS and any(p.iterdir())]
        if leftovers:
            raise errors.IdentityMismatchError(
                f"the volume of space {space_id!r} holds data ({', '.join(leftovers)}) but no "
                f"{IDENTITY}; refusing to guess whose it is"
            )
        _write_identity(root, space_id, dim)
    for part in PARTS:
        (root / part).mkdir(exist_ok=True)
    return SpaceDir(root)
