"""Restores and offloads of a MemorySpace, steps of its reconcile (reconciling.py).

Restore (`spec.restoreFrom`, or coming back from Offloaded): once the shard mounts the space's
new, empty volume, RestoreSpace fills it from the backup (every file checked against its
SHA-256 before the space serves); until then Ready is False, reason Restoring. The backup must be
a Completed MemorySpaceBackup of the space's namespace, or of another namespace whose target
lists the space's namespace in allowedRestoreNamespaces.

Offload (`spec.state: Offloaded`):
1. a MemorySpaceBackup `<name>-offload-<generation>` (purpose offload: the shard refuses the
   space's writes from its start) is made and taken; the space serves reads meanwhile. A failed
   one leaves the space Active and serving, with Offloaded=False, reason OffloadFailed (change
   the spec, or set Active and Offloaded again, to retry);
2. once it completed: status.offload records it (with the proof of the credentials Secret and
   the token's hash, so the tenant's token survives), the index entry says Offloaded (the shard
   unloads the space and answers FAILED_PRECONDITION), the space counts as not mounted (its
   volume leaves the shard at the shard's next restart, no restart forced), and its PVC is
   deleted, at once when no pod mounts it, else labelled delete-pending and deleted once
   unmounted.
Back to Active: a claim still waiting to be deleted (no shard restart came) is taken back as it
is (its data is the final backup's: the space took no write since); otherwise a new claim is
made, mounted on the intake shard and restored from the offload backup, then it serves.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grpc

from memspace_contract import index, wire
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_operator import backups, errors, kube, models, naming, statuses, targets, tracking
from memspace_operator.operating import Operator

log = logging.getLogger(__name__)

RESTORE_TIMEOUT_S = 3600.0
OFFLOAD = "offload"
RESTORED_FROM = "restoredFrom"
RESTORING_STATE: index.State = wire.RESTORING
"""The index entry's state while the space's volume is filled from a backup: the shard answers
its calls UNAVAILABLE, so no tenant writes into the empty space meanwhile."""


def _hold(tracked: tracking.Tracked, reason: str, message: str) -> None:
    tracked.observed.hold = statuses.Condition("Ready", "False", reason, message)


def record_of(tracked: tracking.Tracked) -> dict[str, Any] | None:
    """status.offload as this operator knows it (the status it read, else what it observed)."""
    found = tracked.observed.backup_status.get(OFFLOAD)
    if found is None:
        found = tracked.space.status.get(OFFLOAD)
    return dict(found) if found else None


def restored(tracked: tracking.Tracked) -> dict[str, Any] | None:
    found = tracked.observed.backup_status.get(RESTORED_FROM)
    if found is None:
        found = tracked.space.status.get(RESTORED_FROM)
    return dict(found) if found else None


# -- restore --------------------------------------------------------------------------------------


async def restore(op: Operator, tracked: tracking.Tracked, shard: int) -> None:
    """Fill the space's volume from its backup once mounted; Ready waits (hold) until done."""
    space = tracked.space
    observed = tracked.observed
    record = record_of(tracked)
    done = restored(tracked)
    source_ns, source_name = _source(space, record)
    if done is not None and (record is None or done.get("backup") == record.get("backup")):
        observed.backup_status[RESTORED_FROM] = done
        if record is not None:
            observed.backup_status[OFFLOAD] = {}
            observed.backup_conditions.pop("Offloaded", None)
        observed.hold = None
        return
    body = await op.kube.get_or_none(kube.memoryspacebackups(source_ns, source_name))
    status = (body or {}).get("status") or {}
    if body is None or status.get("phase") != backups.COMPLETED:
        why = "does not exist" if body is None else f"is {status.get('phase') or 'Pending'}"
        _hold(
            tracked,
            "RestorePending",
            f"MemorySpaceBackup {source_ns}/{source_name} {why}; the space is restored from it "
            "once it is Completed",
        )
        return
    target = await targets.resolve(op.kube, op.settings, str(status.get("target") or ""))
    if not target.allows_restore(source_ns, space.ref.namespace):
        message = (
            f"MemorySpaceBackupTarget {target.name} does not allow restores from namespace "
            f"{source_ns} into {space.ref.namespace} (its allowedRestoreNamespaces)"
        )
        _hold(tracked, "RestoreForbidden", message)
        op.recorder.warning(space.ref, "RestoreForbidden", message)
        return
    mount = observed.mount
    if mount is None or mount.status != "True":
        _hold(
            tracked,
            "Restoring",
            f"waiting for {naming.shard_name(shard)} to mount the new volume, then the space is "
            f"restored from MemorySpaceBackup {source_ns}/{source_name}",
        )
        return
    backup_id = str(status.get("backupId") or "")
    request = pb.RestoreSpaceRequest(
        space=space.spec.space_id,
        target=backups.wire_target(target),
        backup_id=backup_id,
        source_space=str(status.get("spaceId") or space.spec.space_id),
    )
    op.recorder.normal(
        space.ref,
        "Restoring",
        f"{naming.shard_name(shard)} restores the space from backup {backup_id} "
        f"(MemorySpaceBackup {source_ns}/{source_name})",
    )
    admin = await op.poller.admin(shard)
    try:
        answer = await admin.spaces.RestoreSpace(request, timeout=RESTORE_TIMEOUT_S)
    except grpc.aio.AioRpcError as err:
        message = (
            f"{naming.shard_name(shard)} could not restore backup {backup_id}: "
            f"{err.code().name}: {err.details()}"
        )
        _hold(tracked, "RestoreFailed", message)
        op.recorder.warning(space.ref, "RestoreFailed", message)
        if err.code() in backups.RETRIED_CODES:
            raise errors.TemporaryError(message, reason="RestoreRetrying", delay=5.0) from err
        return
    done = {
        "backup": source_name,
        "namespace": source_ns,
        "backupId": backup_id,
        "lsn": int(answer.lsn),
        "memories": int(answer.memories),
        "restoredAt": statuses.now(),
    }
    observed.backup_status[RESTORED_FROM] = done
    observed.backup_status[OFFLOAD] = {}  # the status no longer says Offloaded
    observed.backup_conditions.pop("Offloaded", None)
    observed.backup_conditions["Restored"] = statuses.Condition(
        "Restored",
        "True",
        "Restored",
        f"restored from backup {backup_id} (MemorySpaceBackup {source_ns}/{source_name}): "
        f"{answer.memories} memories at LSN {answer.lsn}",
    )
    observed.hold = None
    op.recorder.normal(
        space.ref,
        "Restored",
        f"restored {answer.memories} memories at LSN {answer.lsn} from backup {backup_id}",
    )


def _source(space: models.MemorySpace, record: dict[str, Any] | None) -> tuple[str, str]:
    if record is not None:
        return space.ref.namespace, str(record.get("backup") or "")
    source = space.spec.restore_from
    assert source is not None
    return source.namespace or space.ref.namespace, source.backup


def wants_restore(tracked: tracking.Tracked) -> bool:
    """Whether the space's volume is to be filled from a backup: restoreFrom on a space not
    restored yet, or a space back from Offloaded on a new volume."""
    if tracked.space.spec.offloaded:
        return False
    record = record_of(tracked)
    if record is not None:
        return not record.get("volumeKept")
    return tracked.space.spec.restore_from is not None and restored(tracked) is None


# -- offload --------------------------------------------------------------------------------------


async def final_backup(op: Operator, tracked: tracking.Tracked) -> dict[str, Any] | None:
    """Make (once) and read the offload's MemorySpaceBackup; its body once Completed."""
    space = tracked.space
    ref = space.ref
    name = naming.offload_backup(ref.name, space.generation)
    url = kube.memoryspacebackups(ref.namespace, name)
    body = await op.kube.get_or_none(url)
    if body is None:
        manifest = naming.backup_object(
            ref.name, ref.namespace, name, target=space.spec.backup.target, purpose=OFFLOAD
        )
        try:
            body = await op.kube.create(kube.memoryspacebackups(ref.namespace), manifest)
        except errors.AlreadyExistsError:
            body = await op.kube.get(url)
        op.recorder.normal(
            ref,
            "Offloading",
            f"taking the final backup (MemorySpaceBackup {name}); the space "
            "takes no writes from now on",
        )
    status = body.get("status") or {}
    phase = status.get("phase") or backups.PENDING
    observed = tracked.observed
    if phase == backups.COMPLETED:
        return body
    if phase == backups.FAILED:
        message = (
            f"the final backup (MemorySpaceBackup {name}) failed: {status.get('message')}; the "
            "space stays on its volume and serves reads, and its writes stay refused until "
            "spec.state is Active again (then Offloaded again to retry)"
        )
        before = observed.backup_conditions.get("Offloaded")
        observed.backup_conditions["Offloaded"] = statuses.Condition(
            "Offloaded", "False", "OffloadFailed", message
        )
        if before is None or before.reason != "OffloadFailed":
            op.recorder.warning(ref, "OffloadFailed", message)
        observed.hold = None
        return None
    message = (
        f"taking the final backup (MemorySpaceBackup {name}, {phase}); the space serves "
        "reads and refuses writes meanwhile"
    )
    observed.backup_conditions["Offloaded"] = statuses.Condition(
        "Offloaded", "False", "BackingUp", message
    )
    _hold(tracked, "Offloading", message)
    return None


def offload_record(
    body: dict[str, Any], credentials_uid: str | None, token_sha256: str | None
) -> dict[str, Any]:
    status = body.get("status") or {}
    record: dict[str, Any] = {
        "backup": body["metadata"]["name"],
        "backupId": status.get("backupId"),
        "target": status.get("target"),
        "lsn": status.get("lsn"),
        "memories": status.get("memories"),
        "offloadedAt": statuses.now(),
    }
    if credentials_uid:
        record["credentialsUid"] = credentials_uid
    if token_sha256:
        record["tokenSha256"] = token_sha256
    return {k: v for k, v in record.items() if v is not None}


def offloaded_entry(entry: index.IndexEntry) -> index.IndexEntry:
    """The index entry of an offloaded space: the shard unloads it and answers its calls
    FAILED_PRECONDITION naming the state."""
    return dataclasses.replace(entry, state=wire.OFFLOADED)


def show_offloaded(tracked: tracking.Tracked, record: dict[str, Any], detail: str) -> None:
    observed = tracked.observed
    observed.backup_status[OFFLOAD] = record
    message = (
        f"offloaded to backup {record.get('backupId')} (MemorySpaceBackup "
        f"{record.get('backup')}) in {record.get('target')}: {record.get('memories')} memories "
        f"at LSN {record.get('lsn')}; {detail}"
    )
    observed.backup_conditions["Offloaded"] = statuses.Condition(
        "Offloaded", "True", "Offloaded", message
    )
    observed.backup_conditions.pop("Restored", None)
    _hold(
        tracked,
        "Offloaded",
        message + "; requests get FAILED_PRECONDITION until spec.state is Active",
    )
