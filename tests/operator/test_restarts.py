"""Crash safety: `memspace operator` killed with SIGKILL in the middle of reconciling many
spaces, then started again, converges with nothing duplicated or orphaned."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections import Counter
from typing import Any

import kubernetes.watch
import pytest

from tests.operator.conftest import (
    WAIT_S,
    Deployment,
    condition,
    memory_space,
    mounted_claims,
)

pytestmark = pytest.mark.cluster

SPACES = 24
PER_SHARD = 5
MANAGED = "app.kubernetes.io/managed-by=memspace-operator"


@pytest.mark.parametrize("stage", ["claims", "credentials"])
def test_an_operator_killed_mid_reconcile_converges_after_a_restart(
    deployment: Deployment, stage: str
) -> None:
    """Killed as the first claim (or the first credentials Secret) appears; then restarted.
    The restarted operator must converge from wherever the kill left it, with nothing
    duplicated or orphaned."""
    kube, ns, server_ns = deployment.kube, deployment.namespace, deployment.server_namespace
    env = {
        **os.environ,
        **deployment.env,
        "KUBECONFIG": str(deployment.cluster.kubeconfig),
        "MEMSPACE_MAX_SPACES_PER_SHARD": str(PER_SHARD),
        # The kubernetes client writes the kubeconfig's certificates to temporary files it
        # removes at exit, which the SIGKILL skips: they stay in the test's directory.
        "TMPDIR": str(deployment.tmp_path),
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

        # Killed at the first watch event of the stage's children, not found by polling:
        # the operator makes all 24 Secrets within one poll (0 to 16 between two looks was
        # seen), so a poll for "some but not all" could miss the window entirely.
        listing: Any = kube.core.list_namespaced_secret
        where: dict[str, Any] = {"namespace": ns, "label_selector": MANAGED}
        if stage == "claims":
            listing = kube.core.list_namespaced_persistent_volume_claim
            where = {"namespace": server_ns}
        watch = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
        for event in watch.stream(  # type: ignore[no-untyped-call]
            listing, timeout_seconds=int(WAIT_S), **where
        ):
            if event["type"] == "ADDED":
                break
        else:
            raise AssertionError(f"no {stage} appeared within {WAIT_S:.0f} s")
        watch.stop()  # type: ignore[no-untyped-call]
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
        # And no more shards than one operator without a restart fills: a shard the killed
        # one had begun is filled, never sealed with room left.
        assert len(shards) == -(-SPACES // PER_SHARD)

        # Exactly one credentials Secret per space in the tenant namespace.
        secrets = kube.core.list_namespaced_secret(ns, label_selector=MANAGED).items
        found = sorted(str(s.metadata.name) for s in secrets if s.metadata is not None)
        assert found == sorted(f"{n}-memspace" for n in names)
        for body in bodies.values():
            assert (
                condition(body, "Mounted")["observedGeneration"] == (body["metadata"]["generation"])
            )
