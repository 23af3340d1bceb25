"""A space's life after creation: growing its volume, deletion with Retain and with Delete, a
retained volume adopted again, and deletions of spaces whose creation never finished or whose
shard is gone."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.operator.conftest import Deployment, condition, unique, wait_events, wait_for

pytestmark = pytest.mark.cluster


def test_a_larger_size_expands_the_claim(deployment: Deployment) -> None:
    kube, server_ns = deployment.kube, deployment.server_namespace
    with deployment.running():
        deployment.apply("grows", storage={"size": "1Gi"})
        deployment.wait_condition("grows", "VolumeBound", "True")
        kube.patch_spec(deployment.namespace, "grows", {"storage": {"size": "3Gi"}})
        wait_for(
            "the claim to ask for 3Gi",
            lambda: (
                (kube.pvc(server_ns, "space-grows") or {})["spec"]["resources"]["requests"][
                    "storage"
                ]
                == "3Gi"
            ),
        )

        # Nothing resizes a host-path directory: the condition says the expansion is pending.
        def expanding() -> bool:
            body = deployment.space("grows") or {}
            status = body.get("status") or {}
            return status.get("observedGeneration") == body["metadata"]["generation"] and (
                "expansion to 3Gi" in condition(body, "VolumeBound").get("message", "")
            )

        wait_for("VolumeBound to mention the expansion", expanding)
        wait_events(kube, deployment.namespace, "grows", "VolumeExpanding")


def test_after_expansion_refused_the_documented_fix_grows_the_claim(
    deployment: Deployment,
) -> None:
    """docs/troubleshooting.md, ExpansionRefused: the size cannot be set back, and allowing
    expansion on the class lets the operator's next re-check grow the claim."""
    kube, server_ns, cluster = deployment.kube, deployment.server_namespace, deployment.cluster
    storage_class = unique("no-growth")
    cluster.kubectl("create", "-f", "-", input=json.dumps({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": storage_class},
        "provisioner": "kubernetes.io/host-path",
        "volumeBindingMode": "Immediate",
        "allowVolumeExpansion": False,
    }))  # fmt: skip
    try:
        with deployment.running():
            deployment.apply("stuck", storage={"size": "1Gi", "storageClassName": storage_class})
            deployment.wait_condition("stuck", "VolumeBound", "True")
            kube.patch_spec(deployment.namespace, "stuck", {"storage": {"size": "3Gi"}})
            wait_for(
                "an ExpansionRefused Event",
                lambda: any(
                    e["reason"] == "ExpansionRefused"
                    for e in kube.events(deployment.namespace, "stuck")
                ),
            )
            # "Set the size back" is not a way out: the CRD refuses it.
            back = cluster.kubectl(
                "patch", "msp", "stuck", "-n", deployment.namespace, "--type=merge",
                "-p", json.dumps({"spec": {"storage": {"size": "1Gi"}}}), check=False,
            )  # fmt: skip
            assert back.returncode != 0
            assert "never shrink" in back.stderr
            cluster.kubectl(
                "patch", "storageclass", storage_class,
                "-p", json.dumps({"allowVolumeExpansion": True}),
            )  # fmt: skip
            wait_for(
                "the claim to ask for 3Gi after the class allows it",
                lambda: (
                    (kube.pvc(server_ns, "space-stuck") or {})["spec"]["resources"]["requests"][
                        "storage"
                    ]
                    == "3Gi"
                ),
            )
    finally:
        cluster.kubectl("delete", "storageclass", storage_class, check=False)


def test_deleting_with_retain_keeps_the_volume_and_removes_everything_else(
    deployment: Deployment,
) -> None:
    kube, ns, server_ns = deployment.kube, deployment.namespace, deployment.server_namespace
    with deployment.running():
        deployment.apply("kept", storage={"reclaimPolicy": "Retain"})
        deployment.wait_condition("kept", "Mounted", "True")
        volume = (kube.pvc(server_ns, "space-kept") or {})["spec"]["volumeName"]
        old_token = (kube.secret(ns, "kept-memspace") or {})["token"]

        kube.delete_space(ns, "kept")
        deployment.wait_gone("kept")
        pvc = kube.pvc(server_ns, "space-kept")
        assert pvc is not None
        assert pvc["metadata"]["labels"]["memspace.dev/retained"] == "true"
        assert "memspace.dev/shard" not in pvc["metadata"]["labels"]
        assert kube.secret(ns, "kept-memspace") is None
        assert "kept.json" not in deployment.index(0)
        # Its shard has no space left: it is removed, which unmounts the volume.
        wait_for(
            "the empty shard to go",
            lambda: kube.statefulset(server_ns, "memspace-shard-0") is None,
        )

        # The same space applied again adopts its volume (data included) with a new token.
        deployment.apply("kept")
        deployment.wait_condition("kept", "Mounted", "True")
        adopted = kube.pvc(server_ns, "space-kept")
        assert adopted is not None
        assert adopted["spec"]["volumeName"] == volume
        assert "memspace.dev/retained" not in adopted["metadata"]["labels"]
        uid = (deployment.space("kept") or {})["metadata"]["uid"]
        assert adopted["metadata"]["annotations"]["memspace.dev/owner-uid"] == uid
        token = (kube.secret(ns, "kept-memspace") or {})["token"]
        assert token != old_token
        entry = deployment.index(0)["kept.json"]
        assert entry["tokenSha256"] == hashlib.sha256(token.encode()).hexdigest()


def test_deleting_with_delete_deletes_the_volume(deployment: Deployment) -> None:
    kube, ns, server_ns = deployment.kube, deployment.namespace, deployment.server_namespace
    with deployment.running():
        deployment.apply("gone", storage={"reclaimPolicy": "Delete"})
        deployment.wait_condition("gone", "VolumeBound", "True")
        deployment.wait_condition("gone", "Mounted", "True")
        volume = (kube.pvc(server_ns, "space-gone") or {})["spec"]["volumeName"]
        kube.delete_space(ns, "gone")
        deployment.wait_gone("gone")
        wait_for("the claim to go", lambda: kube.pvc(server_ns, "space-gone") is None)
        wait_for("the volume to go", lambda: kube.pv(volume) is None)
        assert kube.secret(ns, "gone-memspace") is None
        assert "gone.json" not in deployment.index(0)


def test_a_space_whose_creation_never_finished_is_deleted(deployment: Deployment) -> None:
    kube, ns = deployment.kube, deployment.namespace
    # Its server namespace does not exist: no claim can be made, creation keeps failing.
    with deployment.running(MEMSPACE_SERVER_NAMESPACE=unique("missing")):
        deployment.apply("stuck")
        wait_for(
            "the operator to take the space in hand",
            lambda: (
                "memspace.dev/finalizer"
                in ((deployment.space("stuck") or {}).get("metadata", {}).get("finalizers") or [])
            ),
        )
        wait_for(
            "a failed attempt to be reported",
            lambda: any(
                (e["type"], e["reason"]) == ("Warning", "NotFound")
                for e in kube.events(ns, "stuck")
            ),
        )
        kube.delete_space(ns, "stuck")
        deployment.wait_gone("stuck")


def test_a_space_whose_shard_is_gone_is_deleted(deployment: Deployment) -> None:
    kube, ns, server_ns = deployment.kube, deployment.namespace, deployment.server_namespace
    with deployment.running():
        deployment.apply("orphan")
        deployment.wait_condition("orphan", "Mounted", "True")
        kube.apps.delete_namespaced_stateful_set("memspace-shard-0", server_ns)
        kube.core.delete_namespaced_secret("memspace-shard-0-spaces", server_ns)
        kube.delete_space(ns, "orphan")
        deployment.wait_gone("orphan")
        assert kube.secret(ns, "orphan-memspace") is None
        assert "orphan.json" not in deployment.index(0)
