"""kopf operators run in-process against the control plane, with a ServiceAccount's identity."""

from __future__ import annotations

import json
from typing import Any

import kopf
import kubernetes.client
import pytest

from tests.support import cluster as harness

pytestmark = pytest.mark.cluster

# A registry of its own (not the global one); kopf adds its default login only to the global one.
registry = kopf.OperatorRegistry()


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_via_client(**kwargs)


@kopf.on.create("configmaps", labels={"memspace.dev/test": "kopf"}, registry=registry)
def record_who_saw_it(patch: kopf.Patch, **_: Any) -> None:
    # kopf's login loaded the kubeconfig into the client's default configuration: ask who we are.
    api = kubernetes.client.ApiClient()
    try:
        review = kubernetes.client.AuthenticationV1Api(api).create_self_subject_review(
            kubernetes.client.V1SelfSubjectReview()
        )
    finally:
        harness.close_client(api)
    assert review.status is not None
    assert review.status.user_info is not None
    username = review.status.user_info.username
    patch.metadata.setdefault("annotations", {})["memspace.dev/seen-by"] = username


def test_an_operator_runs_as_its_service_account(cluster: harness.Cluster, namespace: str) -> None:
    cluster.kubectl("create", "serviceaccount", "operator", "-n", namespace)
    cluster.kubectl(
        "create", "role", "operator", "-n", namespace,
        "--verb=get,list,watch,patch", "--resource=configmaps",
    )  # fmt: skip
    cluster.kubectl(
        "create", "role", "events", "-n", namespace, "--verb=create", "--resource=events"
    )
    for role in ("operator", "events"):
        cluster.kubectl(
            "create", "rolebinding", role, "-n", namespace,
            f"--role={role}", f"--serviceaccount={namespace}:operator",
        )  # fmt: skip
    # What kopf itself reads cluster-wide (without it, it retries for about a minute first).
    cluster.kubectl(
        "create", "clusterrole", f"kopf-{namespace}",
        "--verb=list,watch", "--resource=namespaces,customresourcedefinitions.apiextensions.k8s.io",
    )  # fmt: skip
    cluster.kubectl(
        "create", "clusterrolebinding", f"kopf-{namespace}",
        f"--clusterrole=kopf-{namespace}", f"--serviceaccount={namespace}:operator",
    )  # fmt: skip
    identity = cluster.service_account_kubeconfig(namespace, "operator")

    with harness.kopf_operator(
        cluster, namespaces=[namespace], kubeconfig=identity, registry=registry
    ) as runner:
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "watched",
                "namespace": namespace,
                "labels": {"memspace.dev/test": "kopf"},
            },
        }
        cluster.kubectl("apply", "-f", "-", input=json.dumps(body))
        cluster.kubectl(
            "wait", "configmap/watched", "-n", namespace, "--timeout=60s",
            "--for=jsonpath={.metadata.annotations.memspace\\.dev/seen-by}",
        )  # fmt: skip
    assert runner.exit_code == 0, runner.output
    seen_by = cluster.kubectl(
        "get", "configmap", "watched", "-n", namespace,
        "-o=jsonpath={.metadata.annotations.memspace\\.dev/seen-by}",
    )  # fmt: skip
    assert seen_by.stdout == f"system:serviceaccount:{namespace}:operator"
