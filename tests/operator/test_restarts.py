"""Crash safety: `memspace operator` killed with SIGKILL in the middle of reconciling many
spaces, then started again, converges with nothing duplicated or orphaned."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest

from tests.operator.conftest import (
    Deployment,
    condition,
    memory_space,
    mounted_claims,
    wait_for,
)

pytestmark = pytest.mark.cluster

SPACES = 24
PER_SHARD = 5
MANAGED = "app.kubernetes.io/managed-by=memspace-operator"


@pytest.mark.parametrize("stage", ["claims", "credentials"])
def test_an_operator_killed_mid_reconcile_converges_after_a_restart(
    deployment: Deployment, stage: str
) -> None:
    """Killed once the first claims (or the first credentials) exist, before all do."""
    kube, ns, server_ns = deployment.kube, deployment.namespace, deployment.server_namespace
    env = {
        **os.environ,
        **deployment.env,
        "KUBECONFIG": str(deployment.cluster.kubeconfig),
        "MEMSPACE_MAX_SPACES_PER_SHARD": str(PER_SHARD),
    }
    names = [f"crash-{i:02d}" for i in range(SPACES)]
    log = (deployment.tmp_path / "operator.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "memspace_cli.main", "operator", "--namespace", ns],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        items = [memory_space(name, ns) for name in names]
        kube.apply({"apiVersion": "v1", "kind": "List", "items": items})

        def midway() -> bool:
            claims = len(kube.pvcs(server_ns))
            secrets = len(kube.core.list_namespaced_secret(ns, label_selector=MANAGED).items)
            started = claims if stage == "claims" else secrets
            return started >= 1 and secrets < SPACES

        wait_for("the operator to be half-way", midway, interval=0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        log.close()
    assert process.returncode == -signal.SIGKILL

    with deployment.running(MEMSPACE_MAX_SPACES_PER_SHARD=str(PER_SHARD)):
        bodies = {name: deployment.wait_condition(name, "Mounted", "True") for name in names}
        for name in names:
            deployment.wait_condition(name, "VolumeBound", "True")

        # One claim per space, held by it, labelled with its shard.
        claims = {p["metadata"]["name"]: p for p in kube.pvcs(server_ns)}
        assert sorted(claims) == sorted(f"space-{name}" for name in names)
        shard_of = {}
        for name, body in bodies.items():
            pvc = claims[f"space-{name}"]
            assert (
                pvc["metadata"]["annotations"]["memspace.dev/owner-uid"]
                == (body["metadata"]["uid"])
            )
            shard_of[name] = int(pvc["metadata"]["labels"]["memspace.dev/shard"])
            assert body["status"]["shard"] == shard_of[name]
        assert max(Counter(shard_of.values()).values()) <= PER_SHARD

        # Each space in exactly one index, its shard's, with the hash of its Secret's token.
        shards = sorted(set(shard_of.values()))
        indexes = {shard: deployment.index(shard) for shard in shards}
        listed = Counter(key for entries in indexes.values() for key in entries)
        assert listed == Counter(f"{name}.json" for name in names)
        for name in names:
            token = (kube.secret(ns, f"{name}-memspace") or {})["token"]
            entry = indexes[shard_of[name]][f"{name}.json"]
            assert entry["tokenSha256"] == hashlib.sha256(token.encode()).hexdigest()

        # Each space mounted exactly once, by its shard; no shard beyond those in use.
        mounts: Counter[str] = Counter()
        for statefulset in kube.statefulsets(server_ns):
            shard = int(statefulset["metadata"]["labels"]["memspace.dev/shard"])
            for path, claim in mounted_claims(statefulset).items():
                assert path == f"/var/lib/memspace/spaces/{claim.removeprefix('space-')}"
                assert shard_of[claim.removeprefix("space-")] == shard
                mounts[claim] += 1
        assert mounts == Counter(f"space-{name}" for name in names)
        assert len(kube.statefulsets(server_ns)) == len(shards)

        # Exactly one credentials Secret per space in the tenant namespace.
        secrets = kube.core.list_namespaced_secret(ns, label_selector=MANAGED).items
        found = sorted(str(s.metadata.name) for s in secrets if s.metadata is not None)
        assert found == sorted(f"{n}-memspace" for n in names)
        for body in bodies.values():
            assert (
                condition(body, "Mounted")["observedGeneration"] == (body["metadata"]["generation"])
            )
