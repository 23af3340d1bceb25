"""The control plane is a real Kubernetes API server with a working controller-manager."""

from __future__ import annotations

import json
import os
from pathlib import Path

import kubernetes.client
import pytest

from tests.support import cluster as harness

pytestmark = pytest.mark.cluster


def test_api_server_is_ready(cluster: harness.Cluster) -> None:
    status, body = cluster.request("GET", "/readyz")
    assert (status, body) == (200, "ok")


def test_api_server_reports_the_version_it_was_built_at(cluster: harness.Cluster) -> None:
    status, body = cluster.request("GET", "/version")
    assert status == 200
    assert body["gitVersion"] == cluster.version
    assert (body["major"], body["minor"]) == ("1", cluster.version.split(".")[1])


def test_tools_are_linked_in_one_place(cluster: harness.Cluster) -> None:
    for tool in cluster.tools.values():
        assert os.access(tool, os.X_OK), tool
    versions = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert versions["serverVersion"]["gitVersion"] == cluster.version


def test_kubernetes_client_talks_to_it(cluster: harness.Cluster) -> None:
    with cluster.kube_api() as api:
        items = kubernetes.client.CoreV1Api(api).list_namespace().items
    names = [ns.metadata.name for ns in items if ns.metadata is not None]
    assert {"default", "kube-system"} <= set(names)


def test_a_namespace_is_created_used_and_finishes_deleting(cluster: harness.Cluster) -> None:
    cluster.kubectl("create", "namespace", "harness-ns")
    cluster.kubectl("create", "configmap", "settings", "-n", "harness-ns", "--from-literal=a=1")
    got = cluster.kubectl("get", "configmap", "settings", "-n", "harness-ns", "-o", "json").stdout
    assert json.loads(got)["data"] == {"a": "1"}
    # Only the controller-manager's namespace controller empties and removes a namespace.
    cluster.kubectl("delete", "namespace", "harness-ns", "--timeout=60s")
    assert cluster.kubectl("get", "namespace", "harness-ns", check=False).returncode != 0


def test_owner_references_are_garbage_collected(cluster: harness.Cluster, namespace: str) -> None:
    cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    uid = cluster.kubectl(
        "get", "configmap", "owner", "-n", namespace, "-o=jsonpath={.metadata.uid}"
    )
    owned = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "owned",
            "namespace": namespace,
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid.stdout}
            ],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(owned))
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)
    cluster.kubectl("wait", "--for=delete", "configmap/owned", "-n", namespace, "--timeout=60s")


def test_a_claim_of_the_hostpath_storage_class_binds(
    cluster: harness.Cluster, namespace: str
) -> None:
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data", "namespace": namespace},
        "spec": {  # no storageClassName: hostpath is the default class
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(claim))
    cluster.kubectl(
        "wait", "--for=jsonpath={.status.phase}=Bound", "pvc/data", "-n", namespace, "--timeout=60s"
    )
    pvc = json.loads(cluster.kubectl("get", "pvc", "data", "-n", namespace, "-o", "json").stdout)
    assert pvc["spec"]["storageClassName"] == harness.STORAGE_CLASS
    pv = json.loads(cluster.kubectl("get", "pv", pvc["spec"]["volumeName"], "-o", "json").stdout)
    path = Path(pv["spec"]["hostPath"]["path"])
    assert path.parent == harness.HOSTPATH_ROOT
    if cluster.local:  # elsewhere the directory is on the node
        assert path.is_dir()


def test_a_service_account_token_is_denied_what_its_role_does_not_allow(
    cluster: harness.Cluster, namespace: str
) -> None:
    cluster.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    cluster.kubectl(
        "create", "role", "read-configmaps", "-n", namespace,
        "--verb=get,list", "--resource=configmaps",
    )  # fmt: skip
    cluster.kubectl(
        "create", "rolebinding", "reader", "-n", namespace,
        "--role=read-configmaps", f"--serviceaccount={namespace}:reader",
    )  # fmt: skip
    reader = cluster.service_account_kubeconfig(namespace, "reader")

    allowed = cluster.kubectl("get", "configmaps", "-n", namespace, kubeconfig=reader)
    assert allowed.returncode == 0
    denied = cluster.kubectl("get", "secrets", "-n", namespace, kubeconfig=reader, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr
    assert f"system:serviceaccount:{namespace}:reader" in denied.stderr
    with cluster.kube_api(reader) as api:
        core = kubernetes.client.CoreV1Api(api)
        with pytest.raises(kubernetes.client.ApiException) as denial:
            core.create_namespaced_config_map(
                namespace,
                kubernetes.client.V1ConfigMap(metadata=kubernetes.client.V1ObjectMeta(name="nope")),
            )
    assert denial.value.status == 403


def test_helm_is_the_pinned_version_and_reaches_the_cluster(cluster: harness.Cluster) -> None:
    env = (harness.REPO / "hack" / "k8s" / "versions.env").read_text()
    pinned = next(
        line.split("=")[1] for line in env.splitlines() if line.startswith("HELM_VERSION")
    )
    if cluster.local:
        assert cluster.helm("version", "--short").stdout.startswith(pinned)
    assert cluster.helm("list", "--all-namespaces", "-o", "json").stdout.strip() == "[]"
