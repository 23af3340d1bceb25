"""Fixtures of the operator tests: the operator run in-process by kopf's KopfRunner against the
test control plane, each run with a server namespace of its own, and helpers to read what it
made. Every wait polls with a generous deadline: the machine is small and shared."""

from __future__ import annotations

import base64
import contextlib
import json
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import kopf.testing
import kubernetes.client
import pytest

from memspace_contract import client
from tests.support import cluster as harness

if TYPE_CHECKING:
    from tests.operator.kubelet import FakeKubelet, PodStatuses

GROUP, VERSION, PLURAL = "memspace.dev", "v1alpha1", "memoryspaces"
HANDLERS = "memspace_operator.handlers"
WAIT_S = 120.0

T = TypeVar("T")


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = WAIT_S, interval: float = 0.25
) -> T:
    """Poll `probe` until it returns something truthy; fail saying `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


def wait_events(
    kube: Kube, namespace: str, name: str, *reasons: str, timeout: float = WAIT_S
) -> list[dict[str, Any]]:
    """The Events about `name` once their reasons include every one of `reasons`. The operator
    posts Events through kopf's queue, in the background: one can arrive after the status
    change it goes with (and a run of the operator that ends drops what it had not posted)."""

    def probe() -> list[dict[str, Any]] | None:
        found = kube.events(namespace, name)
        return found if set(reasons) <= {e["reason"] for e in found} else None

    return wait_for(f"Events {', '.join(reasons)} about {name}", probe, timeout)


def memory_space(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MemorySpace",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def condition(body: Mapping[str, Any] | None, kind: str) -> dict[str, Any]:
    for found in ((body or {}).get("status") or {}).get("conditions") or []:
        if found.get("type") == kind:
            return dict(found)
    return {}


class Kube:
    """Admin reads and writes for the tests (kubernetes' synchronous client)."""

    def __init__(self, cluster: harness.Cluster) -> None:
        self.cluster = cluster
        self.api = cluster.kube_api()
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.apps = kubernetes.client.AppsV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)

    def _plain(self, obj: Any) -> dict[str, Any]:
        plain: dict[str, Any] = self.api.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
        return plain

    @staticmethod
    def _missing(err: kubernetes.client.ApiException) -> bool:
        return bool(err.status == 404)

    def space(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found = cast(
                "dict[str, Any]",
                self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name),
            )
        except kubernetes.client.ApiException as err:
            if self._missing(err):
                return None
            raise
        return found

    def apply(self, body: Mapping[str, Any]) -> None:
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(body))

    def patch_spec(self, namespace: str, name: str, spec: Mapping[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, {"spec": spec}
        )

    def delete_space(self, namespace: str, name: str) -> None:
        with contextlib.suppress(kubernetes.client.ApiException):
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def pvc(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._plain(self.core.read_namespaced_persistent_volume_claim(name, namespace))
        except kubernetes.client.ApiException as err:
            if self._missing(err):
                return None
            raise

    def pvcs(self, namespace: str) -> list[dict[str, Any]]:
        found = self.core.list_namespaced_persistent_volume_claim(namespace)
        return [self._plain(item) for item in found.items]

    def pv(self, name: str) -> dict[str, Any] | None:
        try:
            return self._plain(self.core.read_persistent_volume(name))
        except kubernetes.client.ApiException as err:
            if self._missing(err):
                return None
            raise

    def secret(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's data, decoded; None when it does not exist."""
        try:
            found = self.core.read_namespaced_secret(name, namespace)
        except kubernetes.client.ApiException as err:
            if self._missing(err):
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (found.data or {}).items()}

    def secret_object(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._plain(self.core.read_namespaced_secret(name, namespace))
        except kubernetes.client.ApiException as err:
            if self._missing(err):
                return None
            raise

    def statefulset(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._plain(self.apps.read_namespaced_stateful_set(name, namespace))
        except kubernetes.client.ApiException as err:
            if self._missing(err):
                return None
            raise

    def statefulsets(self, namespace: str) -> list[dict[str, Any]]:
        found = self.apps.list_namespaced_stateful_set(namespace)
        return [self._plain(item) for item in found.items]

    def pods(self, namespace: str, label_selector: str = "") -> list[dict[str, Any]]:
        found = self.core.list_namespaced_pod(namespace, label_selector=label_selector)
        return [self._plain(item) for item in found.items]

    def set_pod_ready(self, namespace: str, name: str, ready: bool) -> None:
        """Set a pod's status as a kubelet would: Running, and Ready or not."""
        status = "True" if ready else "False"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        conditions = [
            {"type": kind, "status": status, "lastTransitionTime": stamp}
            for kind in ("Ready", "ContainersReady")
        ]
        body = {"status": {"phase": "Running", "conditions": conditions}}
        try:
            self.core.patch_namespaced_pod_status(name, namespace, body)
        except kubernetes.client.ApiException as err:
            if not self._missing(err):
                raise

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        found = self.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={name}"
        )
        return [self._plain(item) for item in found.items]

    def create_namespace(self, name: str) -> None:
        metadata = kubernetes.client.V1ObjectMeta(name=name)
        self.core.create_namespace(kubernetes.client.V1Namespace(metadata=metadata))

    def delete_namespace(self, name: str) -> None:
        with contextlib.suppress(kubernetes.client.ApiException):
            self.core.delete_namespace(name)

    def remove_finalizers(self, namespace: str) -> None:
        """Let MemorySpaces left behind by a failed test go without an operator."""
        listed = cast(
            "dict[str, Any]",
            self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL),
        )
        for item in listed.get("items", []):
            with contextlib.suppress(kubernetes.client.ApiException):
                self.custom.patch_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    item["metadata"]["name"],
                    {"metadata": {"finalizers": None}},
                )


def tenant_credentials(
    kube: Kube, namespace: str, name: str, server_namespace: str
) -> client.Credentials:
    """A client's credentials from the MemorySpace's Secret alone, as a tenant would make them.
    The shards listen on loopback here, so the TLS name checked is the shard Service's (what
    the Secret's endpoint names in a cluster)."""
    data = kube.secret(namespace, f"{name}-memspace")
    assert data is not None, f"no credentials Secret for {namespace}/{name}"
    ca = data.get("ca.crt")
    shard = ((kube.space(namespace, name) or {}).get("status") or {}).get("shard")
    cert, key = data.get("tls.crt"), data.get("tls.key")
    return client.Credentials(
        endpoint=data["endpoint"],
        space=data["space"],
        token=data["token"],
        ca=ca.encode() if ca else None,
        cert=cert.encode() if cert else None,
        key=key.encode() if key else None,
        server_name=f"memspace-shard-{shard}.{server_namespace}.svc" if ca else None,
    )


def mounted_claims(statefulset: Mapping[str, Any] | None) -> dict[str, str]:
    """mountPath -> claimName of the shard template's PVC volumes."""
    if not statefulset:
        return {}
    template = statefulset["spec"]["template"]["spec"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in template.get("volumes") or []
        if v.get("persistentVolumeClaim")
    }
    found = {}
    for container in template["containers"]:
        for mount in container.get("volumeMounts") or []:
            if mount["name"] in claims:
                found[mount["mountPath"]] = claims[mount["name"]]
    return found


@pytest.fixture(scope="session")
def kube(cluster: harness.Cluster, crds: list[str]) -> Kube:
    return Kube(cluster)


class Deployment:
    """One operator installation: its server namespace and tenant namespaces, run in-process
    (`running`) as many times as a test needs, with the same settings."""

    def __init__(self, cluster: harness.Cluster, kube: Kube, tmp_path: Path) -> None:
        self.cluster = cluster
        self.kube = kube
        self.server_namespace = unique("memspace-system")
        self.namespace = unique("tenant")
        self.namespaces = [self.namespace]
        self.env: dict[str, str] = {
            "MEMSPACE_SERVER_NAMESPACE": self.server_namespace,
            "MEMSPACE_MOUNT_BATCH_WINDOW": "0.5",
            "MEMSPACE_HEALTH_INTERVAL": "0.5",
            "MEMSPACE_RESYNC_INTERVAL": "5",
            "MEMSPACE_SERVER_IMAGE": "memspace:test",
        }
        self.tmp_path = tmp_path
        self.pod_statuses: PodStatuses | None = None
        """The stand-in kubelet's status reports for the shard pods (see kubelet.py)."""
        for name in (self.server_namespace, self.namespace):
            kube.create_namespace(name)

    def add_namespace(self) -> str:
        name = unique("tenant")
        self.kube.create_namespace(name)
        self.namespaces.append(name)
        return name

    @contextlib.contextmanager
    def running(
        self, kubeconfig: Path | None = None, **env: str
    ) -> Iterator[kopf.testing.KopfRunner]:
        with harness.kopf_operator(
            self.cluster,
            "-m",
            HANDLERS,
            namespaces=self.namespaces,
            kubeconfig=kubeconfig,
            env={**self.env, **env},
            timeout=120,
        ) as runner:
            yield runner
        assert runner.exit_code == 0, runner.output

    def space(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        return self.kube.space(namespace or self.namespace, name)

    def apply(self, name: str, namespace: str | None = None, **spec: Any) -> None:
        self.kube.apply(memory_space(name, namespace or self.namespace, **spec))

    def wait_condition(
        self,
        name: str,
        kind: str,
        status: str,
        reason: str | None = None,
        namespace: str | None = None,
        timeout: float = WAIT_S,
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            body = self.space(name, namespace)
            found = condition(body, kind)
            ok = found.get("status") == status and (reason is None or found["reason"] == reason)
            return body if ok else None

        return wait_for(f"{name}: {kind}={status} {reason or ''}", probe, timeout)

    def wait_gone(self, name: str, namespace: str | None = None) -> None:
        wait_for(f"{name} to be deleted", lambda: self.space(name, namespace) is None)

    def index(self, shard: int) -> dict[str, dict[str, Any]]:
        data = self.kube.secret(self.server_namespace, f"memspace-shard-{shard}-spaces") or {}
        return {key: json.loads(value) for key, value in data.items()}

    def close(self) -> None:
        for name in self.namespaces:
            with contextlib.suppress(kubernetes.client.ApiException):
                self.kube.remove_finalizers(name)
            self.kube.delete_namespace(name)
        self.kube.delete_namespace(self.server_namespace)


@pytest.fixture
def deployment(cluster: harness.Cluster, kube: Kube, tmp_path: Path) -> Iterator[Deployment]:
    from tests.operator.kubelet import PodStatuses  # noqa: PLC0415  # it imports this module

    installed = Deployment(cluster, kube, tmp_path)
    try:
        with PodStatuses(kube, installed.server_namespace) as statuses:
            installed.pod_statuses = statuses
            yield installed
    finally:
        installed.close()


def endpoint_template() -> str:
    """Loopback ports for the shards, `<prefix><shard:03d>`, free when chosen."""
    rng = random.Random()
    for _ in range(50):
        prefix = rng.randrange(20, 60)
        ports = [prefix * 1000 + shard for shard in range(10)]
        if all(_free(port) for port in ports):
            return f"127.0.0.1:{prefix}{{shard:03d}}"
    raise RuntimeError("no free block of loopback ports for the shards")


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def kubelet(deployment: Deployment, tmp_path: Path) -> Iterator[FakeKubelet]:
    """Shards of `deployment` served by local `memspace serve` processes; the operator's
    settings point at them (admin token, loopback endpoints)."""
    from tests.operator.kubelet import FakeKubelet  # noqa: PLC0415  # it imports this module

    token_file = tmp_path / "admin-token"
    token_file.write_text(f"admin-{uuid.uuid4().hex}")
    template = endpoint_template()
    deployment.env["MEMSPACE_ADMIN_TOKEN_FILE"] = str(token_file)
    deployment.env["MEMSPACE_SHARD_ENDPOINT_TEMPLATE"] = template
    with FakeKubelet(
        deployment.kube, deployment.server_namespace, tmp_path / "node", template, token_file
    ) as running:
        if deployment.pod_statuses is not None:
            deployment.pod_statuses.paused = True  # the kubelet reports the pods' status
        yield running
    assert not running.errors, running.errors
