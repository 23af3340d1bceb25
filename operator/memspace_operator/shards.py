"""The objects of one server shard: StatefulSet `memspace-shard-N` (one replica) and Service
`memspace-shard-N`, mounting the shard's index Secret, the admin token, its TLS Secret (unless
TLS is off), the metrics token (when the metrics port requires one) and one PVC per space.

Only manifests and their comparison live here; `mounting` decides when they are written.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from memspace_contract import spaces
from memspace_operator import naming
from memspace_operator.settings import Settings

CONTAINER = "server"
DRAIN_TIMEOUT_S = 25
DRAIN_NOTICE_S = 1
GRACE_PERIOD_S = 30
RUN_AS = 10001
STARTUP_LIMIT_S = 120
"""Longest a shard may take to start serving before the kubelet restarts it (spaces load on
their first call, so a start is mostly imports: seconds)."""
STARTUP_PROBE_TIMEOUT_S = 5
"""How long one startup probe may wait: until the server serves, the health port holds a Check
(up to its deadline) and answers it the moment the server serves (memspace_server.api.probing),
so the pod turns Ready then rather than up to a probe period later."""


def pod_spec(settings: Settings, shard: int, mounted: Iterable[spaces.SpaceId]) -> dict[str, Any]:
    """The shard pod's spec, its volumes sorted by space ID (the same set gives the same spec)."""
    space_ids = sorted(set(mounted))
    volumes: list[dict[str, Any]] = [
        {"name": "index", "secret": {"secretName": naming.index_secret(shard)}},
        {
            "name": "admin-token",
            "secret": {"secretName": settings.admin_token_secret, "optional": True},
        },
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "index", "mountPath": naming.INDEX_PATH, "readOnly": True},
        {"name": "admin-token", "mountPath": naming.ADMIN_PATH, "readOnly": True},
    ]
    if settings.tls_enabled:
        secret = settings.tls_secret or naming.tls_secret(shard)
        volumes.append({"name": "tls", "secret": {"secretName": secret}})
        mounts.append({"name": "tls", "mountPath": naming.TLS_PATH, "readOnly": True})
        transport = [
            f"--tls-cert-file={naming.TLS_PATH}/tls.crt",
            f"--tls-key-file={naming.TLS_PATH}/tls.key",
        ]
        if settings.tls_client_auth:
            transport.append(f"--tls-client-ca-file={naming.TLS_PATH}/ca.crt")
    else:
        transport = ["--insecure"]
    metrics_args = []
    if settings.metrics_token_secret:
        volumes.append(
            # Optional, as the admin token: the chart's Secret goes with `helm uninstall`, and a
            # shard restarted then must still start (the metrics port admits nobody meanwhile).
            {
                "name": "metrics-token",
                "secret": {"secretName": settings.metrics_token_secret, "optional": True},
            }
        )
        mounts.append(
            {"name": "metrics-token", "mountPath": naming.METRICS_TOKEN_PATH, "readOnly": True}
        )
        metrics_args.append(f"--metrics-token-file={naming.METRICS_TOKEN_PATH}/token")
    for space_id in space_ids:
        volume = naming.volume_name(space_id)
        volumes.append(
            {"name": volume, "persistentVolumeClaim": {"claimName": naming.claim_name(space_id)}}
        )
        mounts.append({"name": volume, "mountPath": naming.mount_path(space_id)})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.server_image,
        "command": ["memspace"],
        "args": [
            "serve",
            f"--data-root={naming.VOLUMES_PATH}",
            f"--index-dir={naming.INDEX_PATH}",
            f"--listen=0.0.0.0:{naming.SERVER_PORT}",
            *transport,
            f"--health-listen=0.0.0.0:{naming.HEALTH_PORT}",
            f"--http-listen=0.0.0.0:{naming.HTTP_PORT}",
            f"--metrics-listen=0.0.0.0:{naming.METRICS_PORT}",
            *metrics_args,
            f"--admin-token-file={naming.ADMIN_PATH}/token",
            f"--drain-timeout={DRAIN_TIMEOUT_S}",
            # The pod leaves its Service's endpoints when it is deleted, and within two 1 s
            # readiness probes of reporting NOT_SERVING: a second of notice is enough.
            f"--drain-notice={DRAIN_NOTICE_S}",
            "--log-format=json",
        ],
        "ports": [
            {"name": "grpc", "containerPort": naming.SERVER_PORT, "protocol": "TCP"},
            {"name": "http", "containerPort": naming.HTTP_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": naming.METRICS_PORT, "protocol": "TCP"},
        ],
        # The kubelet's gRPC probes cannot speak TLS: they ask the plaintext health-only port,
        # which a starting server opens first and which holds a Check until the server serves.
        # A restart costs clients little: the startup probe passes the moment the server serves
        # (for up to STARTUP_LIMIT_S), the kubelet then runs the readiness probe at once, and
        # the short readiness period takes a draining or failing server out of the Service.
        "startupProbe": {
            "grpc": {"port": naming.HEALTH_PORT},
            "periodSeconds": 1,
            "timeoutSeconds": STARTUP_PROBE_TIMEOUT_S,
            "failureThreshold": STARTUP_LIMIT_S // STARTUP_PROBE_TIMEOUT_S,
        },
        "readinessProbe": {
            "grpc": {"port": naming.HEALTH_PORT},
            "periodSeconds": 1,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "grpc": {"port": naming.HEALTH_PORT},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if settings.server_resources:
        container["resources"] = dict(settings.server_resources)
    if settings.server_env:
        container["env"] = [
            {"name": name, "value": str(value)}
            for name, value in sorted(settings.server_env.items())
        ]
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "automountServiceAccountToken": False,
        # No variables for every Service of the namespace (one set per shard): the server reads
        # none, and a restarting pod need not wait for them.
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": GRACE_PERIOD_S,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if settings.service_account:
        spec["serviceAccountName"] = settings.service_account
    if settings.server_topology_spread:
        spec["topologySpreadConstraints"] = [
            {**constraint, "labelSelector": {"matchLabels": _spread_labels()}}
            if "labelSelector" not in constraint
            else constraint
            for constraint in settings.server_topology_spread
        ]
    if settings.server_affinity:
        spec["affinity"] = settings.server_affinity
    return spec


def _spread_labels() -> dict[str, str]:
    """What a spread constraint without a selector of its own counts: every shard pod."""
    return {naming.NAME: "memspace", naming.COMPONENT: "shard"}


def statefulset(
    settings: Settings,
    shard: int,
    mounted: Iterable[spaces.SpaceId],
    changed_at: str,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    name = naming.shard_name(shard)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": name,
            "namespace": settings.server_namespace,
            "labels": naming.shard_labels(shard),
            "annotations": {TEMPLATE_CHANGED: changed_at, **(annotations or {})},
        },
        "spec": {
            "replicas": 1,
            "serviceName": name,
            "selector": {"matchLabels": naming.shard_selector(shard)},
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": naming.shard_labels(shard)},
                "spec": pod_spec(settings, shard, mounted),
            },
        },
    }


def service(settings: Settings, shard: int) -> dict[str, Any]:
    name = naming.shard_name(shard)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": settings.server_namespace,
            "labels": naming.shard_labels(shard),
        },
        "spec": {
            "selector": naming.shard_selector(shard),
            "ports": [
                {"name": "grpc", "port": naming.SERVER_PORT, "targetPort": "grpc"},
                {"name": "http", "port": naming.HTTP_PORT, "targetPort": "http"},
                {"name": "metrics", "port": naming.METRICS_PORT, "targetPort": "metrics"},
            ],
        },
    }


TEMPLATE_CHANGED = "memspace.dev/template-changed-at"
"""Annotation on a shard's StatefulSet (not its pod template): when the template last changed,
so the batching window holds across operator restarts."""
OPENED_AT = "memspace.dev/opened-at"
"""Annotation on a shard's StatefulSet: when it opened as the intake shard (ISO 8601)."""
SEALED_AT = "memspace.dev/sealed-at"
"""Annotation on a shard's StatefulSet: when it was sealed (it takes no new space again)."""


def mounted_spaces(statefulset_body: dict[str, Any]) -> frozenset[spaces.SpaceId]:
    """The spaces whose volumes the StatefulSet's template mounts at their path."""
    return spec_mounts(statefulset_body.get("spec", {}).get("template", {}).get("spec", {}))


def spec_mounts(pod_spec_body: dict[str, Any]) -> frozenset[spaces.SpaceId]:
    """The spaces whose volumes a pod spec (a pod's, or a template's) mounts at their path."""
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec_body.get("volumes") or []
        if v.get("persistentVolumeClaim")
    }
    found = set()
    for container in pod_spec_body.get("containers") or []:
        if container.get("name") != CONTAINER:
            continue
        for mount in container.get("volumeMounts") or []:
            path = mount.get("mountPath", "")
            claim = claims.get(mount.get("name"))
            prefix = naming.VOLUMES_PATH + "/"
            if claim is not None and path.startswith(prefix):
                space_id = path[len(prefix) :]
                if claim == naming.claim_name(spaces.SpaceId(space_id)):
                    found.add(spaces.SpaceId(space_id))
    return frozenset(found)


def template_differs(current: dict[str, Any], desired: dict[str, Any]) -> bool:
    """Whether the pod templates differ in what the operator sets (defaults the API server
    added to `current` are ignored)."""
    return not _covers(current["spec"]["template"], desired["spec"]["template"])


def _covers(actual: Any, wanted: Any) -> bool:
    if isinstance(wanted, dict):
        return isinstance(actual, dict) and all(
            _covers(actual.get(key), value) for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(wanted)
            and all(_covers(a, w) for a, w in zip(actual, wanted, strict=True))
        )
    return bool(actual == wanted)
