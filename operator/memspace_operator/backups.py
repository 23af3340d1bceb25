"""MemorySpaceBackup: one backup of a MemorySpace, taken by the shard that serves it.

`run` (create and resume): the backup's ID is fixed from the object (its creation time and
uid), so a re-run after an operator crash asks the shard for the same backup again, which the
shard answers from the target (BackupSpace is idempotent by ID) instead of taking a second
one. Status: phase Pending (waiting for the space, its shard or the target), Running, then
Completed with the LSN, memories, bytes and bytes uploaded, or Failed with the shard's reason;
the same as a `Completed` condition and as Events.

`remove` (deletion, through the finalizer): DeleteBackup on a shard, which deletes the
manifest and the files no other backup of the space names. The backup an Offloaded space lives
in is kept until the space is Active again (or deleted).

The calls go to a shard over the operator's admin channel (health.Poller.admin), with the
target's credentials read from its Secret for each call (targets.resolve).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Mapping
from typing import Any

import grpc

from memspace_contract import spaces
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_operator import errors, kube, models, naming, statuses, targets
from memspace_operator.operating import Operator

log = logging.getLogger(__name__)

BACKUP_TIMEOUT_S = 3600.0
"""The longest one BackupSpace call may take (a big space to a slow store)."""
DELETE_TIMEOUT_S = 600.0
RETRIED_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
"""Answers a retry may cure: the shard restarting or draining, the store busy."""

PENDING, RUNNING, COMPLETED, FAILED = "Pending", "Running", "Completed", "Failed"


@dataclasses.dataclass(frozen=True)
class BackupRef(models.SpaceRef):
    """Which MemorySpaceBackup (Events are posted about it)."""

    def event_target(self) -> dict[str, Any]:
        return {
            "apiVersion": naming.API_VERSION,
            "kind": naming.BACKUP_KIND,
            "metadata": {"namespace": self.namespace, "name": self.name, "uid": self.uid},
        }


@dataclasses.dataclass(frozen=True)
class Backup:
    ref: BackupRef
    memory_space: str
    target: str | None
    created: str
    labels: Mapping[str, str]
    status: Mapping[str, Any]

    @property
    def final(self) -> bool:
        """The final backup of an offload: the shard refuses the space's writes from its start."""
        return self.labels.get(naming.BACKUP_PURPOSE) == "offload"

    @property
    def backup_id(self) -> str:
        """The ID in the target: the status's, else one fixed by the object (sorts by time)."""
        found = self.status.get("backupId")
        if found:
            return str(found)
        return backup_id(self.created, self.ref.uid)


def backup_id(created: str, uid: str) -> str:
    """`20260102t030405000z-1a2b3c` from a creation time and a uid, the shape the server's own
    IDs have (they sort by time)."""
    try:
        when = datetime.datetime.strptime(created, statuses.TIME_FORMAT)
    except ValueError:
        when = datetime.datetime.now(datetime.UTC)
    tail = "".join(c for c in uid.lower() if c in "0123456789abcdef")[:6].ljust(6, "0")
    return f"{when:%Y%m%dt%H%M%S}000z-{tail}"


def parse(body: Mapping[str, Any]) -> Backup:
    metadata = body.get("metadata") or {}
    spec = body.get("spec") or {}
    ref = BackupRef(
        str(metadata.get("namespace", "")), str(metadata.get("name", "")), str(metadata.get("uid"))
    )
    memory_space = spec.get("memorySpace")
    if not isinstance(memory_space, str) or not memory_space:
        raise errors.InvalidSpecError("spec.memorySpace must name a MemorySpace of this namespace")
    target = spec.get("target") or None
    return Backup(
        ref=ref,
        memory_space=memory_space,
        target=str(target) if target else None,
        created=str(metadata.get("creationTimestamp") or ""),
        labels=dict(metadata.get("labels") or {}),
        status=dict(body.get("status") or {}),
    )


def wire_target(target: targets.Target) -> pb.BackupTarget:
    return pb.BackupTarget(
        url=target.url,
        endpoint=target.endpoint,
        region=target.region,
        access_key_id=target.access_key_id,
        secret_access_key=target.secret_access_key,
    )


async def _patch_status(op: Operator, backup: Backup, status: Mapping[str, Any]) -> None:
    url = kube.memoryspacebackups(backup.ref.namespace, backup.ref.name, "status")
    await op.kube.patch(url, {"status": dict(status)})


def _condition(status: statuses.ConditionStatus, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": "Completed",
        "status": status,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": statuses.now(),
    }


async def _pending(op: Operator, backup: Backup, err: errors.OperatorError) -> None:
    """Pending (with the reason) while waiting for the space, its shard or the target."""
    if backup.status.get("phase") != PENDING or backup.status.get("message") != err.message:
        await _patch_status(
            op,
            backup,
            {
                "phase": PENDING,
                "message": err.message,
                "conditions": [_condition("False", err.reason, err.message)],
            },
        )


async def _space(op: Operator, backup: Backup) -> models.MemorySpace:
    body = await op.kube.get_or_none(kube.memoryspaces(backup.ref.namespace, backup.memory_space))
    if body is None:
        raise errors.TemporaryError(
            f"MemorySpace {backup.memory_space!r} does not exist in namespace "
            f"{backup.ref.namespace}",
            reason="SpaceNotFound",
            delay=10.0,
        )
    return models.parse(body)


def shard_of(op: Operator, space: models.MemorySpace) -> int:
    """The shard serving the space (its assignment, owned by this MemorySpace)."""
    found = op.assignments.get(space.spec.space_id)
    if found is None or found.owner_uid != space.ref.uid:
        raise errors.TemporaryError(
            f"MemorySpace {space.ref.name!r} is not served by a shard yet",
            reason="SpaceNotServed",
            delay=5.0,
        )
    return found.shard


async def run(op: Operator, body: Mapping[str, Any], retry: int) -> None:
    """Take the backup (once): Pending, Running, then Completed or Failed."""
    backup = parse(body)
    if backup.status.get("phase") in (COMPLETED, FAILED):
        return
    try:
        space = await _space(op, backup)
        target_name = backup.target or space.spec.backup.target
        target = await targets.resolve(op.kube, op.settings, target_name)
        shard = shard_of(op, space)
        admin = await op.poller.admin(shard)
    except errors.TemporaryError as err:
        await _pending(op, backup, err)
        raise
    backup_id = backup.backup_id
    started = statuses.now()
    if backup.status.get("phase") != RUNNING:
        await _patch_status(
            op,
            backup,
            {
                "phase": RUNNING,
                "backupId": backup_id,
                "spaceId": space.spec.space_id,
                "target": target.name,
                "startedAt": started,
                "message": None,
                "conditions": [
                    _condition(
                        "False",
                        "Running",
                        f"{naming.shard_name(shard)} is backing up space {space.spec.space_id} "
                        f"to {target.name} as {backup_id}",
                    )
                ],
            },
        )
        op.recorder.normal(
            backup.ref,
            "BackupStarted",
            f"{naming.shard_name(shard)} backs up space {space.spec.space_id} to "
            f"MemorySpaceBackupTarget {target.name} as {backup_id}"
            + (" (final: the space takes no writes from now on)" if backup.final else ""),
        )
    request = pb.BackupSpaceRequest(
        space=space.spec.space_id,
        target=wire_target(target),
        backup_id=backup_id,
        final=backup.final,
    )
    try:
        answer = await admin.spaces.BackupSpace(request, timeout=BACKUP_TIMEOUT_S)
    except grpc.aio.AioRpcError as err:
        why = f"{err.code().name}: {err.details()}"
        if err.code() in RETRIED_CODES and retry + 1 < op.settings.backup_attempts:
            raise errors.TemporaryError(
                f"{naming.shard_name(shard)} could not take the backup now ({why})",
                reason="BackupRetrying",
                delay=10.0,
            ) from err
        await _fail(op, backup, f"{naming.shard_name(shard)} refused the backup: {why}")
        return
    completed = _timestamp(answer.completed) if answer.HasField("completed") else statuses.now()
    await _patch_status(
        op,
        backup,
        {
            "phase": COMPLETED,
            "backupId": answer.backup_id or backup_id,
            "lsn": answer.lsn,
            "memories": answer.memories,
            "bytes": answer.bytes,
            "bytesUploaded": answer.bytes_uploaded,
            "startedAt": _timestamp(answer.started) if answer.HasField("started") else started,
            "completedAt": completed,
            "message": None,
            "conditions": [
                _condition(
                    "True",
                    "Completed",
                    f"{answer.memories} memories at LSN {answer.lsn}, {answer.bytes} bytes "
                    f"({answer.bytes_uploaded} uploaded) in {target.name}",
                )
            ],
        },
    )
    op.recorder.normal(
        backup.ref,
        "BackupCompleted",
        f"{answer.memories} memories at LSN {answer.lsn}: {answer.bytes} bytes, "
        f"{answer.bytes_uploaded} of them uploaded",
    )
    op.nudge(space.spec.space_id)


async def _fail(op: Operator, backup: Backup, message: str) -> None:
    await _patch_status(
        op,
        backup,
        {
            "phase": FAILED,
            "message": message,
            "completedAt": statuses.now(),
            "conditions": [_condition("False", "BackupFailed", message)],
        },
    )
    op.recorder.warning(backup.ref, "BackupFailed", message)
    try:
        space = await _space(op, backup)
    except errors.OperatorError:
        return
    op.nudge(space.spec.space_id)


def _timestamp(value: Any) -> str:
    when: datetime.datetime = value.ToDatetime(tzinfo=datetime.UTC)
    return when.strftime(statuses.TIME_FORMAT)


async def remove(op: Operator, body: Mapping[str, Any]) -> None:
    """Delete the backup from its target (unless an Offloaded space lives in it)."""
    backup = parse(body)
    backup_id = backup.status.get("backupId")
    if not backup_id:
        return  # never started: nothing in the target
    space_body = await op.kube.get_or_none(
        kube.memoryspaces(backup.ref.namespace, backup.memory_space)
    )
    space = models.parse(space_body) if space_body is not None else None
    if space is not None and not space.deleting:
        lives_in = (space.status.get("offload") or {}).get("backup")
        if lives_in == backup.ref.name and space.spec.offloaded:
            raise errors.TemporaryError(
                f"MemorySpace {space.ref.name!r} is Offloaded and lives in this backup; it is "
                "deleted once the space is Active again (or deleted)",
                reason="BackupInUse",
                delay=30.0,
            )
    target = await targets.resolve(
        op.kube, op.settings, str(backup.status.get("target") or "") or backup.target
    )
    space_id = spaces.SpaceId(str(backup.status.get("spaceId") or ""))
    shard = _any_shard(op, space_id)
    if shard is None:
        op.recorder.warning(
            backup.ref,
            "BackupKept",
            f"no shard runs to delete backup {backup_id} from {target.name}; its manifest stays "
            "(memspace backup delete removes it)",
        )
        return
    admin = await op.poller.admin(shard)
    request = pb.DeleteBackupRequest(
        space=space_id, target=wire_target(target), backup_id=str(backup_id)
    )
    try:
        answer = await admin.spaces.DeleteBackup(request, timeout=DELETE_TIMEOUT_S)
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            return
        raise errors.TemporaryError(
            f"{naming.shard_name(shard)} could not delete backup {backup_id}: "
            f"{err.code().name}: {err.details()}",
            reason="BackupDeleteRetrying",
            delay=10.0,
        ) from err
    op.recorder.normal(
        backup.ref,
        "BackupDeleted",
        f"deleted backup {backup_id} from {target.name} ({answer.bytes_deleted} bytes freed)",
    )


def _any_shard(op: Operator, space_id: spaces.SpaceId) -> int | None:
    """The space's shard when it has one, else any shard (every shard takes admin calls)."""
    found = op.assignments.get(space_id) if space_id else None
    if found is not None:
        return int(found.shard)
    shards = op.assignments.shards
    return int(shards[0]) if shards else None
