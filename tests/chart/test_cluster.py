"""The chart against a real API server (Kubernetes 1.36 on the local control plane, or kind):
every object it renders is valid and passes Pod Security `restricted`, and the chart installed
for real gives the operator what it needs and no more: the operator, run with the chart's
ServiceAccount token and the chart's settings, serves a space end to end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.chart import serving
from tests.chart.conftest import (
    CHART,
    RESTRICTED,
    Helm,
    Installation,
    create_namespace,
    full_values,
    unique,
)
from tests.operator.conftest import Kube, endpoint_template, wait_for
from tests.operator.kubelet import FakeKubelet
from tests.support import cluster as harness

pytestmark = pytest.mark.cluster

DURATION = (
    "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
SERVICE_MONITOR_SPEC = {
    "type": "object",
    "required": ["selector", "endpoints"],
    "properties": {
        "jobLabel": {"type": "string"},
        "targetLabels": {"type": "array", "items": {"type": "string"}},
        "namespaceSelector": {
            "type": "object",
            "properties": {
                "any": {"type": "boolean"},
                "matchNames": {"type": "array", "items": {"type": "string"}},
            },
        },
        "selector": {
            "type": "object",
            "properties": {
                "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}
            },
        },
        "endpoints": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "port": {"type": "string"},
                    "path": {"type": "string"},
                    "scheme": {"type": "string", "enum": ["http", "https"]},
                    "interval": {"type": "string", "pattern": DURATION},
                    "scrapeTimeout": {"type": "string", "pattern": DURATION},
                    "authorization": {
                        "type": "object",
                        "properties": {
                            "type": {"type": "string"},
                            "credentials": {
                                "type": "object",
                                "required": ["key"],
                                "properties": {
                                    "key": {"type": "string"},
                                    "name": {"type": "string"},
                                    "optional": {"type": "boolean"},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
SERVICE_MONITOR_CRD = {
    # The Prometheus Operator's CRD, cut down to the fields the chart uses; the real one is
    # larger, not different. It lets the API server validate the chart's ServiceMonitor.
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "kind": "ServiceMonitor",
            "plural": "servicemonitors",
            "singular": "servicemonitor",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "required": ["spec"],
                        "properties": {"spec": SERVICE_MONITOR_SPEC},
                    }
                },
            }
        ],
    },
}


@pytest.fixture(scope="module")
def service_monitors(cluster: harness.Cluster) -> Iterator[str]:
    """The ServiceMonitor CRD (unless the cluster has the Prometheus Operator's own)."""
    name = "servicemonitors.monitoring.coreos.com"
    present = cluster.kubectl("get", "crd", name, check=False).returncode == 0
    if not present:
        cluster.kubectl("create", "-f", "-", input=json.dumps(SERVICE_MONITOR_CRD))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}")
    yield name
    if not present:
        cluster.kubectl("delete", "crd", name, "--wait=false", check=False)


@pytest.mark.parametrize("values", ["default", "full"])
def test_every_rendered_object_is_valid_and_restricted_on_the_api_server(
    cluster: harness.Cluster,
    crds: list[str],
    service_monitors: str,
    helm: Helm,
    values: str,
) -> None:
    release_namespace, server_namespace = unique("memspace-ops"), unique("memspace-spaces")
    for name in (release_namespace, server_namespace):
        create_namespace(cluster, name, RESTRICTED)
    try:
        chosen = full_values(server_namespace) if values == "full" else {}
        objects = helm.template(chosen, release=unique("memspace"), namespace=release_namespace)
        kinds = {obj["kind"] for obj in objects}
        expected = {"CustomResourceDefinition", "Deployment", "Secret", "ServiceAccount"}
        expected |= {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
        expected |= {"PodDisruptionBudget", "NetworkPolicy"}
        expected |= {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
        if values == "full":
            expected |= {"ServiceMonitor"}
        assert kinds == expected
        stream = "\n---\n".join(json.dumps(obj) for obj in objects)
        # Server-side apply, dry run: the API server validates every object, strictly (unknown
        # fields are errors), admits it (Pod Security warns about any pod template that would be
        # refused) and persists nothing.
        result = cluster.kubectl(
            "apply", "--server-side", "--dry-run=server", "--validate=strict",
            "--field-manager=memspace-chart-test", "--force-conflicts", "-f", "-",
            input=stream,
        )  # fmt: skip
        assert result.stderr.strip() == "", result.stderr
        assert len(result.stdout.strip().splitlines()) == len(objects)
    finally:
        for name in (release_namespace, server_namespace):
            cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_helm_installs_upgrades_and_uninstalls_keeping_the_crd(
    cluster: harness.Cluster, crds: list[str], installation: Installation
) -> None:
    adopted = [name.replace(".apiextensions.k8s.io/", "/") for name in crds]
    assert "customresourcedefinition/memoryspaces.memspace.dev" in adopted
    release = installation.release
    # The session's CRDs were applied by kubectl; mark them as this release's so that helm adopts
    # them (what a user does to move a CRD applied by hand under the chart, docs/install.md).
    for crd in adopted:
        cluster.kubectl("label", crd, "app.kubernetes.io/managed-by=Helm", "--overwrite")
        cluster.kubectl(
            "annotate", crd, f"meta.helm.sh/release-name={release}",
            f"meta.helm.sh/release-namespace={installation.namespace}", "--overwrite",
        )  # fmt: skip
    try:
        installed = installation.install({"operator": {"replicas": 0}})
        assert "STATUS: deployed" in installed.stdout
        for crd in adopted:
            metadata = json.loads(cluster.kubectl("get", crd, "-o", "json").stdout)["metadata"]
            assert metadata["annotations"]["helm.sh/resource-policy"] == "keep"

        cluster.helm(
            "upgrade", release, str(CHART), "-n", installation.namespace, "--reuse-values",
            "--set", "server.maxShards=7",
        )  # fmt: skip
        env = installation.operator_env()
        assert env["MEMSPACE_MAX_SHARDS"] == "7"
        token = installation.admin_token(installation.server_namespace)
        assert token == installation.admin_token(installation.namespace)

        installation.uninstall()
        for crd in adopted:
            assert cluster.kubectl("get", crd, check=False).returncode == 0, f"{crd} was deleted"
        gone = cluster.kubectl(
            "get", "deployment", f"{release}-operator", "-n", installation.namespace, check=False
        )
        assert gone.returncode != 0
        role = cluster.kubectl("get", "clusterrole", f"{release}-operator", check=False)
        assert role.returncode != 0
    finally:
        for crd in adopted:
            cluster.kubectl(
                "annotate", crd, "meta.helm.sh/release-name-", "meta.helm.sh/release-namespace-",
                "helm.sh/resource-policy-", check=False,
            )  # fmt: skip
            cluster.kubectl("label", crd, "app.kubernetes.io/managed-by-", check=False)


def test_the_chart_s_service_account_may_do_what_the_operator_does_and_no_more(
    cluster: harness.Cluster, installation: Installation
) -> None:
    installation.install({"crds": {"install": False}, "operator": {"replicas": 0}})
    identity = cluster.service_account_kubeconfig(installation.namespace, "memspace-operator")
    tenant, server = unique("tenant"), installation.server_namespace
    create_namespace(cluster, tenant, {})
    try:

        def can(*args: str) -> bool:
            return installation.can(identity, *args)

        allowed = [
            ("watch", "memoryspaces.memspace.dev", "--all-namespaces"),
            ("patch", "memoryspaces.memspace.dev", "-n", tenant),
            ("patch", "memoryspaces.memspace.dev", "--subresource=status", "-n", tenant),
            ("create", "events", "-n", tenant),
            ("create", "secrets", "-n", tenant),
            ("delete", "secrets", "-n", tenant),
            ("create", "persistentvolumeclaims", "-n", server),
            ("watch", "persistentvolumeclaims", "-n", server),
            ("get", "secrets", "-n", server),
            ("patch", "statefulsets.apps", "-n", server),
            ("create", "services", "-n", server),
            ("list", "memoryspaceclasses.memspace.dev"),
        ]
        denied = [
            ("get", "secrets", "-n", tenant),  # it never reads a tenant's credentials
            ("list", "secrets", "--all-namespaces"),
            ("create", "persistentvolumeclaims", "-n", tenant),
            ("create", "statefulsets.apps", "-n", tenant),
            ("create", "pods", "-n", server),
            ("get", "persistentvolumes"),  # no static PV template
            ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
            ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
            ("create", "memoryspaces.memspace.dev", "-n", tenant),
            ("delete", "memoryspaces.memspace.dev", "-n", tenant),
            ("patch", "memoryspaceclasses.memspace.dev"),
        ]
        assert [rule for rule in allowed if not can(*rule)] == []
        assert [rule for rule in denied if can(*rule)] == []
    finally:
        cluster.kubectl("delete", "namespace", tenant, "--wait=false", check=False)


# Which end-to-end test a run collects follows the cluster it runs on (no skips): the local
# control plane has no pods, so a kubelet stand-in serves the PVs' host paths; a real cluster
# (hack/e2e-kind.sh sets MEMSPACE_TEST_KUBECONFIG and MEMSPACE_E2E_IMAGE) runs the image as pods.
# The chart's operator as a pod with that ServiceAccount, and its shards as pods on the test node,
# are the journey of tests/e2e (in `make test`); the stand-in stays here for speed.
ON_A_REAL_CLUSTER = bool(os.environ.get("MEMSPACE_TEST_KUBECONFIG"))


@pytest.mark.timeout(300)
async def test_the_installed_chart_s_operator_serves_a_space_with_its_service_account(
    cluster: harness.Cluster, installation: Installation, tmp_path: Path
) -> None:
    assert cluster.local, "this test runs on the local control plane only (see ON_A_REAL_CLUSTER)"
    values = {
        "crds": {"install": False},
        "image": {"repository": "memspace", "tag": "local"},
        "operator": {"healthInterval": 0.5, "resyncInterval": 5},
        "server": {"mountBatchWindow": 0.5},
        "defaultStorageClass": harness.STORAGE_CLASS,
        "networkPolicy": {
            "enabled": True,
            "clientNamespaceLabels": {"memspace.dev/client": "true"},
        },
    }
    installed = await asyncio.to_thread(installation.install, values)
    notes = installed.stdout.split("NOTES:", 1)[1]
    serving.check_notes(notes, installation.server_namespace)

    # The operator as the chart runs it, but out of the cluster: the chart's ServiceAccount
    # token, the Deployment's environment, the admin token the pod would mount, and the shards'
    # endpoints on loopback (served by local `memspace serve` processes).
    env = installation.operator_env()
    assert env["MEMSPACE_SERVER_NAMESPACE"] == installation.server_namespace
    operator_token = tmp_path / "operator-admin-token"
    operator_token.write_text(installation.admin_token(installation.namespace))
    shard_token = tmp_path / "shard-admin-token"
    shard_token.write_text(installation.admin_token(installation.server_namespace))
    template = endpoint_template()
    env |= {"MEMSPACE_ADMIN_TOKEN_FILE": str(operator_token)}
    env |= {"MEMSPACE_SHARD_ENDPOINT_TEMPLATE": template}
    identity = cluster.service_account_kubeconfig(installation.namespace, "memspace-operator")
    tenant = unique("tenant")
    create_namespace(cluster, tenant, {"memspace.dev/client": "true"})
    kube = Kube(cluster)
    try:
        with (
            FakeKubelet(
                kube, installation.server_namespace, tmp_path / "node", template, shard_token
            ) as kubelet,
            harness.kopf_operator(
                cluster, "-m", "memspace_operator.handlers", namespaces=[tenant],
                kubeconfig=identity, env=env, timeout=120,
            ) as runner,
        ):  # fmt: skip
            # The chart's RBAC lets the operator watch every namespace (as the chart runs it);
            # here it watches the test's own, to leave other tests' spaces alone.
            listed = cluster.kubectl("get", "memoryspaces", "-A", kubeconfig=identity)
            assert listed.returncode == 0
            space = serving.Space(kube, installation.server_namespace, tenant, "chart-notes")
            shard_template: list[Any] = []

            def notes_hold(status: Mapping[str, Any], secret: Mapping[str, str]) -> None:
                found = serving.notes_variables(
                    notes, tenant, space.name, cluster.tools["kubectl"], cluster.kubeconfig
                )
                wanted = {"SPACE": secret["space"], "TOKEN": secret["token"]}
                assert found == {**wanted, "SHARD": str(status["shard"])}
                # Kept for below: the shard goes with its last space (an empty shard is removed).
                shard_template.append(
                    installation.get(
                        "statefulset", "memspace-shard-0", installation.server_namespace
                    )
                )

            await serving.serve_a_space_end_to_end(
                space, reach=serving.directly, on_ready=notes_hold
            )
        assert runner.exit_code == 0, runner.output
        assert kubelet.errors == []
        # The shard pod the operator asked for is admitted where Pod Security `restricted` is
        # enforced (the server namespace): a pod of its template, created in a dry run.
        (statefulset,) = shard_template
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "shard-template", "namespace": installation.server_namespace},
            "spec": statefulset["spec"]["template"]["spec"],
        }
        admitted = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod))
        assert admitted.stderr.strip() == "", admitted.stderr
    finally:
        cluster.kubectl("delete", "namespace", tenant, "--wait=false", check=False)


@pytest.mark.timeout(900)
async def test_on_a_real_cluster_the_chart_s_image_serves_a_space_end_to_end(
    cluster: harness.Cluster, installation: Installation
) -> None:
    """hack/e2e-kind.sh: the image built and loaded into kind, the operator and the shards run
    as pods, the client reaches its shard through a port-forward."""
    image = serving.e2e_image()
    assert image is not None, "set MEMSPACE_E2E_IMAGE (hack/e2e-kind.sh does)"
    repository, tag = image
    values: dict[str, Any] = {
        "crds": {"install": False},
        "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
        "operator": {"healthInterval": 2},
        "server": {
            "mountBatchWindow": 2,
            "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
        },
        "defaultStorageClass": serving.e2e_storage_class(),
    }
    await asyncio.to_thread(installation.install, values, "--wait", "--timeout=5m")
    tenant = unique("tenant")
    create_namespace(cluster, tenant, {"memspace.dev/client": "true"})
    kube = Kube(cluster)
    try:
        space = serving.Space(kube, installation.server_namespace, tenant, "kind-notes")
        await serving.serve_a_space_end_to_end(
            space, reach=serving.port_forward(cluster, installation.server_namespace), wait_s=600
        )
    finally:
        cluster.kubectl("delete", "namespace", tenant, "--wait=false", check=False)


def test_the_chart_s_admission_policies_tie_space_ids_to_namespaces_and_guard_secrets(
    cluster: harness.Cluster, crds: list[str], helm: Helm
) -> None:
    """admission.spaceIdPrefix and admission.operatorSecrets, enforced by the API server."""
    marker, release, release_ns = unique("vap"), unique("memspace"), unique("memspace-ops")
    values = {
        "admission": {
            # Bound to this test's namespaces only: other tests' spaces stay unaffected.
            "spaceIdPrefix": {
                "enabled": True,
                "namespaceSelector": {"matchLabels": {"memspace.dev/test": marker}},
            },
            "operatorSecrets": {"enabled": True},
        }
    }
    objects = helm.template(values, release=release, namespace=release_ns)
    chosen = [o for o in objects if o["kind"].startswith("ValidatingAdmissionPolicy")]
    chosen += [o for o in objects if o["kind"] in ("ServiceAccount", "ClusterRole")]
    chosen += [o for o in objects if o["kind"] == "ClusterRoleBinding"]
    assert len(chosen) == 7
    team = unique("team")
    create_namespace(cluster, release_ns, {})
    create_namespace(cluster, team, {"memspace.dev/test": marker})
    stream = "\n---\n".join(json.dumps(o) for o in chosen)
    cluster.kubectl("apply", "-f", "-", input=stream)

    def create(name: str, space_id: str | None) -> subprocess.CompletedProcess[str]:
        body = {
            "apiVersion": "memspace.dev/v1alpha1",
            "kind": "MemorySpace",
            "metadata": {"name": name, "namespace": team},
            "spec": {"spaceId": space_id} if space_id else {},
        }
        return cluster.kubectl(
            "create", "--dry-run=server", "-f", "-", input=json.dumps(body), check=False
        )

    identity = cluster.service_account_kubeconfig(release_ns, "memspace-operator")

    def secret(name: str, labels: dict[str, str]) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": team, "labels": labels},
            "stringData": {"token": "x"},
        }
        cluster.kubectl("create", "-f", "-", input=json.dumps(body))

    def delete_as_operator(name: str) -> subprocess.CompletedProcess[str]:
        return cluster.kubectl(
            "delete", "secret", name, "-n", team, kubeconfig=identity, check=False
        )

    try:
        # The API server starts enforcing a new policy within a few seconds.
        def refused_once_enforced() -> subprocess.CompletedProcess[str] | None:
            result = create("notes", "other-team-notes")
            return result if result.returncode != 0 else None

        refused = wait_for("the policy to be enforced", refused_once_enforced, timeout=60)
        assert f"must start with this namespace's name: {team}-" in refused.stderr
        assert "other-team-notes" in refused.stderr
        assert create("notes", f"{team}-notes").returncode == 0
        assert create(team, None).returncode == 0  # metadata.name is the ID: the name itself
        assert create("notes", None).returncode != 0  # ID "notes", not the namespace's

        # The operator's ServiceAccount may delete the Secrets it labelled, no other.
        secret("made-by-memspace", {"app.kubernetes.io/managed-by": "memspace-operator"})
        secret("the-tenant-s-own", {"app": "mine"})
        secret("unlabelled", {})

        def denied_once_enforced() -> subprocess.CompletedProcess[str] | None:
            result = delete_as_operator("unlabelled")
            return result if result.returncode != 0 else None

        denied = wait_for("the Secret policy to be enforced", denied_once_enforced, timeout=60)
        assert "the memspace operator may delete only Secrets it made" in denied.stderr
        assert delete_as_operator("the-tenant-s-own").returncode != 0
        assert delete_as_operator("made-by-memspace").returncode == 0
        # Anyone else is not bound by it.
        cluster.kubectl("delete", "secret", "the-tenant-s-own", "-n", team)
    finally:
        cluster.kubectl("delete", "-f", "-", input=stream, check=False)
        for name in (team, release_ns):
            cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


# Collect only the end-to-end test for the kind of cluster this run has (see ON_A_REAL_CLUSTER).
if ON_A_REAL_CLUSTER:
    del test_the_installed_chart_s_operator_serves_a_space_with_its_service_account
else:
    del test_on_a_real_cluster_the_chart_s_image_serves_a_space_end_to_end
