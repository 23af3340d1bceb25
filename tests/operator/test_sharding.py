"""Shard assignment and space ID ownership: overflow into a new shard, ShardsFull at maxShards,
and SpaceIdConflict for a later claimant of a taken space ID (across namespaces:
test_tenancy.py)."""

from __future__ import annotations

import pytest

from tests.operator.conftest import Deployment, condition, mounted_claims, wait_for

pytestmark = pytest.mark.cluster


def test_a_full_shard_overflows_into_a_new_one(deployment: Deployment) -> None:
    kube, server_ns = deployment.kube, deployment.server_namespace
    with deployment.running(MEMSPACE_MAX_SPACES_PER_SHARD="2"):
        names = ["one", "two", "three"]
        for name in names:
            deployment.apply(name)
        bodies = {name: deployment.wait_condition(name, "Mounted", "True") for name in names}
        shards = sorted(body["status"]["shard"] for body in bodies.values())
        assert shards == [0, 0, 1]
        mounts = {
            shard: mounted_claims(kube.statefulset(server_ns, f"memspace-shard-{shard}"))
            for shard in (0, 1)
        }
        assert sorted(len(m) for m in mounts.values()) == [1, 2]
        for name, body in bodies.items():
            shard = body["status"]["shard"]
            assert mounts[shard][f"/var/lib/memspace/spaces/{name}"] == f"space-{name}"
            assert f"{name}.json" in deployment.index(shard)
            secret = kube.secret(deployment.namespace, f"{name}-memspace") or {}
            assert secret["endpoint"] == f"memspace-shard-{shard}.{server_ns}.svc:50051"
        assert kube.statefulset(server_ns, "memspace-shard-2") is None


def test_spaces_past_the_last_shard_wait_as_shards_full(deployment: Deployment) -> None:
    kube, ns = deployment.kube, deployment.namespace
    with deployment.running(MEMSPACE_MAX_SPACES_PER_SHARD="1", MEMSPACE_MAX_SHARDS="1"):
        deployment.apply("first")
        deployment.wait_condition("first", "Mounted", "True")
        deployment.apply("second")
        body = deployment.wait_condition("second", "Ready", "False", "ShardsFull")
        assert "MEMSPACE_MAX_SHARDS" in condition(body, "Ready")["message"]
        assert kube.secret(ns, "second-memspace") is None
        assert "second.json" not in deployment.index(0)
        assert kube.statefulset(deployment.server_namespace, "memspace-shard-1") is None

        # A freed slot goes to the waiting space.
        kube.delete_space(ns, "first")
        deployment.wait_gone("first")
        body = deployment.wait_condition("second", "Mounted", "True")
        assert body["status"]["shard"] == 0


def test_a_taken_space_id_is_a_conflict_until_its_owner_lets_it_go(
    deployment: Deployment,
) -> None:
    kube, ns = deployment.kube, deployment.namespace
    with deployment.running():
        deployment.apply("owner", spaceId="shared-id")
        deployment.wait_condition("owner", "Mounted", "True")
        deployment.apply("claimant", spaceId="shared-id")
        body = deployment.wait_condition("claimant", "Ready", "False", "SpaceIdConflict")
        # Both are in one namespace: the holder may be named.
        assert "held by MemorySpace owner in this namespace" in condition(body, "Ready")["message"]
        assert [c["type"] for c in body["status"]["conditions"]] == ["Ready"]
        assert kube.secret(ns, "claimant-memspace") is None
        pvc = kube.pvc(deployment.server_namespace, "space-shared-id") or {}
        assert pvc["metadata"]["labels"]["memspace.dev/owner-name"] == "owner"
        owner = deployment.space("owner") or {}
        assert condition(owner, "Mounted")["status"] == "True"
        assert owner["status"]["credentialsSecret"] == "owner-memspace"

        # The owner goes (Retain): the claimant of its namespace adopts the ID and its volume.
        kube.delete_space(ns, "owner")
        deployment.wait_gone("owner")
        body = deployment.wait_condition("claimant", "Mounted", "True")
        assert kube.secret(ns, "claimant-memspace") is not None
        # Its shard: 0 again, or a new one when shard 0, left empty, was being removed.
        wait_for(
            "the index to carry the new owner's token",
            lambda: "shared-id.json" in deployment.index(body["status"]["shard"]),
        )


def test_deleting_a_conflicting_claimant_leaves_the_owner_alone(deployment: Deployment) -> None:
    kube = deployment.kube
    second_ns = deployment.add_namespace()
    with deployment.running():
        deployment.apply("holder", spaceId="held-id")
        deployment.wait_condition("holder", "Mounted", "True")
        deployment.apply("intruder", namespace=second_ns, spaceId="held-id")
        deployment.wait_condition(
            "intruder", "Ready", "False", "SpaceIdConflict", namespace=second_ns
        )
        kube.delete_space(second_ns, "intruder")
        deployment.wait_gone("intruder", namespace=second_ns)
        assert kube.pvc(deployment.server_namespace, "space-held-id") is not None
        assert "held-id.json" in deployment.index(0)
        assert kube.secret(deployment.namespace, "holder-memspace") is not None
