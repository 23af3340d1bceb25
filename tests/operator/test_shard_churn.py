"""Tenants come and go without bouncing others: a deletion or Inactive never changes a shard's
pod template (its volume leaves at the shard's next restart, a Delete claim waits for that);
new spaces go only to the intake shard, which is sealed when full or after its window; an empty
shard is scaled to zero and removed; Mounted is True only once a Ready pod mounts the space.

The pods here are the control plane's own (its StatefulSet controller makes them); no node runs
them, and the tests' PodStatuses stand-in reports them Ready. tests/e2e does the same on pods
that really run."""

from __future__ import annotations

import time
import uuid
from typing import Any

import kubernetes.client
import pytest

from tests.operator.conftest import Deployment, condition, mounted_claims, wait_events, wait_for

pytestmark = pytest.mark.cluster

SHARD_SELECTOR = "app.kubernetes.io/component=shard"


def shard_pod(deployment: Deployment, shard: int) -> dict[str, Any] | None:
    for pod in deployment.kube.pods(deployment.server_namespace, SHARD_SELECTOR):
        labels, terminating = pod["metadata"]["labels"], pod["metadata"].get("deletionTimestamp")
        if labels.get("memspace.dev/shard") == str(shard) and not terminating:
            return pod
    return None


def template_generation(deployment: Deployment, shard: int) -> int:
    statefulset = deployment.kube.statefulset(
        deployment.server_namespace, f"memspace-shard-{shard}"
    )
    assert statefulset is not None
    return int(statefulset["metadata"]["generation"])


def test_deleting_or_deactivating_a_space_leaves_its_shard_running_until_it_restarts(
    deployment: Deployment,
) -> None:
    kube, ns, server_ns = deployment.kube, deployment.namespace, deployment.server_namespace
    with deployment.running():
        for name in ("stays", "leaves", "sleeps"):
            deployment.apply(name, storage={"reclaimPolicy": "Delete"})
        for name in ("stays", "leaves", "sleeps"):
            deployment.wait_condition(name, "Mounted", "True")
        generation = template_generation(deployment, 0)
        pod = shard_pod(deployment, 0)
        assert pod is not None

        kube.delete_space(ns, "leaves")
        kube.patch_spec(ns, "sleeps", {"state": "Inactive"})
        deployment.wait_gone("leaves")
        deployment.wait_condition("sleeps", "Ready", "False", "Inactive")
        assert "leaves.json" not in deployment.index(0)

        # No restart: the template and the pod are the same; the deleted space's claim waits.
        assert template_generation(deployment, 0) == generation
        assert (shard_pod(deployment, 0) or {})["metadata"]["uid"] == pod["metadata"]["uid"]
        pvc = kube.pvc(server_ns, "space-leaves")
        assert pvc is not None
        assert pvc["metadata"]["labels"]["memspace.dev/delete-pending"] == "true"
        mounts = mounted_claims(kube.statefulset(server_ns, "memspace-shard-0"))
        assert set(mounts.values()) == {"space-stays", "space-leaves", "space-sleeps"}
        wait_events(kube, ns, "leaves", "VolumeReleased")

        # The shard restarts for another reason (its pod is deleted): the template drops both
        # volumes for the new pod, and the waiting claim goes.
        kube.core.delete_namespaced_pod(pod["metadata"]["name"], server_ns)
        wait_for(
            "the template to drop the deleted and the Inactive space",
            lambda: (
                set(mounted_claims(kube.statefulset(server_ns, "memspace-shard-0")).values())
                == {"space-stays"}
            ),
        )
        wait_for(
            "the waiting claim to be deleted", lambda: kube.pvc(server_ns, "space-leaves") is None
        )
        deployment.wait_condition("stays", "Mounted", "True")
        assert kube.pvc(server_ns, "space-sleeps") is not None

        # Active again: its shard (still the intake one here) mounts it again.
        kube.patch_spec(ns, "sleeps", {"state": "Active"})
        wait_for(
            "the template to mount the space again",
            lambda: (
                "space-sleeps"
                in mounted_claims(kube.statefulset(server_ns, "memspace-shard-0")).values()
            ),
        )
        deployment.wait_condition("sleeps", "Mounted", "True")


def test_a_restart_with_nothing_to_drop_leaves_no_trace_for_a_later_deactivation(
    deployment: Deployment,
) -> None:
    kube, ns, server_ns = deployment.kube, deployment.namespace, deployment.server_namespace
    with deployment.running():
        for name in ("steady", "dozes"):
            deployment.apply(name)
        for name in ("steady", "dozes"):
            deployment.wait_condition(name, "Mounted", "True")
        pod = shard_pod(deployment, 0)
        assert pod is not None
        kube.core.delete_namespaced_pod(pod["metadata"]["name"], server_ns)
        wait_for(
            "a new shard pod",
            lambda: (shard_pod(deployment, 0) or pod)["metadata"]["uid"] != pod["metadata"]["uid"],
        )
        generation = template_generation(deployment, 0)
        replacement = shard_pod(deployment, 0) or {}

        kube.patch_spec(ns, "dozes", {"state": "Inactive"})
        deployment.wait_condition("dozes", "Ready", "False", "Inactive")
        time.sleep(2)  # a template change, if one were coming, is written within a second
        assert template_generation(deployment, 0) == generation
        assert (shard_pod(deployment, 0) or {})["metadata"]["uid"] == replacement["metadata"]["uid"]


def test_new_spaces_go_to_the_intake_shard_and_a_sealed_shard_is_never_changed(
    deployment: Deployment,
) -> None:
    kube, ns, server_ns = deployment.kube, deployment.namespace, deployment.server_namespace
    with deployment.running(MEMSPACE_MAX_SPACES_PER_SHARD="2", MEMSPACE_SHARD_INTAKE_WINDOW="600"):
        for name in ("first", "second"):
            deployment.apply(name)
        for name in ("first", "second"):
            assert deployment.wait_condition(name, "Mounted", "True")["status"]["shard"] == 0
        wait_for(
            "shard 0 to be sealed (full)",
            lambda: (
                "memspace.dev/sealed-at"
                in (kube.statefulset(server_ns, "memspace-shard-0") or {})["metadata"][
                    "annotations"
                ]
            ),
        )
        generation = template_generation(deployment, 0)

        # A deletion frees a slot in shard 0's count only once unmounted; and shard 0 is sealed
        # anyway: the next space opens shard 1.
        kube.delete_space(ns, "first")
        deployment.wait_gone("first")
        deployment.apply("third")
        body = deployment.wait_condition("third", "Mounted", "True")
        assert body["status"]["shard"] == 1
        assert template_generation(deployment, 0) == generation


def test_an_intake_shard_is_sealed_after_its_window(deployment: Deployment) -> None:
    kube, server_ns = deployment.kube, deployment.server_namespace
    with deployment.running(MEMSPACE_SHARD_INTAKE_WINDOW="4"):
        deployment.apply("early")
        assert deployment.wait_condition("early", "Mounted", "True")["status"]["shard"] == 0
        wait_for(
            "shard 0 to be sealed (its window ended)",
            lambda: (
                "memspace.dev/sealed-at"
                in (kube.statefulset(server_ns, "memspace-shard-0") or {})["metadata"][
                    "annotations"
                ]
            ),
        )
        generation = template_generation(deployment, 0)
        deployment.apply("late")
        assert deployment.wait_condition("late", "Mounted", "True")["status"]["shard"] == 1
        assert template_generation(deployment, 0) == generation


def test_an_empty_shard_is_scaled_to_zero_and_removed(deployment: Deployment) -> None:
    kube, ns, server_ns = deployment.kube, deployment.namespace, deployment.server_namespace
    with deployment.running(MEMSPACE_MAX_SPACES_PER_SHARD="1"):
        deployment.apply("lonely", storage={"reclaimPolicy": "Delete"})
        deployment.apply("neighbour")
        shards = {
            name: deployment.wait_condition(name, "Mounted", "True")["status"]["shard"]
            for name in ("lonely", "neighbour")
        }
        assert sorted(shards.values()) == [0, 1]
        emptied, other = shards["lonely"], shards["neighbour"]
        generation = template_generation(deployment, other)

        kube.delete_space(ns, "lonely")
        deployment.wait_gone("lonely")
        name = f"memspace-shard-{emptied}"
        wait_for("the empty shard to be removed", lambda: kube.statefulset(server_ns, name) is None)
        assert kube.secret(server_ns, f"{name}-spaces") is None
        with pytest.raises(kubernetes.client.ApiException) as gone:
            kube.core.read_namespaced_service(name, server_ns)
        assert gone.value.status == 404
        wait_for("its claim to be deleted", lambda: kube.pvc(server_ns, "space-lonely") is None)
        assert template_generation(deployment, other) == generation

        # Its number is free again for the next shard.
        deployment.apply("newcomer")
        body = deployment.wait_condition("newcomer", "Mounted", "True")
        assert body["status"]["shard"] == emptied


def test_mounted_waits_for_a_ready_pod_made_from_the_template_that_mounts_the_space(
    deployment: Deployment,
) -> None:
    kube, server_ns = deployment.kube, deployment.server_namespace
    statuses = deployment.pod_statuses
    assert statuses is not None
    statuses.paused = True
    with deployment.running():
        deployment.apply("patient")
        body = deployment.wait_condition("patient", "Mounted", "False", "PodPending")
        assert "waiting for the pod" in condition(body, "Mounted")["message"]
        assert condition(body, "Ready")["status"] != "True"

        statuses.paused = False
        body = deployment.wait_condition("patient", "Mounted", "True")
        pod = shard_pod(deployment, 0)
        assert pod is not None
        revision = pod["metadata"]["labels"]["controller-revision-hash"]
        message = condition(body, "Mounted")["message"]
        assert pod["metadata"]["name"] in message
        assert revision in message
        statefulset = kube.statefulset(server_ns, "memspace-shard-0") or {}
        assert statefulset["status"]["updateRevision"] == revision

        # The pod stops being Ready: Mounted follows.
        statuses.gate = lambda _pod: False
        deployment.wait_condition("patient", "Mounted", "False", "PodPending")


def test_a_static_volume_is_bound_by_name(deployment: Deployment, tmp_path: Any) -> None:
    kube, server_ns = deployment.kube, deployment.server_namespace
    name = f"static-{uuid.uuid4().hex[:8]}"
    kube.core.create_persistent_volume(
        {  # type: ignore[arg-type]  # the client takes a plain dict as well
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": "2Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": str(tmp_path / "static")},
            },
        }
    )
    try:
        with deployment.running():
            deployment.apply("pinned", storage={"size": "1Gi", "volumeName": name})
            body = deployment.wait_condition("pinned", "VolumeBound", "True")
            assert name in condition(body, "VolumeBound")["message"]
            pvc = kube.pvc(server_ns, "space-pinned") or {}
            assert pvc["spec"]["volumeName"] == name
            assert pvc["spec"]["storageClassName"] == ""
    finally:
        kube.core.delete_persistent_volume(name)
