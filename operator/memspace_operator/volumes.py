"""A space's PersistentVolumeClaim `space-<spaceId>` in the server namespace: its volume, and
the cluster-wide claim on its space ID.

The PVC's name is derived from the space ID, so the API server lets only one exist: whoever
created it (annotation memspace.dev/owner-uid) holds the ID. A later MemorySpace claiming the
same ID is a SpaceIdConflict, unless the holder is gone or let the volume go (`Retain` on
deletion labels it retained): then the claimant adopts the volume, data included.
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
    holder: str | None = None
    """Set for a SpaceIdConflict: namespace/name of the MemorySpace holding the ID."""


def owner_uid(pvc: dict[str, Any]) -> str | None:
    return (pvc.get("metadata", {}).get("annotations") or {}).get(naming.OWNER_UID)


def owner(pvc: dict[str, Any]) -> tuple[str, str] | None:
    full = (pvc.get("metadata", {}).get("annotations") or {}).get(naming.OWNER_FULL_NAME, "")
    namespace, _, name = full.partition("/")
    return (namespace, name) if namespace and name else None


def labels(pvc: dict[str, Any]) -> dict[str, str]:
    found: dict[str, str] = pvc.get("metadata", {}).get("labels") or {}
    return found


def shard_of(pvc: dict[str, Any]) -> int | None:
    value = labels(pvc).get(naming.SHARD, "")
    return int(value) if value.isdigit() else None


def is_retained(pvc: dict[str, Any]) -> bool:
    return labels(pvc).get(naming.RETAINED) == "true"


def _identity(space: models.MemorySpace) -> dict[str, Any]:
    ref = space.ref
    return {
        "labels": {
            **naming.space_labels(space.spec.space_id, ref.namespace, ref.name),
            naming.RETAINED: None,
        },
        "annotations": {naming.OWNER_UID: ref.uid, naming.OWNER_FULL_NAME: str(ref)},
    }


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
    if storage_class:
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
    if owner_uid(pvc) == space.ref.uid:
        return Claim(pvc)
    if is_retained(pvc) or not await _holder_exists(client, pvc):
        await before_adopting(pvc)
        url = kube.pvcs(settings.server_namespace, pvc["metadata"]["name"])
        patch = {
            "metadata": {**_identity(space), "resourceVersion": pvc["metadata"]["resourceVersion"]}
        }
        try:
            adopted = await client.patch(url, patch)
        except errors.ConflictError as err:
            raise errors.TemporaryError(
                f"the volume {url} changed while being adopted; retrying", delay=1.0
            ) from err
        return Claim(adopted, fresh=True)
    holder = owner(pvc)
    return Claim(pvc, holder=f"{holder[0]}/{holder[1]}" if holder else "another MemorySpace")


async def label_shard(
    client: kube.Kube, settings: Settings, pvc: dict[str, Any], shard: int
) -> dict[str, Any]:
    url = kube.pvcs(settings.server_namespace, pvc["metadata"]["name"])
    return await client.patch(url, {"metadata": {"labels": {naming.SHARD: str(shard)}}})


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
    client: kube.Kube, settings: Settings, space: models.MemorySpace, delete: bool
) -> str:
    """At deletion: delete the PVC (reclaimPolicy Delete) or keep it labelled retained and
    unassigned. Returns what was done, for the Event."""
    name = naming.claim_name(space.spec.space_id)
    url = kube.pvcs(settings.server_namespace, name)
    if delete:
        gone = await client.delete(url)
        return f"deleted claim {name} (reclaimPolicy Delete)" if gone else f"claim {name} was gone"
    patch = {"metadata": {"labels": {naming.RETAINED: "true", naming.SHARD: None}}}
    try:
        await client.patch(url, patch)
    except errors.NotFoundError:
        return f"claim {name} was gone"
    return f"kept claim {name}, labelled {naming.RETAINED}=true (reclaimPolicy Retain)"
