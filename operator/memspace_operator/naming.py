"""Deterministic names and labels of everything the operator makes (design section 3).

The same space always maps to the same child names, so a reconcile re-run after a crash finds
what an earlier run made instead of making it twice.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from memspace_contract import spaces

GROUP = "memspace.dev"
VERSION = "v1alpha1"
PLURAL = "memoryspaces"
KIND = "MemorySpace"
API_VERSION = f"{GROUP}/{VERSION}"

BACKUP_PLURAL = "memoryspacebackups"
BACKUP_KIND = "MemorySpaceBackup"
TARGET_PLURAL = "memoryspacebackuptargets"
TARGET_KIND = "MemorySpaceBackupTarget"
DEFAULT_TARGET = "memspace.dev/is-default-target"
"""The annotation (value "true") of the MemorySpaceBackupTarget used where none is named."""
BACKUP_OF = "memspace.dev/memory-space"
"""Label of a MemorySpaceBackup made by the operator: the MemorySpace's name."""
BACKUP_PURPOSE = "memspace.dev/backup-purpose"
"""Label of a MemorySpaceBackup made by the operator: `scheduled` or `offload`."""
SCHEDULED_AT = "memspace.dev/scheduled-at"
"""Annotation of a scheduled MemorySpaceBackup: the schedule's tick it was made for (UTC)."""

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "memspace-operator"
NAME = "app.kubernetes.io/name"
COMPONENT = "app.kubernetes.io/component"
SPACE_ID = "memspace.dev/space-id"
OWNER_NAMESPACE = "memspace.dev/owner-namespace"
OWNER_NAME = "memspace.dev/owner-name"
SHARD = "memspace.dev/shard"
RETAINED = "memspace.dev/retained"
DELETE_PENDING = "memspace.dev/delete-pending"
"""Label of a deleted space's claim (reclaimPolicy Delete) that a shard's template still
mounts: deleted once no template mounts it (at that shard's next restart)."""
OWNER_UID = "memspace.dev/owner-uid"
"""Annotation on a space's PVC: the uid of the MemorySpace that holds its space ID."""
OWNER_FULL_NAME = "memspace.dev/owner"
"""Annotation: namespace/name of the owner, in full (a label value holds at most 63 chars)."""
RELEASE_TO = "memspace.dev/release-to-namespace"
"""Annotation a platform admin puts on a retained PVC: the one namespace (other than its owner
namespace) whose MemorySpace may adopt it. Without it only the owner namespace may."""
CREDENTIALS_UID = "memspace.dev/credentials-uid"
"""Annotation on a space's PVC: the uid of the credentials Secret the operator created, the
proof that lets it delete that Secret (and no other of the same name)."""

FINALIZER = "memspace.dev/finalizer"
SERVER_PORT = 50051
HEALTH_PORT = 50052
"""Plaintext grpc.health.v1 only, for the kubelet's probes (they cannot speak TLS)."""
METRICS_PORT = 9090
HTTP_PORT = 8080
"""The HTTP/JSON API: the same calls, routing and auth as SERVER_PORT (TLS when it has TLS)."""
VOLUMES_PATH = "/var/lib/memspace/spaces"
INDEX_PATH = "/etc/memspace/spaces"
ADMIN_PATH = "/etc/memspace/admin"
TLS_PATH = "/etc/memspace/tls"
METRICS_TOKEN_PATH = "/etc/memspace/metrics"  # noqa: S105  # a directory, not a secret

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _fit(name: str, limit: int) -> str:
    """`name` if it fits in `limit` characters, else a prefix and a hash of the whole."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[: limit - 11].rstrip('-.')}-{digest}"


def claim_name(space_id: spaces.SpaceId) -> str:
    """The space's PVC in the server namespace: `space-<spaceId>`."""
    return f"space-{space_id}"


def volume_name(space_id: spaces.SpaceId) -> str:
    """The pod volume of the space's PVC (a DNS label: 63 characters at most)."""
    return _fit(f"space-{space_id}", 63)


def mount_path(space_id: spaces.SpaceId) -> str:
    return f"{VOLUMES_PATH}/{space_id}"


def credentials_secret(owner_name: str) -> str:
    """The Secret in the MemorySpace's namespace holding space, endpoint and token."""
    return _fit(f"{owner_name}-memspace", 253)


def shard_name(shard: int) -> str:
    """StatefulSet and Service of shard N."""
    return f"memspace-shard-{shard}"


def index_secret(shard: int) -> str:
    """The spaces index of shard N, projected into its pod at INDEX_PATH."""
    return f"memspace-shard-{shard}-spaces"


def tls_secret(shard: int) -> str:
    """Shard N's serving certificate when the operator issues it (keys tls.crt, tls.key,
    ca.crt), projected into its pod at TLS_PATH."""
    return f"memspace-shard-{shard}-tls"


def shard_dns_names(shard: int, namespace: str, cluster_domain: str) -> list[str]:
    """The names shard N's Service answers to, which its certificate carries."""
    name = shard_name(shard)
    return [
        name,
        f"{name}.{namespace}",
        f"{name}.{namespace}.svc",
        f"{name}.{namespace}.svc.{cluster_domain}",
    ]


def label_value(value: str) -> str:
    """`value` as a label value (63 characters, alphanumeric ends), hashed when it is longer."""
    if len(value) <= 63 and _LABEL_VALUE.fullmatch(value):
        return value
    return _fit(value, 63)


def managed() -> dict[str, str]:
    return {MANAGED_BY: MANAGER}


def space_labels(space_id: spaces.SpaceId, owner_namespace: str, owner_name: str) -> dict[str, str]:
    """The labels of every child of one space (design section 3)."""
    return {
        MANAGED_BY: MANAGER,
        SPACE_ID: space_id,
        OWNER_NAMESPACE: owner_namespace,
        OWNER_NAME: label_value(owner_name),
    }


def shard_labels(shard: int, component: str = "shard") -> dict[str, str]:
    """The labels of shard N's StatefulSet, Service and pods (component `shard`) or index
    Secret (component `index`)."""
    return {
        MANAGED_BY: MANAGER,
        NAME: "memspace",
        COMPONENT: component,
        SHARD: str(shard),
    }


def shard_selector(shard: int) -> dict[str, str]:
    """What shard N's Service and StatefulSet select: its pods."""
    return {NAME: "memspace", COMPONENT: "shard", SHARD: str(shard)}


def offload_backup(owner_name: str, generation: int) -> str:
    """The MemorySpaceBackup holding the final backup of an offload (one per spec generation)."""
    return _fit(f"{owner_name}-offload-{generation}", 253)


def scheduled_backup(owner_name: str, stamp: str) -> str:
    """The MemorySpaceBackup a schedule makes at tick `stamp` (`20260102t0304`)."""
    return _fit(f"{owner_name}-{stamp}", 253)


def backup_object(
    space: str,
    namespace: str,
    name: str,
    *,
    target: str | None,
    purpose: str,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The MemorySpaceBackup the operator makes of `space` (a schedule's tick, an offload)."""
    spec: dict[str, str] = {"memorySpace": space}
    if target:
        spec["target"] = target
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {**managed(), BACKUP_OF: label_value(space), BACKUP_PURPOSE: purpose},
    }
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": API_VERSION, "kind": BACKUP_KIND, "metadata": metadata, "spec": spec}
