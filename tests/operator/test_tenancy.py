"""Tenants kept apart by the operator on the real control plane: a retained volume is adopted
only in its owner namespace (or where a platform admin released it), a conflict names nothing
of another namespace, and the operator never replaces or deletes a Secret it did not make."""

from __future__ import annotations

import json
import time
from typing import Any

import kubernetes.client
import pytest

from tests.operator.conftest import Deployment, condition, wait_for

pytestmark = pytest.mark.cluster

RESYNC_S = 5.0
"""MEMSPACE_RESYNC_INTERVAL of the operator tests' deployment."""


def _texts(deployment: Deployment, namespace: str, name: str) -> list[str]:
    """Everything the claimant's namespace can read about it: status and Event messages."""
    body = deployment.space(name, namespace) or {}
    found = [json.dumps(body.get("status") or {})]
    found += [e.get("message") or "" for e in deployment.kube.events(namespace, name)]
    return found


def _conflict(deployment: Deployment, name: str, namespace: str) -> dict[str, Any]:
    return deployment.wait_condition(name, "Ready", "False", "SpaceIdConflict", namespace=namespace)


def test_a_retained_volume_stays_in_its_namespace_until_an_admin_releases_it(
    deployment: Deployment,
) -> None:
    kube, server_ns = deployment.kube, deployment.server_namespace
    team_a, team_b = deployment.namespace, deployment.add_namespace()
    with deployment.running():
        deployment.apply("roadmap", spaceId="alpha-id")
        deployment.wait_condition("roadmap", "Mounted", "True")
        volume = (kube.pvc(server_ns, "space-alpha-id") or {})["spec"]["volumeName"]

        # team-b claims the ID while team-a holds it: a conflict that names nothing of team-a.
        deployment.apply("intruder", namespace=team_b, spaceId="alpha-id")
        body = _conflict(deployment, "intruder", team_b)
        assert [c["type"] for c in body["status"]["conditions"]] == ["Ready"]
        for text in _texts(deployment, team_b, "intruder"):
            assert team_a not in text
            assert "roadmap" not in text

        # team-a deletes it (Retain): the volume stays team-a's, whatever team-b waits for.
        kube.delete_space(team_a, "roadmap")
        deployment.wait_gone("roadmap")
        time.sleep(3 * RESYNC_S)  # several re-checks of the waiting claimant
        body = _conflict(deployment, "intruder", team_b)
        assert "taken outside this namespace" in condition(body, "Ready")["message"]
        assert kube.secret(team_b, "intruder-memspace") is None
        pvc = kube.pvc(server_ns, "space-alpha-id") or {}
        assert pvc["metadata"]["labels"]["memspace.dev/retained"] == "true"
        assert pvc["metadata"]["labels"]["memspace.dev/owner-namespace"] == team_a
        assert "alpha-id.json" not in deployment.index(0)
        for text in _texts(deployment, team_b, "intruder"):
            assert team_a not in text

        # Within team-a the volume is adopted again, data included.
        deployment.apply("heir", spaceId="alpha-id")
        deployment.wait_condition("heir", "Mounted", "True")
        assert (kube.pvc(server_ns, "space-alpha-id") or {})["spec"]["volumeName"] == volume
        _conflict(deployment, "intruder", team_b)
        kube.delete_space(team_a, "heir")
        deployment.wait_gone("heir")

        # The platform admin releases it to team-b: then, and only then, team-b adopts it.
        kube.core.patch_namespaced_persistent_volume_claim(
            "space-alpha-id",
            server_ns,
            {"metadata": {"annotations": {"memspace.dev/release-to-namespace": team_b}}},
        )
        deployment.wait_condition("intruder", "Mounted", "True", namespace=team_b)
        pvc = kube.pvc(server_ns, "space-alpha-id") or {}
        assert pvc["spec"]["volumeName"] == volume
        assert pvc["metadata"]["labels"]["memspace.dev/owner-namespace"] == team_b
        assert "memspace.dev/release-to-namespace" not in (pvc["metadata"]["annotations"] or {})
        assert kube.secret(team_b, "intruder-memspace") is not None


def _foreign_secret(deployment: Deployment, namespace: str, name: str) -> None:
    body = kubernetes.client.V1Secret(
        metadata=kubernetes.client.V1ObjectMeta(name=name, labels={"app": "mine"}),
        string_data={"token": "the tenant's own"},
    )
    deployment.kube.core.create_namespaced_secret(namespace, body)


def test_a_tenant_s_secret_of_the_credentials_name_is_never_replaced(
    deployment: Deployment,
) -> None:
    kube, ns = deployment.kube, deployment.namespace
    _foreign_secret(deployment, ns, "notes-memspace")
    with deployment.running():
        deployment.apply("notes")
        body = deployment.wait_condition("notes", "Ready", "False", "SecretNotOwned")
        message = condition(body, "Ready")["message"]
        assert "notes-memspace already exists" in message
        assert "did not make it" in message
        time.sleep(2 * RESYNC_S)
        assert (kube.secret(ns, "notes-memspace") or {}) == {"token": "the tenant's own"}
        assert "notes.json" not in deployment.index(0)
        reasons = [e["reason"] for e in kube.events(ns, "notes")]
        assert "SecretNotOwned" in reasons

        # The tenant deletes its Secret: the space gets its credentials at the next check.
        kube.core.delete_namespaced_secret("notes-memspace", ns)
        deployment.wait_condition("notes", "Mounted", "True")
        made = kube.secret_object(ns, "notes-memspace") or {}
        assert made["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "memspace-operator"


def test_the_operator_deletes_only_the_credentials_secret_it_made(
    deployment: Deployment,
) -> None:
    kube, ns, server_ns = deployment.kube, deployment.namespace, deployment.server_namespace
    with deployment.running():
        deployment.apply("swap", storage={"reclaimPolicy": "Delete"})
        deployment.wait_condition("swap", "Mounted", "True")
        made = kube.secret_object(ns, "swap-memspace") or {}
        pvc = kube.pvc(server_ns, "space-swap") or {}
        proof = pvc["metadata"]["annotations"]["memspace.dev/credentials-uid"]
        assert proof == made["metadata"]["uid"]
    # The tenant puts a Secret of its own in place of the operator's, while the operator is
    # down: a running one puts its own back at its next check (every RESYNC_S), which could
    # fall between the tenant's delete and create.
    kube.core.delete_namespaced_secret("swap-memspace", ns)
    wait_for("the Secret to go", lambda: kube.secret(ns, "swap-memspace") is None)
    _foreign_secret(deployment, ns, "swap-memspace")

    with deployment.running():
        kube.delete_space(ns, "swap")
        deployment.wait_gone("swap")
        assert (kube.secret(ns, "swap-memspace") or {}) == {"token": "the tenant's own"}
