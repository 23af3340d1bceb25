"""The operator under its ServiceAccount's identity, with the chart's least-privilege RBAC
(charts/memspace/templates/rbac-operator.yaml), not as admin."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.operator.conftest import Deployment, unique, wait_events, wait_for
from tests.support import cluster as harness

pytestmark = pytest.mark.cluster

CHART = Path(__file__).resolve().parents[2] / "charts" / "memspace"
RBAC = "templates/rbac-operator.yaml"


def can_i(cluster: harness.Cluster, identity: Path, *args: str) -> bool:
    answer = cluster.kubectl("auth", "can-i", *args, kubeconfig=identity, check=False)
    return answer.stdout.strip() == "yes"


def test_the_operator_works_under_its_least_privilege_rbac(
    cluster: harness.Cluster, deployment: Deployment
) -> None:
    kube, ns, server_ns = deployment.kube, deployment.namespace, deployment.server_namespace
    release = unique("rbac")
    rendered = cluster.helm(
        "template", release, str(CHART), "--namespace", server_ns, "--show-only", RBAC
    ).stdout
    cluster.kubectl("apply", "-f", "-", input=rendered)
    try:
        identity = cluster.service_account_kubeconfig(server_ns, "memspace-operator")
        # Tenants' Secrets can be created and deleted, never read.
        assert can_i(cluster, identity, "create", "secrets", "-n", ns)
        assert can_i(cluster, identity, "delete", "secrets", "-n", ns)
        for verb in ("get", "list", "watch"):
            assert not can_i(cluster, identity, verb, "secrets", "-n", ns)
        # MemorySpaceClasses are read, never written.
        for verb in ("get", "list"):
            assert can_i(cluster, identity, verb, "memoryspaceclasses.memspace.dev")
        assert not can_i(cluster, identity, "create", "memoryspaceclasses.memspace.dev")
        # Volumes and shards only in the server namespace.
        assert can_i(cluster, identity, "create", "persistentvolumeclaims", "-n", server_ns)
        assert not can_i(cluster, identity, "create", "persistentvolumeclaims", "-n", ns)
        assert not can_i(cluster, identity, "create", "statefulsets.apps", "-n", ns)
        assert not can_i(cluster, identity, "get", "persistentvolumes")
        assert not can_i(cluster, identity, "list", "namespaces")

        with deployment.running(kubeconfig=identity):
            deployment.apply("least", storage={"size": "1Gi", "reclaimPolicy": "Delete"})
            deployment.wait_condition("least", "VolumeBound", "True")
            deployment.wait_condition("least", "Mounted", "True")
            assert kube.secret(ns, "least-memspace") is not None
            assert "least.json" in deployment.index(0)
            kube.patch_spec(ns, "least", {"storage": {"size": "2Gi"}, "state": "Inactive"})
            deployment.wait_condition("least", "Ready", "False", "Inactive")
            wait_for(
                "the claim to grow",
                lambda: (
                    (kube.pvc(server_ns, "space-least") or {})["spec"]["resources"]["requests"][
                        "storage"
                    ]
                    == "2Gi"
                ),
            )
            kube.delete_space(ns, "least")
            deployment.wait_gone("least")
            assert kube.pvc(server_ns, "space-least") is None or wait_for(
                "the claim to go", lambda: kube.pvc(server_ns, "space-least") is None
            )
            # Posted in the background: waited for while the operator runs to post them.
            wait_events(kube, ns, "least", "ClaimCreated", "CredentialsCreated", "VolumeReleased")
        reasons = {e["reason"] for e in kube.events(ns, "least")}
        assert {"ClaimCreated", "CredentialsCreated", "VolumeReleased"} <= reasons
        assert not any(e["type"] == "Warning" for e in kube.events(ns, "least")), [
            e["message"] for e in kube.events(ns, "least")
        ]
    finally:
        cluster.kubectl("delete", "-f", "-", "--wait=false", input=rendered, check=False)
