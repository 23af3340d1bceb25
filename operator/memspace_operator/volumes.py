"""A space's PersistentVolumeClaim `space-<spaceId>` in the server namespace: its volume, and
the cluster-wide claim on its space ID.

The PVC's name is derived from the space ID, so the API server lets only one exist: whoever
created it (annotation memspace.dev/owner-uid) holds the ID. A later MemorySpace claiming the
same ID is a SpaceIdConflict, unless the holder is gone or let the volume go (`Retain` on
deletion labels it retained) *and* the claimant is in the volume's owner namespace: then it
adopts the volume, data included. A volume passes to another namespace only when a platform
admin annotates it `memspace.dev/release-to-namespace: <namespace>`.

A conflict's message never names another namespace or its objects: whether some other tenant
holds an ID, and who, is not a claimant's business.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

from memspace_operator import errors, kube, models, naming, statuses
from memspace_operator.settings import Settings


@dataclasses.dataclass(frozen=True)
class Claim:
    pvc: dict[str, Any]
    fresh: bool = False
    """Created or adopted by this reconcile: a new incarnation of the space ID, so nothing
    found in the index about it can be trusted."""
    conflict: str | None = None
    """Set for a SpaceIdConflict: why, in words safe to show the claimant (the holder is named
    only when it is in the claimant's own namespace)."""
    pending: bool = False
    """The claim is a deleted space's, waiting to be deleted once its shard unmounts it: the
    space ID is free only then."""


def owner_uid(pvc: dict[str, Any]) -> str | None:
    return (pvc.get("metadata", {}).get("annotations") or {}).get(naming.OWNER_UID)


def owner(pvc: dict[str, Any]) -> tuple[str, str] | None:
    full = (pvc.get("metadata", {}).get("annotations") or {}).get(naming.OWNER_FULL_NAME, "")
    namespace, _, name = full.partition("/")
    return (namespace, name) if namespace and name else None


def owner_namespace(pvc: dict[str, Any]) -> str | None:
    """The namespace the volume belongs to: its holder's, or its last holder's when retained."""
    found = owner(pvc)
    if found is not None:
        return found[0]
    return labels(pvc).get(naming.OWNER_NAMESPACE) or None


def released_to(pvc: dict[str, Any]) -> str | None:
    """The namespace a platform admin released the volume to, if any."""
    return (pvc.get("metadata", {}).get("annotations") or {}).get(naming.RELEASE_TO) or None


def credentials_uid(pvc: dict[str, Any]) -> str | None:
    return (pvc.get("metadata", {}).get("annotations") or {}).get(naming.CREDENTIALS_UID) or None


def labels(pvc: dict[str, Any]) -> dict[str, str]:
    found: dict[str, str] = pvc.get("metadata", {}).get("labels") or {}
    return found


def shard_of(pvc: dict[str, Any]) -> int | None:
    value = labels(pvc).get(naming.SHARD, "")
    return int(value) if value.isdigit() else None


def is_retained(pvc: dict[str, Any]) -> bool:
    return labels(pvc).get(naming.RETAINED) == "true"


def is_delete_pending(pvc: dict[str, Any]) -> bool:
    return labels(pvc).get(naming.DELETE_PENDING) == "true"


def _identity(space: models.MemorySpace) -> dict[str, Any]:
    ref = space.ref
    return {
        "labels": {
            **naming.space_labels(space.spec.space_id, ref.namespace, ref.name),
            naming.RETAINED: None,
        },
        "annotations": {naming.OWNER_UID: ref.uid, naming.OWNER_FULL_NAME: str(ref)},
    }


def _adoption(space: models.MemorySpace) -> dict[str, Any]:
    """The identity patch of an adoption: the new holder, no release, no earlier credentials."""
    identity = _identity(space)
    identity["annotations"] = {
        **identity["annotations"],
        naming.RELEASE_TO: None,
        naming.CREDENTIALS_UID: None,
    }
    return identity


def manifest(settings: Settings, space: models.MemorySpace, shard: int | None) -> dict[str, Any]:
    spec = space.spec
    identity = _identity(space)
    metadata_labels = {k: v for k, v in identity["labels"].items() if v is not None}
    if shard is not None:
        metadata_labels[naming.SHARD] = str(shard)
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": naming.claim_name(spec.space_id),
            "namespace": settings.server_namespace,
            "labels": metadata_labels,
            "annotations": identity["annotations"],
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "volumeMode": "Filesystem",
            "resources": {"requests": {"storage": spec.size}},
        },
    }
    storage_class = spec.storage_class or settings.storage_class
    if spec.volume_name:
        # A pre-made PersistentVolume: bound by name; without a class of its own the claim asks
        # for none (""), so the default class's provisioner does not make another volume.
        body["spec"]["volumeName"] = spec.volume_name
        body["spec"]["storageClassName"] = spec.storage_class or ""
    elif storage_class:
        body["spec"]["storageClassName"] = storage_class
    return body


async def _holder_exists(client: kube.Kube, pvc: dict[str, Any]) -> bool:
    found = owner(pvc)
    uid = owner_uid(pvc)
    if found is None or uid is None:
        return False
    holder = await client.get_or_none(kube.memoryspaces(*found))
    return holder is not None and holder["metadata"].get("uid") == uid


async def create(
    client: kube.Kube, settings: Settings, space: models.MemorySpace, shard: int | None
) -> dict[str, Any]:
    """Create the space's PVC, labelled with its shard when it has one; errors.AlreadyExists
    when a PVC of that name exists."""
    return await client.create(
        kube.pvcs(settings.server_namespace), manifest(settings, space, shard)
    )


async def resolve(
    client: kube.Kube,
    settings: Settings,
    space: models.MemorySpace,
    pvc: dict[str, Any],
    before_adopting: Callable[[dict[str, Any]], Awaitable[None]],
) -> Claim:
    """Whose is the existing PVC: this space's, free to adopt (then adopted, after
    `before_adopting` cleaned up what the previous holder left), or another's (a conflict)."""
    if is_delete_pending(pvc):
        return Claim(pvc, pending=True)
    if owner_uid(pvc) == space.ref.uid:
        return Claim(pvc)
    namespace = space.ref.namespace
    may_adopt = released_to(pvc) or owner_namespace(pvc)
    if may_adopt == namespace and (is_retained(pvc) or not await _holder_exists(client, pvc)):
        await before_adopting(pvc)
        url = kube.pvcs(settings.server_namespace, pvc["metadata"]["name"])
        patch = {
            "metadata": {**_adoption(space), "resourceVersion": pvc["metadata"]["resourceVersion"]}
        }
        try:
            adopted = await client.patch(url, patch)
        except errors.ConflictError as err:
            raise errors.TemporaryError(
                f"the volume {url} changed while being adopted; retrying", delay=1.0
            ) from err
        return Claim(adopted, fresh=True)
    holder = owner(pvc)
    if holder is not None and holder[0] == namespace and not is_retained(pvc):
        return Claim(pvc, conflict=f"is held by MemorySpace {holder[1]} in this namespace")
    # Nothing about the holder: not its namespace, not whether it is alive or a retained volume.
    return Claim(pvc, conflict="is taken outside this namespace")


async def label_shard(
    client: kube.Kube, settings: Settings, pvc: dict[str, Any], shard: int
) -> dict[str, Any]:
    url = kube.pvcs(settings.server_namespace, pvc["metadata"]["name"])
    return await client.patch(url, {"metadata": {"labels": {naming.SHARD: str(shard)}}})


async def record_credentials(
    client: kube.Kube, settings: Settings, pvc: dict[str, Any], uid: str
) -> dict[str, Any]:
    """Record on the PVC the uid of the credentials Secret the operator just created."""
    url = kube.pvcs(settings.server_namespace, pvc["metadata"]["name"])
    return await client.patch(url, {"metadata": {"annotations": {naming.CREDENTIALS_UID: uid}}})


def requested(pvc: dict[str, Any]) -> str | None:
    storage: str | None = (
        pvc.get("spec", {}).get("resources", {}).get("requests", {}).get("storage")
    )
    return storage


async def expand(
    client: kube.Kube, settings: Settings, pvc: dict[str, Any], size: str
) -> dict[str, Any] | None:
    """Ask for `size` when it is more than the PVC requests; the patched PVC, or None when no
    change was needed. Sizes never shrink (the CRD refuses it; an adopted larger volume stays)."""
    current = requested(pvc)
    if current is not None and models.quantity(size) <= models.quantity(current):
        return None
    url = kube.pvcs(settings.server_namespace, pvc["metadata"]["name"])
    return await client.patch(url, {"spec": {"resources": {"requests": {"storage": size}}}})


def condition(pvc: dict[str, Any] | None, note: str | None = None) -> statuses.Condition:
    """VolumeBound, from the PVC."""
    if pvc is None:
        return statuses.Condition(
            "VolumeBound", "False", "ClaimMissing", "the space's PersistentVolumeClaim is missing"
        )
    name = pvc["metadata"]["name"]
    status = pvc.get("status") or {}
    phase = status.get("phase", "Pending")
    if phase == "Bound":
        volume = pvc.get("spec", {}).get("volumeName", "")
        capacity = (status.get("capacity") or {}).get("storage", "")
        message = f"claim {name} is bound to PersistentVolume {volume} ({capacity})"
        wanted = requested(pvc)
        if wanted and capacity and models.quantity(capacity) < models.quantity(wanted):
            message += f"; expansion to {wanted} requested"
        if note:
            message += f"; {note}"
        return statuses.Condition("VolumeBound", "True", "Bound", message)
    if phase == "Lost":
        return statuses.Condition(
            "VolumeBound",
            "False",
            "VolumeLost",
            f"claim {name} lost its PersistentVolume: the volume was deleted outside memspace",
        )
    storage_class = pvc.get("spec", {}).get("storageClassName") or "the default StorageClass"
    return statuses.Condition(
        "VolumeBound",
        "False",
        "VolumePending",
        f"claim {name} waits for a volume from {storage_class}",
    )


async def release(
    client: kube.Kube,
    settings: Settings,
    space: models.MemorySpace,
    delete: bool,
    mounted_by: str | None = None,
) -> str:
    """At deletion: delete the PVC (reclaimPolicy Delete; when the shard `mounted_by` still
    mounts it, label it delete-pending instead: it is deleted once unmounted) or keep it
    labelled retained and unassigned. Returns what was done, for the Event."""
    name = naming.claim_name(space.spec.space_id)
    url = kube.pvcs(settings.server_namespace, name)
    if delete and mounted_by is None:
        gone = await client.delete(url)
        return f"deleted claim {name} (reclaimPolicy Delete)" if gone else f"claim {name} was gone"
    if delete:
        pending = {
            "metadata": {
                "labels": {naming.DELETE_PENDING: "true", naming.SHARD: None},
                "annotations": {naming.CREDENTIALS_UID: None},
            }
        }
        try:
            await client.patch(url, pending)
        except errors.NotFoundError:
            return f"claim {name} was gone"
        return (
            f"claim {name} (reclaimPolicy Delete) is deleted once {mounted_by} unmounts it, at "
            "its next restart; no shard is restarted for it"
        )
    patch = {
        "metadata": {
            "labels": {naming.RETAINED: "true", naming.SHARD: None},
            "annotations": {naming.CREDENTIALS_UID: None},
        }
    }
    try:
        await client.patch(url, patch)
    except errors.NotFoundError:
        return f"claim {name} was gone"
    return f"kept claim {name}, labelled {naming.RETAINED}=true (reclaimPolicy Retain)"
