"""Applying a MemorySpace: a bound volume, credentials, an index entry, a shard mounting it, and
conditions that say so."""

from __future__ import annotations

import hashlib

import pytest

from tests.operator.conftest import Deployment, condition, mounted_claims, wait_events, wait_for

pytestmark = pytest.mark.cluster

LABELS = (
    "app.kubernetes.io/managed-by",
    "memspace.dev/space-id",
    "memspace.dev/owner-namespace",
    "memspace.dev/owner-name",
)


def test_an_applied_space_gets_its_volume_credentials_index_entry_and_mount(
    deployment: Deployment,
) -> None:
    kube, ns, server_ns = deployment.kube, deployment.namespace, deployment.server_namespace
    with deployment.running():
        deployment.apply("notes", embeddingDim=8, tiers={"hotCapacity": 50})
        body = deployment.wait_condition("notes", "Mounted", "True")
        body = deployment.wait_condition("notes", "VolumeBound", "True", "Bound")

        pvc = kube.pvc(server_ns, "space-notes")
        assert pvc is not None
        assert pvc["status"]["phase"] == "Bound"
        assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"
        expected_labels = {
            "app.kubernetes.io/managed-by": "memspace-operator",
            "memspace.dev/space-id": "notes",
            "memspace.dev/owner-namespace": ns,
            "memspace.dev/owner-name": "notes",
        }
        assert expected_labels.items() <= pvc["metadata"]["labels"].items()
        assert pvc["metadata"]["labels"]["memspace.dev/shard"] == "0"

        credentials = kube.secret(ns, "notes-memspace")
        assert credentials is not None
        assert credentials["space"] == "notes"
        assert credentials["endpoint"] == f"memspace-shard-0.{server_ns}.svc:50051"
        token = credentials["token"]
        assert len(token) == 43  # 32 bytes, URL-safe base64 without padding
        secret = kube.secret_object(ns, "notes-memspace")
        assert secret is not None
        assert expected_labels.items() <= secret["metadata"]["labels"].items()

        entry = deployment.index(0)["notes.json"]
        assert entry["tokenSha256"] == hashlib.sha256(token.encode()).hexdigest()
        assert entry["embeddingDim"] == 8
        assert entry["tiers"]["hotCapacity"] == 50
        assert entry["state"] == "Active"
        assert token not in str(deployment.index(0))

        shard = kube.statefulset(server_ns, "memspace-shard-0")
        assert mounted_claims(shard) == {"/var/lib/memspace/spaces/notes": "space-notes"}
        template = shard["spec"]["template"]["spec"] if shard else {}
        assert any(
            v.get("secret", {}).get("secretName") == "memspace-shard-0-spaces"
            for v in template["volumes"]
        )
        assert kube.core.read_namespaced_service("memspace-shard-0", server_ns)

        status = body["status"]
        assert status["spaceId"] == "notes"
        assert status["shard"] == 0
        assert status["endpoint"] == credentials["endpoint"]
        assert status["claimName"] == "space-notes"
        assert status["credentialsSecret"] == "notes-memspace"
        assert status["observedGeneration"] == body["metadata"]["generation"]
        ready = condition(body, "Ready")
        # No admin token in this run: health is not monitored, so the space is not Ready yet.
        assert condition(body, "Healthy")["reason"] == "NotMonitored"
        assert (ready["status"], ready["reason"]) == ("Unknown", "NotMonitored")
        assert all(
            c["observedGeneration"] == body["metadata"]["generation"] for c in status["conditions"]
        )
        # Posted in the background: waited for while the operator runs to post them.
        wait_events(kube, ns, "notes", "ClaimCreated", "CredentialsCreated", "Mounted")


def test_a_restarted_operator_rotates_nothing_and_follows_spec_changes(
    deployment: Deployment,
) -> None:
    kube, ns = deployment.kube, deployment.namespace
    with deployment.running():
        deployment.apply("keep")
        deployment.wait_condition("keep", "Mounted", "True")
        token = (kube.secret(ns, "keep-memspace") or {})["token"]
    with deployment.running():
        # A restarted operator resumes the space: same Secret, same token, same index entry.
        # Tier and quota changes travel through the index entry.
        kube.patch_spec(
            ns, "keep", {"tiers": {"warmCapacity": 5000}, "quota": {"maxWritesPerSecond": 7}}
        )
        wait_for(
            "the index entry to follow the spec",
            lambda: (
                deployment.index(0).get("keep.json", {}).get("tiers", {}).get("warmCapacity")
                == 5000
            ),
        )
        assert deployment.index(0)["keep.json"]["quota"]["maxWritesPerSecond"] == 7
        assert (kube.secret(ns, "keep-memspace") or {})["token"] == token
        assert (
            deployment.index(0)["keep.json"]["tokenSha256"]
            == hashlib.sha256(token.encode()).hexdigest()
        )
