"""`memspace backup create|list|restore|delete`: backups of a standalone server's spaces to an
S3-compatible store (`s3://BUCKET/PREFIX`) or a directory (docs/backup.md).

`create` and `restore` work on the data root of a server that is stopped (they open its spaces
themselves); `list` and `delete` need only the target. S3 credentials come from AWS_ACCESS_KEY_ID
and AWS_SECRET_ACCESS_KEY, the endpoint from --endpoint or MEMSPACE_BACKUP_ENDPOINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memspace_contract import spaces

if TYPE_CHECKING:
    from memspace_server.storage import backups, objects


def add_parser(commands: Any) -> None:
    command = commands.add_parser(
        "backup",
        help="back up, list, restore and delete backups of spaces",
        description=(
            "Backups of a standalone server's spaces to s3://BUCKET[/PREFIX] or a directory. "
            "create and restore open the data root themselves: stop the server first."
        ),
    )
    actions = command.add_subparsers(dest="action", required=True, metavar="ACTION")

    def common(action: argparse.ArgumentParser) -> None:
        action.add_argument("target", metavar="TARGET", help="s3://BUCKET[/PREFIX] or a directory")
        action.add_argument(
            "--endpoint",
            default=None,
            metavar="URL",
            help="S3 endpoint, e.g. http://127.0.0.1:9000 for MinIO (default: "
            "MEMSPACE_BACKUP_ENDPOINT, else AWS's)",
        )
        action.add_argument("--region", default=None, help="S3 region (default: AWS_REGION)")
        action.add_argument(
            "-o", "--output", choices=("table", "json"), default="table", help="output format"
        )

    create = actions.add_parser("create", help="back up a space")
    common(create)
    create.add_argument("--data-root", type=Path, required=True, metavar="DIR")
    create.add_argument("--space", default=spaces.DEFAULT_SPACE, metavar="ID")
    create.add_argument(
        "--keep",
        type=int,
        default=None,
        metavar="N",
        help="then delete the space's oldest backups beyond the newest N",
    )
    create.set_defaults(run=run)

    listing = actions.add_parser("list", help="list backups (of one space, or of all)")
    common(listing)
    listing.add_argument("--space", default=None, metavar="ID", help="one space (default: all)")
    listing.set_defaults(run=run)

    restore = actions.add_parser("restore", help="restore a backup into a new space of a data root")
    common(restore)
    restore.add_argument("backup", metavar="BACKUP_ID")
    restore.add_argument("--data-root", type=Path, required=True, metavar="DIR")
    restore.add_argument(
        "--space", default=spaces.DEFAULT_SPACE, metavar="ID", help="the space backed up"
    )
    restore.add_argument(
        "--as",
        dest="as_space",
        default=None,
        metavar="ID",
        help="restore as this space (default: the same ID; it must not exist)",
    )
    restore.set_defaults(run=run)

    delete = actions.add_parser(
        "delete", help="delete a backup and the files no other backup names"
    )
    common(delete)
    delete.add_argument("backup", metavar="BACKUP_ID")
    delete.add_argument("--space", default=spaces.DEFAULT_SPACE, metavar="ID")
    delete.set_defaults(run=run)


def _target(args: argparse.Namespace) -> objects.Target:
    from memspace_server.storage import objects  # noqa: PLC0415  # the server loads lazily

    config = objects.TargetConfig.from_environment(
        args.target, os.environ, endpoint=args.endpoint, region=args.region
    )
    return objects.Target(config)


def _summary(manifest: backups.Manifest) -> dict[str, Any]:
    return {
        "backup": manifest.backup_id,
        "space": manifest.space_id,
        "lsn": manifest.lsn,
        "memories": manifest.memories,
        "files": len(manifest.files),
        "bytes": manifest.bytes,
        "bytesUploaded": manifest.bytes_uploaded,
        "created": manifest.created,
    }


def _print(
    rows: Sequence[dict[str, Any]], output: str, columns: Sequence[str], single: bool
) -> None:
    if output == "json":
        print(json.dumps(rows[0] if single else list(rows)))
        return
    table = [[c.upper() for c in columns]] + [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


COLUMNS = ("backup", "space", "lsn", "memories", "files", "bytes", "bytesUploaded", "created")


async def _create(args: argparse.Namespace) -> list[dict[str, Any]]:
    from memspace_server.storage import backups, registry  # noqa: PLC0415

    target = _target(args)
    space_id = spaces.parse_space_id(args.space)
    reg = registry.standalone(args.data_root, idle_unload_s=float("inf"), exclusive=True)
    try:
        async with reg.lease(space_id) as space:
            manifest = await backups.create(space, target, reg.executor)
    finally:
        await reg.close()
    if args.keep is not None:
        await backups.prune(target, space_id, args.keep)
    return [_summary(manifest)]


async def _list(args: argparse.Namespace) -> list[dict[str, Any]]:
    from memspace_server.storage import backups  # noqa: PLC0415

    target = _target(args)
    ids = [args.space] if args.space else await backups.list_spaces(target)
    rows: list[dict[str, Any]] = []
    for space_id in ids:
        rows.extend(_summary(m) for m in await backups.list_backups(target, space_id))
    return rows


async def _restore(args: argparse.Namespace) -> list[dict[str, Any]]:
    from memspace_server import errors  # noqa: PLC0415
    from memspace_server.storage import backups, registry  # noqa: PLC0415

    target = _target(args)
    new_id = spaces.parse_space_id(args.as_space or args.space)
    reg = registry.standalone(args.data_root, exclusive=True)
    try:
        if reg.catalog.get(new_id) is not None:
            raise errors.BackupRefusedError(
                f"space {new_id!r} exists in {args.data_root}; restore as a new space with "
                "--as ID, or delete it first"
            )
        volume = reg.volume(new_id)
        if backups.restored_from(volume) == (args.space, args.backup):
            # A restore that completed but was stopped before the index entry was written.
            manifest = await backups.read(target, args.space, args.backup)
        else:
            manifest = await backups.restore(
                target, args.space, args.backup, volume, space_id=new_id
            )
        reg.catalog.put(backups.index_entry(manifest, new_id))
    finally:
        await reg.close()
    row = _summary(manifest)
    row["space"] = new_id
    return [row]


async def _delete(args: argparse.Namespace) -> list[dict[str, Any]]:
    from memspace_server.storage import backups  # noqa: PLC0415

    deleted = await backups.delete(_target(args), args.space, args.backup)
    return [{"backup": args.backup, "space": args.space, "deleted": deleted}]


ACTIONS = {"create": _create, "list": _list, "restore": _restore, "delete": _delete}


def run(args: argparse.Namespace) -> int:
    from memspace_server import errors  # noqa: PLC0415
    from memspace_server.api import tracing  # noqa: PLC0415

    # Spans of the backup or restore, exported as the server's are when OTEL_* says so.
    traced = tracing.configure(os.environ, service_name="memspace-backup")
    try:
        rows = asyncio.run(ACTIONS[args.action](args))
    except (errors.MemspaceError, spaces.InvalidSpaceIdError) as err:
        print(f"memspace backup {args.action}: {err}", file=sys.stderr)
        return 1
    finally:
        if traced is not None:
            traced.shutdown()
    columns = ("backup", "space", "deleted") if args.action == "delete" else COLUMNS
    _print(rows, args.output, columns, single=args.action != "list")
    return 0
