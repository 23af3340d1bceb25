"""The test node runs real pods: logs, exec, non-root volumes, Services reached through CoreDNS."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support import cluster as harness
from tests.support import node as nodes

pytestmark = pytest.mark.cluster


def pod(
    name: str, namespace: str, command: str, image: str = nodes.BUSYBOX_IMAGE, **spec: Any
) -> dict[str, Any]:
    """A pod running ``sh -c command``, in the node's busybox toolbox image by default."""
    container = {
        "name": "main",
        "image": image,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", command],
        **spec.pop("container", {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {"containers": [container], "terminationGracePeriodSeconds": 0, **spec},
    }


def run_pod(cluster: harness.Cluster, manifest: dict[str, Any], timeout: int = 120) -> None:
    """Create a pod and wait until it is Ready."""
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    meta = manifest["metadata"]
    cluster.kubectl(
        "wait", "--for=condition=Ready", f"pod/{meta['name']}", "-n", meta["namespace"],
        f"--timeout={timeout}s", timeout=timeout + 10,
    )  # fmt: skip


def exec_in(cluster: harness.Cluster, namespace: str, name: str, *command: str) -> str:
    return cluster.kubectl("exec", name, "-n", namespace, "--", *command).stdout


def test_the_node_is_ready_at_its_address_with_the_built_kubelet(
    node_cluster: harness.Cluster,
) -> None:
    got = node_cluster.kubectl("get", "node", nodes.NODE_NAME, "-o", "json").stdout
    node = json.loads(got)
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True"
    assert {"type": "InternalIP", "address": nodes.NODE_IP} in node["status"]["addresses"]
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == node_cluster.version
    assert info["containerRuntimeVersion"].startswith("containerd://2.")
    assert node_cluster.server.startswith(f"https://{nodes.NODE_IP}:")


def test_a_pod_runs_and_its_logs_and_exec_work(
    node_cluster: harness.Cluster, node_namespace: str
) -> None:
    run_pod(node_cluster, pod("hello", node_namespace, "echo hello from a pod; exec sleep 3600"))
    logs = node_cluster.kubectl("logs", "hello", "-n", node_namespace).stdout
    assert logs == "hello from a pod\n"
    assert exec_in(node_cluster, node_namespace, "hello", "hostname").strip() == "hello"
    status = json.loads(
        node_cluster.kubectl("get", "pod", "hello", "-n", node_namespace, "-o", "json").stdout
    )["status"]
    assert status["podIP"].startswith("10.244.0.")
    assert status["hostIP"] == nodes.NODE_IP


def test_a_pod_gets_a_service_account_token_and_reaches_the_api_server(
    node_cluster: harness.Cluster, node_namespace: str
) -> None:
    run_pod(node_cluster, pod("sa", node_namespace, "exec sleep 3600"))
    secrets = "/var/run/secrets/kubernetes.io/serviceaccount"
    token = exec_in(node_cluster, node_namespace, "sa", "cat", f"{secrets}/token")
    assert token.count(".") == 2  # a JWT
    assert exec_in(node_cluster, node_namespace, "sa", "cat", f"{secrets}/namespace") == (
        node_namespace
    )
    # The `kubernetes` Service leads to the API server on the node's address (a TCP connect).
    env = exec_in(node_cluster, node_namespace, "sa", "env")
    assert "KUBERNETES_SERVICE_HOST=10.0.0.1" in env
    connect = exec_in(
        node_cluster, node_namespace, "sa", "sh", "-c", "nc -w 5 10.0.0.1 443 </dev/null; echo $?"
    )
    assert connect.strip().endswith("0")


@pytest.mark.parametrize("storage_class", [None, nodes.IMMEDIATE_STORAGE_CLASS])
def test_a_non_root_pod_writes_a_local_path_volume(
    node_cluster: harness.Cluster, node_namespace: str, storage_class: str | None
) -> None:
    claim: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data", "namespace": node_namespace},
        "spec": {  # no storageClassName: local-path is the default class of the node cluster
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    if storage_class is not None:
        claim["spec"]["storageClassName"] = storage_class
    node_cluster.kubectl("apply", "-f", "-", input=json.dumps(claim))
    if storage_class == nodes.IMMEDIATE_STORAGE_CLASS:  # bound before any pod uses it
        node_cluster.kubectl(
            "wait", "--for=jsonpath={.status.phase}=Bound", "pvc/data", "-n", node_namespace,
            "--timeout=60s",
        )  # fmt: skip
    writer = pod(
        "writer", node_namespace, "echo written by $(id -u) > /data/proof; exec sleep 3600",
        securityContext={"runAsUser": 10001, "runAsGroup": 10001, "runAsNonRoot": True},
        volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
        container={"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
    )  # fmt: skip
    run_pod(node_cluster, writer)
    assert exec_in(node_cluster, node_namespace, "writer", "cat", "/data/proof") == (
        "written by 10001\n"
    )
    pvc = json.loads(
        node_cluster.kubectl("get", "pvc", "data", "-n", node_namespace, "-o", "json").stdout
    )
    assert pvc["status"]["phase"] == "Bound"
    assert pvc["spec"]["storageClassName"] == (storage_class or nodes.STORAGE_CLASS)
    pv = json.loads(
        node_cluster.kubectl("get", "pv", pvc["spec"]["volumeName"], "-o", "json").stdout
    )
    host_dir = Path(pv["spec"].get("hostPath", pv["spec"].get("local", {}))["path"])
    assert (host_dir / "proof").read_text() == "written by 10001\n"


def test_a_cluster_ip_service_is_reached_from_a_pod_by_its_dns_name(
    node_cluster: harness.Cluster, node_namespace: str
) -> None:
    marker = uuid.uuid4().hex
    web = pod(
        "web", node_namespace,
        f"mkdir -p /www && echo {marker} > /www/index.html && exec httpd -f -p 8080 -h /www",
        container={"readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}},
    )  # fmt: skip
    run_pod(node_cluster, web)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": node_namespace},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    node_cluster.kubectl("apply", "-f", "-", input=json.dumps(service))
    run_pod(node_cluster, pod("client", node_namespace, "exec sleep 3600"))
    name = f"web.{node_namespace}.svc.cluster.local"
    # HTTP by hand through nc (the static busybox's wget crashes). kube-proxy programs a new
    # Service within a second or two: retry briefly in the pod.
    fetch = (
        "for i in $(seq 50); do"
        " out=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 $0 80) && [ -n \"$out\" ]"
        ' && echo "$out" && exit 0; sleep 0.2; done; exit 1'
    )
    page = exec_in(node_cluster, node_namespace, "client", "sh", "-c", fetch, name)
    assert page.split()[1] == "200", page
    assert page.endswith(f"\n{marker}\n")
    short = exec_in(node_cluster, node_namespace, "client", "sh", "-c", fetch, "web")
    assert short.endswith(f"\n{marker}\n")  # the search path of the pod's namespace
    lookup = exec_in(node_cluster, node_namespace, "client", "nslookup", name, nodes.DNS_IP)
    cluster_ip = json.loads(
        node_cluster.kubectl("get", "service", "web", "-n", node_namespace, "-o", "json").stdout
    )["spec"]["clusterIP"]
    assert cluster_ip in lookup


def test_an_imported_image_runs_by_its_name(
    node_cluster: harness.Cluster, node_namespace: str, tmp_path: Path
) -> None:
    tar = tmp_path / "probe.tar"
    tag = f"memspace.test/probe:{uuid.uuid4().hex[:8]}"
    nodes.run(
        "python3", str(harness.REPO / "hack" / "node" / "images.py"), str(tar), "--tag", tag,
        "--busybox", "/bin/busybox", "--cmd", "sh",
    )  # fmt: skip
    assert harness.import_image(node_cluster, tar) == [tag]
    run_pod(node_cluster, pod("probe", node_namespace, "echo imported; exec sleep 3600", tag))
    assert node_cluster.kubectl("logs", "probe", "-n", node_namespace).stdout == "imported\n"
