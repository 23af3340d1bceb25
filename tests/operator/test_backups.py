"""MemorySpaceBackups on the test control plane: the operator asks the shard serving a space
(a real `memspace serve` process, see kubelet.py) to back it up to a real MinIO over S3, with the
credentials it read from the target's Secret; deleting the object deletes the backup from the
bucket; schedules make backups and keep the newest `keep`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Iterator
from typing import Any, cast

import grpc
import kubernetes.client
import pytest

from memspace_contract import client
from tests.operator.conftest import (
    GROUP,
    VERSION,
    Deployment,
    Kube,
    condition,
    tenant_credentials,
    unique,
    wait_events,
    wait_for,
)
from tests.operator.kubelet import FakeKubelet
from tests.support import minio

pytestmark = pytest.mark.cluster

BACKUPS = "memoryspacebackups"
TARGETS = "memoryspacebackuptargets"
DIM = 4


@pytest.fixture(scope="module")
def minio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[minio.Minio]:
    with minio.running(tmp_path_factory.mktemp("minio")) as server:
        yield server


class Targets:
    """MemorySpaceBackupTargets (cluster-scoped) made by a test, deleted after it."""

    def __init__(self, kube: Kube, store: minio.Minio, server_namespace: str) -> None:
        self.kube = kube
        self.store = store
        self.server_namespace = server_namespace
        self.made: list[str] = []

    def make(self, *, secret: bool = True, **spec: Any) -> tuple[str, str]:
        """A target over a new bucket, its credentials Secret in the server namespace; returns
        the target's name and the bucket."""
        name = unique("target")
        bucket = self.store.make_bucket(name)
        if secret:
            data = {"accessKeyId": self.store.access_key, "secretAccessKey": self.store.secret_key}
            body = kubernetes.client.V1Secret(
                metadata=kubernetes.client.V1ObjectMeta(name=f"{name}-s3"),
                data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
            )
            self.kube.core.create_namespaced_secret(self.server_namespace, body)
        target = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MemorySpaceBackupTarget",
            "metadata": {"name": name},
            "spec": {
                "endpoint": self.store.endpoint,
                "bucket": bucket,
                "prefix": "memspace",
                "region": self.store.region,
                "credentialsSecret": {"name": f"{name}-s3"},
                **spec,
            },
        }
        self.kube.custom.create_cluster_custom_object(GROUP, VERSION, TARGETS, target)
        self.made.append(name)
        return name, bucket

    def manifests(self, bucket: str, space_id: str) -> set[str]:
        """Backup IDs with a manifest in the bucket, read from MinIO's drive (one directory per
        object key)."""
        folder = self.store.data / bucket / "memspace" / "spaces" / space_id / "backups"
        if not folder.is_dir():
            return set()
        return {p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json")}

    def close(self) -> None:
        for name in self.made:
            with contextlib.suppress(kubernetes.client.ApiException):
                self.kube.custom.delete_cluster_custom_object(GROUP, VERSION, TARGETS, name)


@pytest.fixture
def targets(deployment: Deployment, minio_server: minio.Minio) -> Iterator[Targets]:
    made = Targets(deployment.kube, minio_server, deployment.server_namespace)
    try:
        yield made
    finally:
        made.close()


def backup_body(name: str, namespace: str, space: str, target: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"memorySpace": space}
    if target is not None:
        spec["target"] = target
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MemorySpaceBackup",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def get_backup(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return cast(
            "dict[str, Any]",
            kube.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, BACKUPS, name),
        )
    except kubernetes.client.ApiException as err:
        if err.status == 404:
            return None
        raise


def list_backups(kube: Kube, namespace: str) -> list[dict[str, Any]]:
    listed = cast(
        "dict[str, Any]",
        kube.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, BACKUPS),
    )
    return cast("list[dict[str, Any]]", listed.get("items") or [])


def wait_phase(kube: Kube, namespace: str, name: str, phase: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        found = get_backup(kube, namespace, name)
        return found if ((found or {}).get("status") or {}).get("phase") == phase else None

    return wait_for(f"backup {name} {phase}", probe)


async def remember(deployment: Deployment, name: str, count: int) -> None:
    creds = tenant_credentials(
        deployment.kube, deployment.namespace, name, deployment.server_namespace
    )
    async with client.connect(creds) as memspace:
        for i in range(count):
            await memspace.remember(f"memory {i}", [1.0, float(i), 0.0, 0.0])


def test_a_backup_waits_pending_with_the_reason_until_its_target_can_be_used(
    deployment: Deployment, kubelet: FakeKubelet, targets: Targets
) -> None:
    ns = deployment.namespace
    target, _ = targets.make(secret=False)
    with deployment.running():
        deployment.apply("waiting", embeddingDim=DIM)
        deployment.wait_condition("waiting", "Ready", "True")
        deployment.kube.custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, BACKUPS, backup_body("nowhere", ns, "waiting")
        )
        deployment.kube.custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, BACKUPS, backup_body("no-secret", ns, "waiting", target)
        )
        for name, reason in (
            ("nowhere", "NoBackupTarget"),
            ("no-secret", "TargetCredentialsMissing"),
        ):
            body = wait_phase(deployment.kube, ns, name, "Pending")
            assert condition(body, "Completed")["reason"] == reason, body["status"]


def test_a_backup_completes_to_minio_and_deleting_it_deletes_its_manifest(
    deployment: Deployment, kubelet: FakeKubelet, targets: Targets
) -> None:
    ns = deployment.namespace
    target, bucket = targets.make()
    with deployment.running():
        deployment.apply("kept", embeddingDim=DIM)
        deployment.wait_condition("kept", "Ready", "True")
        asyncio.run(remember(deployment, "kept", 20))
        deployment.kube.custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, BACKUPS, backup_body("first", ns, "kept", target)
        )
        first = wait_phase(deployment.kube, ns, "first", "Completed")["status"]
        assert first["memories"] == 20
        assert first["lsn"] >= 20
        assert first["bytes"] > 0
        assert first["bytesUploaded"] == first["bytes"]
        assert first["target"] == target
        assert first["startedAt"] <= first["completedAt"]
        assert targets.manifests(bucket, "kept") == {first["backupId"]}
        wait_events(deployment.kube, ns, "first", "BackupStarted", "BackupCompleted")

        # A second backup uploads only what changed.
        asyncio.run(remember(deployment, "kept", 1))
        deployment.kube.custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, BACKUPS, backup_body("second", ns, "kept", target)
        )
        second = wait_phase(deployment.kube, ns, "second", "Completed")["status"]
        assert second["memories"] == 21
        assert second["bytesUploaded"] < second["bytes"]
        assert targets.manifests(bucket, "kept") == {first["backupId"], second["backupId"]}

        deployment.kube.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, BACKUPS, "first")
        wait_for("backup first to go", lambda: get_backup(deployment.kube, ns, "first") is None)
        assert targets.manifests(bucket, "kept") == {second["backupId"]}


def test_a_schedule_makes_backups_and_keeps_the_newest(
    deployment: Deployment, kubelet: FakeKubelet, targets: Targets
) -> None:
    ns = deployment.namespace
    target, bucket = targets.make()
    with deployment.running(MEMSPACE_BACKUP_SCHEDULE_INTERVAL="0.5"):
        # Every 4 seconds (croniter's sixth field is seconds), keeping 2.
        deployment.apply(
            "ticking",
            embeddingDim=DIM,
            backup={"schedule": "* * * * * */4", "keep": 2, "target": target},
        )
        deployment.wait_condition("ticking", "Ready", "True")
        asyncio.run(remember(deployment, "ticking", 3))

        def pruned() -> list[dict[str, Any]] | None:
            items = list_backups(deployment.kube, ns)
            done = [i for i in items if (i.get("status") or {}).get("phase") == "Completed"]
            events = {e["reason"] for e in deployment.kube.events(ns, "ticking")}
            return done if "BackupPruned" in events and len(done) >= 2 else None

        wait_for("the schedule to make and prune backups", pruned, timeout=90)
        deployment.kube.patch_spec(ns, "ticking", {"backup": {"schedule": None}})

        # What remains settles: the newest two completed, each with its manifest, and none of
        # the pruned ones' manifests.
        def settled() -> list[dict[str, Any]] | None:
            items = list_backups(deployment.kube, ns)
            going = [i for i in items if i["metadata"].get("deletionTimestamp")]
            running = [i for i in items if (i.get("status") or {}).get("phase") != "Completed"]
            return items if not going and not running else None

        try:
            items = wait_for("the backups to settle", settled, timeout=60)
        except AssertionError:
            for i in list_backups(deployment.kube, ns):
                print(
                    i["metadata"]["name"], i["metadata"].get("deletionTimestamp"), i.get("status")
                )
            raise
        completed = [i for i in items if i["status"]["phase"] == "Completed"]
        # keep, and those completed after the last pruning before the schedule was removed (a
        # check prunes what has completed; the newest may still be running then)
        assert 2 <= len(completed) <= 4, items
        gone = {
            e["message"].split()[2].rstrip(":")
            for e in deployment.kube.events(ns, "ticking")
            if e["reason"] == "BackupPruned"
        }
        assert gone
        assert not gone & {i["metadata"]["name"] for i in items}
        # The oldest went: every pruned backup is older than every kept one (names sort by tick).
        assert max(gone) < min(i["metadata"]["name"] for i in completed)
        for item in items:
            assert item["metadata"]["labels"]["memspace.dev/backup-purpose"] == "scheduled"
        ids = {i["status"]["backupId"] for i in items}
        assert targets.manifests(bucket, "ticking") == ids


async def recall_all(creds: client.Credentials, k: int = 50) -> list[str]:
    async with client.connect(creds) as memspace:
        hits = await memspace.recall([1.0, 0.0, 0.0, 0.0], k=k)
    return sorted(hit.memory.content for hit in hits)


async def recall_code(creds: client.Credentials) -> tuple[grpc.StatusCode, str]:
    async with client.connect(creds) as memspace:
        try:
            await memspace.recall([1.0, 0.0, 0.0, 0.0], k=1)
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def test_a_new_space_restores_from_a_backup_of_its_namespace_only_where_the_target_allows(
    deployment: Deployment, kubelet: FakeKubelet, targets: Targets
) -> None:
    ns = deployment.namespace
    other = deployment.add_namespace()
    target, _ = targets.make()
    with deployment.running(MEMSPACE_BACKUP_DEFAULT_TARGET=target):
        deployment.apply("source", embeddingDim=DIM)
        deployment.wait_condition("source", "Ready", "True")
        asyncio.run(remember(deployment, "source", 12))
        deployment.kube.custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, BACKUPS, backup_body("snap", ns, "source")
        )
        snap = wait_phase(deployment.kube, ns, "snap", "Completed")["status"]

        deployment.apply("copy", embeddingDim=DIM, restoreFrom={"backup": "snap"})
        body = deployment.wait_condition("copy", "Ready", "True")
        restored = body["status"]["restoredFrom"]
        assert restored["backupId"] == snap["backupId"]
        assert restored["memories"] == 12
        assert condition(body, "Restored")["status"] == "True"
        creds = tenant_credentials(deployment.kube, ns, "copy", deployment.server_namespace)
        source = tenant_credentials(deployment.kube, ns, "source", deployment.server_namespace)
        assert asyncio.run(recall_all(creds)) == asyncio.run(recall_all(source))

        # Another namespace's space may not restore it until the target allows that namespace.
        deployment.apply("thief", namespace=other, embeddingDim=DIM,
                         restoreFrom={"backup": "snap", "namespace": ns})  # fmt: skip
        deployment.wait_condition("thief", "Ready", "False", "RestoreForbidden", namespace=other)
        deployment.kube.custom.patch_cluster_custom_object(
            GROUP, VERSION, TARGETS, target, {"spec": {"allowedRestoreNamespaces": [other]}}
        )
        body = deployment.wait_condition("thief", "Ready", "True", namespace=other)
        assert body["status"]["restoredFrom"]["namespace"] == ns


def shard_pod(deployment: Deployment) -> dict[str, Any] | None:
    for pod in deployment.kube.pods(
        deployment.server_namespace, "app.kubernetes.io/component=shard"
    ):
        if not pod["metadata"].get("deletionTimestamp"):
            return pod
    return None


def offload(deployment: Deployment, name: str) -> dict[str, Any]:
    deployment.kube.patch_spec(deployment.namespace, name, {"state": "Offloaded"})
    body = deployment.wait_condition(name, "Ready", "False", "Offloaded")
    assert condition(body, "Offloaded")["status"] == "True"
    return dict(body["status"]["offload"])


def test_an_offloaded_space_keeps_no_volume_and_comes_back_with_its_memories_and_token(
    deployment: Deployment, kubelet: FakeKubelet, targets: Targets
) -> None:
    ns, server_ns = deployment.namespace, deployment.server_namespace
    target, bucket = targets.make()
    with deployment.running(MEMSPACE_BACKUP_DEFAULT_TARGET=target):
        deployment.apply("idle", embeddingDim=DIM)
        deployment.wait_condition("idle", "Ready", "True")
        asyncio.run(remember(deployment, "idle", 15))
        creds = tenant_credentials(deployment.kube, ns, "idle", server_ns)
        before = asyncio.run(recall_all(creds))

        first = offload(deployment, "idle")
        assert first["memories"] == 15
        assert targets.manifests(bucket, "idle") == {first["backupId"]}
        code, details = asyncio.run(recall_code(creds))
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert "Offloaded" in details
        # No shard restarted since: the claim waits, delete-pending, for the shard's restart.
        pvc = deployment.kube.pvc(server_ns, "space-idle")
        assert pvc is not None
        assert pvc["metadata"]["labels"]["memspace.dev/delete-pending"] == "true"

        # Back to Active before a restart: the claim is taken back as it is, no restore.
        deployment.kube.patch_spec(ns, "idle", {"state": "Active"})
        body = deployment.wait_condition("idle", "Ready", "True")
        assert "offload" not in body["status"]
        wait_events(deployment.kube, ns, "idle", "VolumeKept")
        assert asyncio.run(recall_all(creds)) == before

        # Offloaded again, and this time the shard restarts (its pod is deleted): the claim goes.
        second = offload(deployment, "idle")
        assert second["backup"] != first["backup"]
        pod = shard_pod(deployment)
        assert pod is not None
        deployment.kube.core.delete_namespaced_pod(pod["metadata"]["name"], server_ns)
        wait_for("the offloaded claim to be deleted",
                 lambda: deployment.kube.pvc(server_ns, "space-idle") is None)  # fmt: skip
        # The backup it lives in cannot go while it is Offloaded.
        deployment.kube.custom.delete_namespaced_custom_object(
            GROUP, VERSION, ns, BACKUPS, second["backup"]
        )
        wait_for(
            "the refusal",
            lambda: (
                "BackupInUse" in {e["reason"] for e in deployment.kube.events(ns, second["backup"])}
            ),
        )
        assert get_backup(deployment.kube, ns, second["backup"]) is not None

        # Active: a new claim, restored from the final backup, serving with the same token.
        deployment.kube.patch_spec(ns, "idle", {"state": "Active"})
        body = deployment.wait_condition("idle", "Ready", "True")
        assert "offload" not in body["status"]
        assert body["status"]["restoredFrom"]["backupId"] == second["backupId"]
        assert deployment.kube.pvc(server_ns, "space-idle") is not None
        assert asyncio.run(recall_all(creds)) == before
        # Active again, the backup may go (its manifest with it).
        wait_for("the offload backup to go",
                 lambda: get_backup(deployment.kube, ns, second["backup"]) is None)  # fmt: skip
        assert targets.manifests(bucket, "idle") == {first["backupId"]}


def test_a_failed_final_backup_leaves_the_space_serving_on_its_volume_with_the_reason(
    deployment: Deployment, kubelet: FakeKubelet, targets: Targets, minio_server: minio.Minio
) -> None:
    ns, server_ns = deployment.namespace, deployment.server_namespace
    target, bucket = targets.make()
    # Credentials the store refuses: every upload fails.
    deployment.kube.core.patch_namespaced_secret(
        f"{target}-s3",
        server_ns,
        {"data": {"secretAccessKey": base64.b64encode(b"not-the-key").decode()}},
    )
    with deployment.running(MEMSPACE_BACKUP_DEFAULT_TARGET=target, MEMSPACE_BACKUP_ATTEMPTS="1"):
        deployment.apply("stuck", embeddingDim=DIM)
        deployment.wait_condition("stuck", "Ready", "True")
        asyncio.run(remember(deployment, "stuck", 5))
        creds = tenant_credentials(deployment.kube, ns, "stuck", server_ns)

        deployment.kube.patch_spec(ns, "stuck", {"state": "Offloaded"})
        body = deployment.wait_condition("stuck", "Offloaded", "False", "OffloadFailed")
        assert "failed" in condition(body, "Offloaded")["message"]
        body = deployment.wait_condition("stuck", "Ready", "True")
        assert "offload" not in body["status"]
        assert deployment.kube.pvc(server_ns, "space-stuck") is not None
        backup = get_backup(deployment.kube, ns, "stuck-offload-2")
        assert backup is not None
        assert backup["status"]["phase"] == "Failed"
        wait_events(deployment.kube, ns, "stuck", "OffloadFailed")
        assert targets.manifests(bucket, "stuck") == set()
        # Reads are served; writes stay refused (the final backup's seal) until Active again.
        assert len(asyncio.run(recall_all(creds))) == 5
        code, _ = asyncio.run(remember_code(creds))
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        deployment.kube.patch_spec(ns, "stuck", {"state": "Active"})
        wait_for("writes to be taken again",
                 lambda: asyncio.run(remember_code(creds))[0] is grpc.StatusCode.OK)  # fmt: skip
        wait_for("the Offloaded condition to go",
                 lambda: not condition(deployment.space("stuck"), "Offloaded"))  # fmt: skip
        deployment.wait_condition("stuck", "Ready", "True")


async def remember_code(creds: client.Credentials) -> tuple[grpc.StatusCode, str]:
    async with client.connect(creds) as memspace:
        try:
            await memspace.remember("one more", [1.0, 0.0, 0.0, 0.0])
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def test_an_offloaded_space_survives_an_operator_restart_and_comes_back_with_its_token(
    deployment: Deployment, kubelet: FakeKubelet, targets: Targets
) -> None:
    ns, server_ns = deployment.namespace, deployment.server_namespace
    target, _ = targets.make()
    with deployment.running(MEMSPACE_BACKUP_DEFAULT_TARGET=target):
        deployment.apply("napping", embeddingDim=DIM)
        deployment.wait_condition("napping", "Ready", "True")
        asyncio.run(remember(deployment, "napping", 7))
        creds = tenant_credentials(deployment.kube, ns, "napping", server_ns)
        before = asyncio.run(recall_all(creds))
        offloaded = offload(deployment, "napping")
        # What coming back needs is in the status itself, not only in the operator's memory.
        assert offloaded["tokenSha256"]
        assert offloaded["credentialsUid"]
        pod = shard_pod(deployment)
        assert pod is not None
        deployment.kube.core.delete_namespaced_pod(pod["metadata"]["name"], server_ns)
        wait_for("the offloaded claim to be deleted",
                 lambda: deployment.kube.pvc(server_ns, "space-napping") is None)  # fmt: skip
    with deployment.running(MEMSPACE_BACKUP_DEFAULT_TARGET=target):
        body = deployment.wait_condition("napping", "Ready", "False", "Offloaded")
        assert body["status"]["offload"]["backupId"] == offloaded["backupId"]

        # Its shard (restarted, holding no volume now) still answers for it.
        def answered() -> tuple[grpc.StatusCode, str] | None:
            answer = asyncio.run(recall_code(creds))
            return None if answer[0] is grpc.StatusCode.UNAVAILABLE else answer

        code, details = wait_for("the shard to answer for the offloaded space", answered, 60)
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert "Offloaded" in details
        assert deployment.kube.statefulset(server_ns, "memspace-shard-0") is not None
        deployment.kube.patch_spec(ns, "napping", {"state": "Active"})
        body = deployment.wait_condition("napping", "Ready", "True")
        assert body["status"]["restoredFrom"]["backupId"] == offloaded["backupId"]
        assert asyncio.run(recall_all(creds)) == before
