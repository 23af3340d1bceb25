"""Reconciling one MemorySpace into its children, and cleaning them up at deletion.

`reconcile` is level-based and idempotent: every step reads what exists, by deterministic name,
and writes only what differs, so a re-run after a crash at any line converges with nothing
duplicated or orphaned. The order is chosen so that every crash point is recoverable:

1. the PVC `space-<spaceId>`: the volume, and the cluster-wide claim on the space ID
   (labelled with the shard when it is created);
2. the shard assignment, sticky (the PVC's label), or ShardsFull;
3. the volume size (expansion only);
4. the shard's TLS certificate (see `certifying`), then the credentials Secret with the CA
   bundle, whose token hash goes to the index first (see `credentials`);
5. the index entry (tiers, quota, state, and the MemorySpace's generation) in the shard's index
   Secret, then handed to the shard directly (ApplyIndexEntry): the Secret's projection reaches
   a running shard only about a minute later, the call at once; Ready waits for the shard to
   confirm the generation (here, or through Health);
6. the mount, requested from the shard's mounter (batched, into the intake shard only).

`finalize` undoes them in reverse, tolerating children that never existed or are gone, without
restarting the shard: the space stops serving at once (its index entry), and its volume leaves
the shard's template at the shard's next restart (a Delete claim waits for that, delete-pending).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

from memspace_contract import index, spaces, wire
from memspace_operator import (
    certificates,
    classes,
    credentials,
    errors,
    kube,
    models,
    naming,
    offloading,
    statuses,
    tracing,
    tracking,
    volumes,
)
from memspace_operator.operating import Operator

log = logging.getLogger(__name__)

WAITING_REASONS = ("SpaceIdConflict", "ShardsFull", "VolumePendingDeletion")
ID_REASONS = ("SpaceIdConflict", "VolumePendingDeletion")
"""Waiting for one space ID to be free."""


async def reconcile(op: Operator, body: Mapping[str, Any]) -> None:
    """Bring the children of the MemorySpace `body` in line with its spec."""
    try:
        space = models.parse(body)
        offered(op, space.spec)
    except errors.InvalidSpecError as err:
        await report_invalid(op, body, err)
        raise
    tracked = op.book.track(space)
    await reconcile_tracked(op, tracked)


def offered(op: Operator, spec: models.SpaceSpec) -> None:
    """Refuse a spec.embedding.model the platform does not offer (the chart's
    server.embedding.models): the shards would not embed with it."""
    if spec.embedding is not None and spec.embedding.model not in op.settings.offered_models:
        listed = ", ".join(op.settings.offered_models) or "none"
        raise errors.InvalidSpecError(
            f"spec.embedding.model {spec.embedding.model!r} is not offered on this platform "
            f"(offered: {listed}); the platform admin lists models in the chart's "
            "server.embedding.models"
        )


async def reconcile_tracked(op: Operator, tracked: tracking.Tracked) -> None:
    ref, space_id = tracked.space.ref, tracked.space.spec.space_id
    async with tracked.lock:
        if tracked.space.deleting:
            return
        try:
            with tracing.space_span("memspace.reconcile", ref.namespace, ref.name, space_id):
                await _reconcile(op, tracked)
        except errors.PermanentError as err:
            tracked.observed.problem = statuses.Problem(err.reason, err.message)
            _publish(op, tracked)
            raise


def _publish(op: Operator, tracked: tracking.Tracked) -> None:
    tracked.reconciled = True
    op.book.publish_soon(tracked)


async def _claim(op: Operator, tracked: tracking.Tracked) -> volumes.Claim:
    space = tracked.space
    space_id = space.spec.space_id
    url = kube.pvcs(op.settings.server_namespace, naming.claim_name(space_id))
    # A space never seen with a claim is most likely new: create first, read only if it exists.
    likely_new = tracked.observed.claim_name is None and not tracked.written.get("claimName")
    pvc = None if likely_new else await op.kube.get_or_none(url)
    if pvc is None:
        before = op.assignments.get(space_id)
        if before is None:
            shard = op.assignments.assign(space_id, space.ref.uid)  # tentative until created
        else:
            # Another holder's assignment is not ours to take: the claim decides who holds it.
            shard = before.shard if before.owner_uid == space.ref.uid else None
        try:
            created = await volumes.create(op.kube, op.settings, space, shard)
        except BaseException as err:
            if before is None:
                op.assignments.release(space_id)  # the tentative choice did not stick
            if not isinstance(err, errors.AlreadyExistsError):
                raise
            pvc = await op.kube.get(url)
        else:
            op.recorder.normal(
                space.ref,
                "ClaimCreated",
                f"created PersistentVolumeClaim {op.settings.server_namespace}/"
                f"{naming.claim_name(space_id)} ({space.spec.size})",
            )
            return volumes.Claim(created, fresh=True)

    async def forget_previous_holder(previous: dict[str, Any]) -> None:
        shard = volumes.shard_of(previous)
        if shard is not None:
            await op.index.remove(shard, space_id)

    claim = await volumes.resolve(op.kube, op.settings, space, pvc, forget_previous_holder)
    if claim.fresh:
        op.recorder.normal(
            space.ref,
            "VolumeAdopted",
            f"adopted the released volume {naming.claim_name(space_id)} of space {space_id}, "
            "with its data",
        )
    return claim


async def _reconcile(op: Operator, tracked: tracking.Tracked) -> None:  # noqa: PLR0915  # the steps in order, read in one place
    requested = tracked.requested or tracked.space
    with tracing.step("class"):
        applied = await op.classes.apply(requested)
    tracked.space = space = dataclasses.replace(requested, spec=applied.spec)
    record = offloading.record_of(tracked)
    if space.spec.offloaded and record is not None:
        await _offloaded(op, tracked, record)  # it lives in its final backup
        return
    op.assignments.set_offloaded(space.spec.space_id, False)
    op.assignments.set_inactive(space.spec.space_id, space.spec.state == wire.INACTIVE)
    record = await _reclaim(op, tracked, record)  # back from Offloaded
    with tracing.step("claim"):
        claim = await _claim(op, tracked)
    if claim.pending:
        await _pending_deletion(op, tracked, claim.pvc)
        return
    if claim.conflict is not None:
        await _conflict(op, tracked, claim.conflict)
        return
    op.book.set_owner(tracked, True)
    tracked.observed.claim_name = naming.claim_name(space.spec.space_id)
    with tracing.step("assign"):
        assigned = await _assign(op, tracked, claim.pvc)
    if assigned is None:
        return
    shard, pvc = assigned
    tracked.observed.shard = shard
    tracked.observed.endpoint = op.settings.endpoint(shard)
    with tracing.step("expand"):
        await _expand(op, tracked, pvc)
    fresh = claim.fresh
    if record is not None and fresh:
        # Back from Offloaded on a new volume: the tenant's token stays (its hash and the
        # proof of its Secret were kept in status.offload).
        pvc = await _trust_offloaded_credentials(op, tracked, shard, pvc, record)
        fresh = False
    try:
        with tracing.step("credentials"):
            secret, entry = await _credentials_and_index(op, tracked, shard, pvc, fresh=fresh)
    except errors.SecretNotOwnedError as err:
        await op.index.remove(shard, space.spec.space_id)  # no token of it is known
        tracked.handed = None
        if op.poller.enabled:
            await op.poller.apply(shard, space.spec.space_id, None, space.generation)
        observed = tracked.observed
        before = observed.problem
        _clear_children(observed)
        observed.problem = statuses.Problem(err.reason, err.message)
        if before != observed.problem:
            op.recorder.warning(space.ref, err.reason, err.message)
        _publish(op, tracked)
        return
    with tracing.step("hand_to_shard"):
        await _hand_to_shard(op, tracked, shard, entry)
    op.mounter.request(shard)
    observed = tracked.observed
    before = observed.problem
    observed.problem = _exceeded(applied)
    if observed.problem is not None and observed.problem != before:
        op.recorder.warning(space.ref, observed.problem.reason, observed.problem.message)
    observed.credentials_secret = secret
    observed.volume = op.volume_condition(space.spec.space_id, pvc)
    _observe_mount(op, tracked)
    if (unmonitored := op.unmonitored()) is not None:
        observed.health = unmonitored
    await _backup_steps(op, tracked, shard, pvc=pvc, entry=entry, record=record)


async def _backup_steps(
    op: Operator,
    tracked: tracking.Tracked,
    shard: int,
    *,
    pvc: dict[str, Any],
    entry: index.IndexEntry,
    record: dict[str, Any] | None,
) -> None:
    """Restore the new volume (restoreFrom, back from Offloaded) or take the final backup of
    an offload; then publish the status."""
    tracked.observed.hold = None
    if offloading.wants_restore(tracked):
        with tracing.step("restore"):
            await offloading.restore(op, tracked, shard)
        if not offloading.wants_restore(tracked):
            # Restored: the entry says Active now (it said Restoring), and the shard serves it.
            entry = models.index_entry(tracked.space.spec, entry.token_sha256, entry.generation)
            await op.index.put(shard, entry)
            await _hand_to_shard(op, tracked, shard, entry)
    elif record is not None:
        _reactivated(op, tracked, record)
    if not tracked.space.spec.offloaded and record is None:
        tracked.observed.backup_conditions.pop("Offloaded", None)  # an offload given up
    final = None
    if tracked.space.spec.offloaded:
        with tracing.step("offload"):
            final = await offloading.final_backup(op, tracked)
    if final is None:
        _publish(op, tracked)
        return
    record = offloading.offload_record(final, volumes.credentials_uid(pvc), entry.token_sha256)
    await _offloaded(op, tracked, record)


async def _offloaded(op: Operator, tracked: tracking.Tracked, record: dict[str, Any]) -> None:
    """The space lives in its final backup: its index entry says Offloaded, it counts as
    unmounted (its volume leaves the shard at the shard's next restart), its claim is deleted
    (delete-pending while a pod mounts it). Idempotent."""
    space = tracked.space
    space_id = space.spec.space_id
    assignment = op.assignments.get(space_id)
    if assignment is not None and not assignment.owner_uid:
        # Found Offloaded in a shard's index at start-up: its owner is this MemorySpace.
        op.assignments.record(space_id, assignment.shard, space.ref.uid)
        assignment = op.assignments.get(space_id)
    shard = assignment.shard if assignment is not None else None
    if assignment is not None and assignment.owner_uid == space.ref.uid:
        op.assignments.set_offloaded(space_id, True)
        record = {**record, "shard": int(assignment.shard)}
        entry = await op.index.get(assignment.shard, space_id)
        if entry is not None:
            wanted = offloading.offloaded_entry(
                dataclasses.replace(entry, generation=space.generation)
            )
            if entry != wanted:
                await op.index.put(assignment.shard, wanted)
                if op.poller.enabled:
                    await op.poller.apply(assignment.shard, space_id, wanted, space.generation)
                op.recorder.normal(
                    space.ref,
                    "Unloaded",
                    f"{naming.shard_name(assignment.shard)} unloaded the space (its index entry "
                    f"says {wanted.state})",
                )
        op.mounter.request(assignment.shard)
    url = kube.pvcs(op.settings.server_namespace, naming.claim_name(space_id))
    pvc = await op.kube.get_or_none(url)
    detail = "its volume is deleted"
    if pvc is not None and volumes.owner_uid(pvc) == space.ref.uid:
        if not volumes.is_delete_pending(pvc):
            mounted_on = op.assignments.mounted_on(space_id)
            done = await volumes.release(
                op.kube,
                op.settings,
                space,
                delete=True,
                mounted_by=naming.shard_name(mounted_on) if mounted_on is not None else None,
            )
            op.recorder.normal(space.ref, "VolumeReleased", done)
        if op.assignments.mounted_on(space_id) is not None:
            detail = (
                f"its volume is deleted once {naming.shard_name(shard or 0)} unmounts it, at its "
                "next restart (no shard is restarted for it)"
            )
    before = tracked.observed.backup_conditions.get("Offloaded")
    _clear_children(tracked.observed)
    offloading.show_offloaded(tracked, record, detail)
    if before is None or before.status != "True":
        op.recorder.normal(
            space.ref, "Offloaded", tracked.observed.backup_conditions["Offloaded"].message
        )
    tracked.observed.problem = None
    _publish(op, tracked)


async def _reclaim(
    op: Operator, tracked: tracking.Tracked, record: dict[str, Any] | None
) -> dict[str, Any] | None:
    """Back from Offloaded: a claim still waiting for its shard's restart to be deleted is
    taken back as it is (its data is the final backup's: the space took no write since)."""
    if record is None:
        return None
    space_id = tracked.space.spec.space_id
    found = op.assignments.get(space_id)
    if found is not None and not found.owner_uid:
        # Found Offloaded in a shard's index at start-up: its owner is this MemorySpace.
        op.assignments.record(space_id, found.shard, tracked.space.ref.uid)
    url = kube.pvcs(op.settings.server_namespace, naming.claim_name(space_id))
    pvc = await op.kube.get_or_none(url)
    mounted_on = op.assignments.mounted_on(space_id)
    if (
        pvc is None
        or not volumes.is_delete_pending(pvc)
        or volumes.owner_uid(pvc) != tracked.space.ref.uid
        or mounted_on is None
    ):
        return record
    patch: dict[str, Any] = {
        "metadata": {"labels": {naming.DELETE_PENDING: None, naming.SHARD: str(mounted_on)}}
    }
    if record.get("credentialsUid"):
        patch["metadata"]["annotations"] = {naming.CREDENTIALS_UID: record["credentialsUid"]}
    try:
        await op.kube.patch(url, patch)
    except errors.NotFoundError:
        return record
    op.assignments.record(space_id, mounted_on, tracked.space.ref.uid)
    kept = {**record, "volumeKept": True}
    tracked.observed.backup_status[offloading.OFFLOAD] = kept
    op.recorder.normal(
        tracked.ref,
        "VolumeKept",
        f"claim {naming.claim_name(space_id)} was not deleted yet ({naming.shard_name(mounted_on)} "
        "still mounts it): taken back as it is, with the final backup's data; no restore needed",
    )
    return kept


async def _trust_offloaded_credentials(
    op: Operator, tracked: tracking.Tracked, shard: int, pvc: dict[str, Any], record: dict[str, Any]
) -> dict[str, Any]:
    space = tracked.space
    digest = record.get("tokenSha256")
    if digest:
        await op.index.ensure_secret(shard)
        entry = await op.index.get(shard, space.spec.space_id)
        if entry is None or entry.token_sha256 != digest:
            await op.index.put(shard, models.index_entry(space.spec, digest, space.generation))
    uid = record.get("credentialsUid")
    if uid and volumes.credentials_uid(pvc) != uid:
        pvc = await volumes.record_credentials(op.kube, op.settings, pvc, str(uid))
    return pvc


def _reactivated(op: Operator, tracked: tracking.Tracked, record: dict[str, Any]) -> None:
    """Back from Offloaded on its kept volume: the offload record goes from the status."""
    observed = tracked.observed
    if observed.backup_status.get(offloading.OFFLOAD) == {}:
        return
    observed.backup_status[offloading.OFFLOAD] = {}
    observed.backup_conditions.pop("Offloaded", None)
    op.recorder.normal(
        tracked.ref,
        "Reactivated",
        f"Active again on its kept volume (final backup {record.get('backupId')} stays in "
        f"MemorySpaceBackup {record.get('backup')})",
    )


def _observe_mount(op: Operator, tracked: tracking.Tracked) -> None:
    """Mounted as the shard pods show it now, with the Event when it turns True here."""
    observed = tracked.observed
    mount = op.mount_condition(tracked.space.spec.space_id)
    was_mounted = observed.mount is not None and observed.mount.status == "True"
    if mount is not None and mount.status == "True" and not was_mounted:
        op.recorder.normal(tracked.ref, "Mounted", mount.message)
    observed.mount = mount


def _exceeded(applied: classes.Applied) -> statuses.Problem | None:
    """ClassLimitExceeded for a space served at its class's limits rather than its spec's."""
    if not applied.exceeded:
        return None
    return statuses.Problem(
        "ClassLimitExceeded",
        "; ".join(applied.exceeded)
        + ": the space is served at the class's limits; lower the spec or ask the platform "
        "admin for another class",
    )


async def _conflict(op: Operator, tracked: tracking.Tracked, why: str) -> None:
    op.book.set_owner(tracked, False)
    observed = tracked.observed
    _clear_children(observed)
    observed.problem = statuses.Problem(
        "SpaceIdConflict",
        f"space ID {tracked.space.spec.space_id!r} {why}; set another spec.spaceId (space IDs "
        "are unique in the cluster; a volume kept from a deleted space passes to another "
        "namespace only when a platform admin releases it)",
    )
    op.recorder.warning(tracked.ref, "SpaceIdConflict", observed.problem.message)
    _publish(op, tracked)


async def _pending_deletion(op: Operator, tracked: tracking.Tracked, pvc: dict[str, Any]) -> None:
    op.book.set_owner(tracked, False)
    observed = tracked.observed
    _clear_children(observed)
    space_id = tracked.space.spec.space_id
    shard = op.assignments.mounted_on(space_id)
    where = naming.shard_name(shard) if shard is not None else "its shard"
    observed.problem = statuses.Problem(
        "VolumePendingDeletion",
        f"the volume of a deleted space with ID {space_id!r} is deleted once {where} unmounts "
        "it, at its next restart (no shard is restarted for a deletion); the space gets a new "
        "volume then, or use another spec.spaceId",
    )
    if volumes.owner(pvc) is not None and volumes.owner_namespace(pvc) != tracked.ref.namespace:
        observed.problem = statuses.Problem(
            "SpaceIdConflict",
            f"space ID {space_id!r} is taken outside this namespace; set another spec.spaceId",
        )
    op.recorder.warning(tracked.ref, observed.problem.reason, observed.problem.message)
    _publish(op, tracked)


async def _assign(
    op: Operator, tracked: tracking.Tracked, pvc: dict[str, Any]
) -> tuple[int, dict[str, Any]] | None:
    """The space's shard (sticky: the PVC's label), assigning one if needed; None when every
    shard is full (then the status says ShardsFull)."""
    space = tracked.space
    space_id = space.spec.space_id
    shard = volumes.shard_of(pvc)
    if shard is not None and op.assignments.keeps(space_id, shard):
        op.assignments.record(space_id, shard, space.ref.uid)
        return shard, pvc
    moved_from, moved_entry = None, None
    if shard is not None:
        # Its shard no longer mounts it (unmounted while Inactive, say) and takes no new space:
        # it moves to the intake shard, as a new space would, with its index entry (the trust
        # in its credentials Secret).
        moved_from, moved_entry = shard, await op.index.get(shard, space_id)
        op.assignments.release(space_id)
        op.assignments.set_inactive(space_id, space.spec.state == wire.INACTIVE)
        tracked.handed = None
        log.info("%s: moving from %s to the intake shard", space.ref, naming.shard_name(shard))
    shard = op.assignments.assign(space_id, space.ref.uid)
    if shard is None:
        observed = tracked.observed
        observed.problem = statuses.Problem(
            "ShardsFull",
            f"all {op.settings.max_shards} shards hold {op.settings.max_spaces_per_shard} spaces "
            "(MEMSPACE_MAX_SHARDS, MEMSPACE_MAX_SPACES_PER_SHARD); the space gets a shard when "
            "one has room",
        )
        observed.volume = op.volume_condition(space_id, pvc)
        op.recorder.warning(space.ref, "ShardsFull", observed.problem.message)
        _publish(op, tracked)
        return None
    try:
        if moved_entry is not None:
            await op.index.ensure_secret(shard)
            await op.index.put(shard, moved_entry)
        pvc = await volumes.label_shard(op.kube, op.settings, pvc, shard)
    except BaseException:
        op.assignments.release(space_id)
        raise
    if moved_from is not None:
        await op.index.remove(moved_from, space_id)
        if op.poller.enabled:
            await op.poller.apply(moved_from, space_id, None, space.generation)
        op.mounter.request(moved_from)
    op.recorder.normal(space.ref, "ShardAssigned", f"assigned to {naming.shard_name(shard)}")
    return shard, pvc


async def _credentials_and_index(
    op: Operator, tracked: tracking.Tracked, shard: int, pvc: dict[str, Any], *, fresh: bool
) -> tuple[str, index.IndexEntry]:
    """The credentials Secret and the index entry; returns the Secret's name and the entry."""
    space = tracked.space
    spec = space.spec
    if offloading.wants_restore(tracked):
        spec = dataclasses.replace(spec, state=offloading.RESTORING_STATE)
    await op.index.ensure_secret(shard)
    # A new incarnation of the space ID trusts nothing an earlier one left in the index.
    entry = None if fresh else await op.index.get(shard, spec.space_id)
    trusted = None if entry is None else entry.token_sha256

    async def record(digest: str) -> None:
        await op.index.put(shard, models.index_entry(spec, digest, space.generation))

    async def remember(uid: str) -> None:
        await volumes.record_credentials(op.kube, op.settings, pvc, uid)

    endpoint = op.settings.endpoint(shard)
    await op.certifier.ensure_shard(shard)
    trust = await op.certifier.require_trust()

    async def client_pair() -> certificates.KeyPair | None:
        return await op.certifier.tenant_certificate(spec.space_id)

    proof = None if fresh else volumes.credentials_uid(pvc)
    digest, made = await credentials.ensure(
        op.kube,
        space,
        endpoint,
        trusted,
        record,
        ca=trust,
        client_pair=client_pair,
        proof=proof,
        remember=remember,
        new=fresh,
    )
    secret = naming.credentials_secret(space.ref.name)
    if made:
        op.recorder.normal(
            space.ref, "CredentialsCreated", f"created Secret {secret} with a new token"
        )
    desired = models.index_entry(spec, digest, space.generation)
    if not made and entry != desired:
        await op.index.put(shard, desired)
        op.recorder.normal(
            space.ref,
            "IndexUpdated",
            f"index entry in {naming.index_secret(shard)} now says state {spec.state}, "
            f"hotCapacity {spec.tiers.hot_capacity}, warmCapacity {spec.tiers.warm_capacity}",
        )
    return secret, desired


async def _hand_to_shard(
    op: Operator, tracked: tracking.Tracked, shard: int, entry: index.IndexEntry
) -> None:
    """Hand the entry to the shard unless it confirmed this very entry already (an entry may
    change without a new generation: a MemorySpaceClass's defaults, say). A shard that cannot
    be told now (not started yet, say) gets it from its projected index; Health then reports
    the generation it applies, and the next re-check tells it again."""
    observed = tracked.observed
    observed.confirming = op.poller.enabled
    if not observed.confirming:
        return
    if tracked.handed == entry and observed.index_generation >= entry.generation:
        return
    confirmed = await op.poller.apply(shard, entry.space_id, entry, entry.generation)
    if confirmed is not None:
        tracked.handed = entry
        observed.index_generation = confirmed
        observed.index_confirmed_at = time.monotonic()


async def _expand(op: Operator, tracked: tracking.Tracked, pvc: dict[str, Any]) -> None:
    space = tracked.space
    try:
        expanded = await volumes.expand(op.kube, op.settings, pvc, space.spec.size)
    except (errors.InvalidError, errors.ForbiddenError) as err:
        note = f"expansion to {space.spec.size} refused: {err.api_message}"
        if op.volume_notes.get(space.spec.space_id) != note:
            op.volume_notes[space.spec.space_id] = note
            op.recorder.warning(space.ref, "ExpansionRefused", note)
        return
    op.volume_notes.pop(space.spec.space_id, None)
    if expanded is not None:
        op.recorder.normal(
            space.ref,
            "VolumeExpanding",
            f"asked for {space.spec.size} on claim {naming.claim_name(space.spec.space_id)}",
        )


def _clear_children(observed: statuses.Observed) -> None:
    observed.shard = observed.endpoint = observed.claim_name = None
    observed.credentials_secret = None
    observed.volume = observed.mount = observed.health = None
    observed.figures = None
    observed.figures_time = None


async def report_invalid(op: Operator, body: Mapping[str, Any], err: errors.OperatorError) -> None:
    """Status for a MemorySpace whose spec cannot be parsed (so no `Observed` exists)."""
    metadata = body.get("metadata") or {}
    generation = int(metadata.get("generation") or 0)
    observed = statuses.Observed(
        space_id=str((body.get("spec") or {}).get("spaceId") or metadata.get("name", "")),
        generation=generation,
        problem=statuses.Problem(err.reason, err.message),
    )
    previous = body.get("status") or {}
    status = statuses.render(observed, previous)
    if statuses.same(status, previous):
        return
    url = kube.memoryspaces(metadata.get("namespace", ""), metadata.get("name", ""), "status")
    await op.kube.patch(url, {"status": statuses.merge_patch(status, previous)})


# -- deletion ------------------------------------------------------------------------------------


async def finalize(op: Operator, body: Mapping[str, Any]) -> None:
    """Detach, remove the index entry and the credentials, delete or retain the volume."""
    try:
        space = models.parse(body)
    except errors.InvalidSpecError:
        # Nothing was made for a spec that never parsed (a Secret left by an earlier spec goes
        # with the MemorySpace: its ownerReference lets the garbage collector take it).
        return
    tracked = op.book.track(space)
    async with tracked.lock:
        ref = space.ref
        with tracing.space_span("memspace.finalize", ref.namespace, ref.name, space.spec.space_id):
            await _finalize(op, tracked)
    op.book.forget(space.ref.uid)
    op.recorder.forget(space.ref)


async def _finalize(op: Operator, tracked: tracking.Tracked) -> None:
    space = tracked.space
    space_id = space.spec.space_id
    url = kube.pvcs(op.settings.server_namespace, naming.claim_name(space_id))
    pvc = await op.kube.get_or_none(url)
    if pvc is not None and volumes.owner_uid(pvc) != space.ref.uid:
        log.info("%s: the space ID %s is another's; nothing of it to clean up", space.ref, space_id)
        return
    assignment = op.assignments.get(space_id)
    mine = assignment is not None and assignment.owner_uid == space.ref.uid
    shard = volumes.shard_of(pvc) if pvc is not None else None
    if shard is None and mine and assignment is not None:
        shard = assignment.shard
    if shard is not None:
        # The space stops serving first: its entry leaves the index Secret (the fallback a
        # restarted shard reads) and the shard is told at once. Then the volume detaches.
        removed = await op.index.remove(shard, space_id)
        if op.poller.enabled:
            confirmed = await op.poller.apply(shard, space_id, None, space.generation)
            if confirmed is not None:
                op.recorder.normal(
                    space.ref, "Unserved", f"{naming.shard_name(shard)} no longer serves it"
                )
    if mine:
        # Released once its index entry is gone: an emptied shard is removed from here on.
        op.assignments.release(space_id)
    if shard is not None:
        op.mounter.request(shard)
        op.recorder.normal(
            space.ref,
            "Detached",
            f"{naming.shard_name(shard)} no longer serves it"
            + (" and its index no longer lists it" if removed else "")
            + "; its volume leaves the shard at the shard's next restart",
        )
    await credentials.remove(
        op.kube, space.ref, volumes.credentials_uid(pvc) if pvc is not None else None
    )
    if pvc is not None:
        mounted_on = op.assignments.mounted_on(space_id)
        done = await volumes.release(
            op.kube,
            op.settings,
            space,
            delete=space.spec.reclaim_policy == "Delete",
            mounted_by=naming.shard_name(mounted_on) if mounted_on is not None else None,
        )
        op.recorder.normal(space.ref, "VolumeReleased", done)
    op.volume_notes.pop(space_id, None)
    nudge_waiting(op, space_id)


# -- re-checks -------------------------------------------------------------------------------------


def nudge(op: Operator, space_id: spaces.SpaceId) -> None:
    """Reconcile, soon, the MemorySpace that holds `space_id` (a backup of it ended, say)."""
    tracked = op.book.owner_of(space_id)
    if tracked is not None and not tracked.space.deleting:
        op.spawn(_quietly(op, tracked), name=f"memspace-nudge-{tracked.ref}")


def nudge_waiting(op: Operator, freed: spaces.SpaceId | None = None) -> None:
    """Reconcile, soon, the spaces waiting for a shard slot or for the space ID `freed`."""
    for tracked in op.book.all():
        problem = tracked.observed.problem
        if problem is None or problem.reason not in WAITING_REASONS:
            continue
        if problem.reason in ID_REASONS and tracked.space.spec.space_id != freed:
            continue
        op.spawn(_quietly(op, tracked), name=f"memspace-recheck-{tracked.ref}")


async def _quietly(op: Operator, tracked: tracking.Tracked) -> None:
    try:
        await reconcile_tracked(op, tracked)
    except errors.OperatorError as err:
        log.info("%s: re-check failed (%s); the next one retries", tracked.ref, err)
    except Exception:
        log.exception("%s: re-check failed", tracked.ref)


RESYNC_YIELD_S = 1.0
"""How often a re-check waiting for the operator's API requests to stop queueing looks again."""


async def resync_forever(op: Operator) -> None:
    """Reconcile every tracked space again once per resync interval (drift repair), spread
    evenly over the interval so that 1,000 spaces make a steady trickle of reads, not a burst.
    Re-checks wait while the operator's requests queue for a slot (for at most an interval):
    while 1,000 new spaces were made, re-checks of the first ones were three requests each a
    minute (the claim, the index, a dry-run create of the Secret) beside the new spaces' own."""
    while True:
        spaces_now = [t for t in op.book.all() if not t.space.deleting]
        if not spaces_now:
            await asyncio.sleep(op.settings.resync_interval_s)
            continue
        pause = op.settings.resync_interval_s / len(spaces_now)
        for tracked in spaces_now:
            await asyncio.sleep(pause)
            waited = 0.0
            while op.kube.busy and waited < op.settings.resync_interval_s:
                await asyncio.sleep(RESYNC_YIELD_S)
                waited += RESYNC_YIELD_S
            if op.book.get(tracked.ref.uid) is tracked and not tracked.space.deleting:
                await _quietly(op, tracked)
