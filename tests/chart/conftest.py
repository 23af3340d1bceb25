"""Fixtures and helpers of the chart tests: helm run on charts/memspace (template and lint need no
cluster), and `Installation`, the chart installed into a cluster for real, used alike by the
local control-plane tests and by the kind end to end (hack/e2e-kind.sh)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import cluster as harness
from tests.support import controlplane

CHART = controlplane.REPO / "charts" / "memspace"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
    "pod-security.kubernetes.io/warn": "restricted",
    "pod-security.kubernetes.io/warn-version": "latest",
}
"""Labels of every namespace the tests install into: Pod Security `restricted`, enforced."""

Manifest = dict[str, Any]


class Helm:
    """helm, run on the chart with its caches and config in a directory of its own."""

    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        self.home = home

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            **{
                f"HELM_{kind}_HOME": str(self.home / kind.lower())
                for kind in ("CACHE", "CONFIG", "DATA")
            },
        }
        argv = [str(self.binary), *args]
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, env=env, check=False
        )
        if check and result.returncode != 0:
            raise controlplane.KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def template(
        self,
        values: Mapping[str, Any] | None = None,
        *,
        release: str = "memspace",
        namespace: str = "memspace-system",
    ) -> list[Manifest]:
        """The chart rendered with `values` (merged over values.yaml), as objects."""
        with values_file(values or {}, self.home) as path:
            rendered = self.run("template", release, str(CHART), "-n", namespace, "-f", str(path))
        return parse(rendered.stdout)


def parse(stream: str) -> list[Manifest]:
    """The objects of a YAML stream, empty documents dropped."""
    return [doc for doc in yaml.safe_load_all(stream) if doc]


@contextlib.contextmanager
def values_file(values: Mapping[str, Any], directory: Path) -> Iterator[Path]:
    """`values` in a file for `helm -f` (JSON is YAML)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"values-{uuid.uuid4().hex[:8]}.json"
    path.write_text(json.dumps(values))
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def find(objects: Sequence[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [
        obj for obj in objects
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]  # fmt: skip


def one(objects: Sequence[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def env_of(deployment: Manifest) -> dict[str, str]:
    """The operator container's environment (plain values)."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item["value"] for item in container.get("env") or [] if "value" in item}


def full_values(server_namespace: str) -> dict[str, Any]:
    """A value for every key of values.yaml, none of them the default."""
    return {
        "serverNamespace": server_namespace,
        "image": {
            "repository": "registry.example.com/memspace/memspace",
            "tag": "1.2.3",
            "digest": "",
            "pullPolicy": "Always",
        },
        "imagePullSecrets": [{"name": "registry-credentials"}],
        "crds": {"install": True, "keep": False},
        "operator": {
            "replicas": 3,
            "leaderElection": {
                "enabled": True,
                "leaseDuration": 20,
                "renewDeadline": 12.5,
                "retryPeriod": 3,
            },
            "podDisruptionBudget": {"enabled": False},
            "serviceAccount": {
                "create": True,
                "name": "memspace-controller",
                "annotations": {"example.com/owner": "platform"},
            },
            "healthInterval": 7.5,
            "resyncInterval": 120,
            "apiConcurrency": 8,
            "verbose": True,
            "probePort": 9808,
            "resources": {
                "requests": {"cpu": "50m", "memory": "128Mi"},
                "limits": {"cpu": "1", "memory": "1Gi"},
            },
            "podAnnotations": {"example.com/scrape": "false"},
            "podLabels": {"example.com/team": "platform"},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [
                {
                    "key": "dedicated",
                    "operator": "Equal",
                    "value": "memspace",
                    "effect": "NoSchedule",
                }
            ],
            "affinity": {
                "nodeAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 50,
                            "preference": {
                                "matchExpressions": [
                                    {
                                        "key": "example.com/pool",
                                        "operator": "In",
                                        "values": ["system"],
                                    }
                                ]
                            },
                        }
                    ]
                }
            },
            "priorityClassName": "system-cluster-critical",
        },
        "server": {
            "image": {
                "repository": "registry.example.com/memspace/server",
                "tag": "",
                "digest": "sha256:" + "ab" * 32,
            },
            "resources": {
                "requests": {"cpu": "2", "memory": "8Gi"},
                "limits": {"memory": "16Gi"},
            },
            "maxSpacesPerShard": 12,
            "maxShards": 1000000,
            "mountBatchWindow": 2.5,
            "serviceAccountName": "memspace-shard",
            "endpointTemplate": "memspace-shard-{shard}.{namespace}.svc.corp.example:50051",
            "embedding": {"models": [], "threads": 2},
        },
        "defaultStorageClass": "fast-ssd",
        "adminToken": {"create": True, "secretName": "shards-admin-token"},
        "tls": {
            "enabled": True,
            "certManager": {
                "issuerRef": {},
                "secretName": "shards-tls",
                "duration": "720h",
                "renewBefore": "240h",
            },
            "caLifetimeDays": 1825,
            "certLifetimeDays": 30,
            "clusterDomain": "corp.example",
            "clientAuth": True,
        },
        "tracing": {
            "env": {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4317",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
            }
        },
        "networkPolicy": {
            "enabled": True,
            "clientNamespaceLabels": {"example.com/memspace-client": "yes"},
            "clientPodLabels": {"example.com/agent": "true"},
            "metricsNamespace": "prometheus",
            "metricsNamespaceLabels": {"example.com/monitoring": "true"},
            "denyShardEgress": True,
            "extraIngress": [
                {
                    "from": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
                    "ports": [{"port": "grpc", "protocol": "TCP"}],
                }
            ],
        },
        "admission": {
            "spaceIdPrefix": {
                "enabled": True,
                "namespaceSelector": {"matchLabels": {"example.com/tenant": "true"}},
            },
            "operatorSecrets": {"enabled": True},
        },
        "podDisruptionBudget": {"enabled": True, "maxUnavailable": "25%"},
        "metrics": {
            "auth": {"enabled": True, "create": True, "secretName": "shards-metrics-token"},
            "serviceMonitor": {
                "enabled": True,
                "namespace": "",
                "labels": {"release": "prometheus"},
                "interval": "15s",
                "scrapeTimeout": "5s",
            },
        },
    }


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """helm from .cluster/bin (or $PATH), without a cluster."""
    try:
        tools = controlplane.find_tools(names=("helm",), search_path=True)
    except controlplane.ToolsMissingError as err:
        pytest.fail(str(err), pytrace=False)
    return Helm(tools["helm"], tmp_path_factory.mktemp("helm"))


# --- in a cluster ---------------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def create_namespace(cluster: harness.Cluster, name: str, labels: Mapping[str, str]) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": dict(labels)},
    }
    cluster.kubectl("create", "-f", "-", input=json.dumps(body))


class Installation:
    """The chart installed by `helm install` into namespaces of its own (Pod Security restricted):
    the release namespace (the operator) and the server namespace (shards, PVCs, admin token)."""

    def __init__(self, cluster: harness.Cluster, workdir: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.release = unique("memspace")
        self.namespace = unique("memspace-operator")
        self.server_namespace = unique("memspace-system")
        self.installed = False
        for name in (self.namespace, self.server_namespace):
            create_namespace(cluster, name, RESTRICTED)

    def install(self, values: Mapping[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
        merged = {"serverNamespace": self.server_namespace, **values}
        with values_file(merged, self.workdir) as path:
            result = self.cluster.helm(
                "install", self.release, str(CHART), "-n", self.namespace, "-f", str(path), *args,
                timeout=600,
            )  # fmt: skip
        self.installed = True
        return result

    def uninstall(self) -> subprocess.CompletedProcess[str]:
        self.installed = False
        return self.cluster.helm("uninstall", self.release, "-n", self.namespace, "--wait")

    def get(self, kind: str, name: str, namespace: str | None = None) -> Manifest:
        found = self.cluster.kubectl(
            "get", kind, name, "-n", namespace or self.namespace, "-o", "json"
        )
        body: Manifest = json.loads(found.stdout)
        return body

    def operator_env(self) -> dict[str, str]:
        """The environment the chart gives the operator, read from the installed Deployment."""
        return env_of(self.get("deployment", f"{self.release}-operator"))

    def admin_token(self, namespace: str) -> str:
        secret = self.get("secret", "memspace-admin-token", namespace)
        return base64.b64decode(secret["data"]["token"]).decode()

    def can(self, kubeconfig: Path, *args: str) -> bool:
        """`kubectl auth can-i ...` as the identity of `kubeconfig`."""
        answer = self.cluster.kubectl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False)
        return answer.stdout.strip() == "yes"

    def close(self) -> None:
        if self.installed:
            with contextlib.suppress(controlplane.KubectlError):
                self.uninstall()
        for name in (self.namespace, self.server_namespace):
            self.cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def installation(
    cluster: harness.Cluster, crds: list[str], tmp_path: Path
) -> Iterator[Installation]:
    installed = Installation(cluster, tmp_path)
    try:
        yield installed
    finally:
        installed.close()
