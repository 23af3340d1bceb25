"""The backup CRDs on a real API server: MemorySpaceBackupTarget (cluster-scoped) and
MemorySpaceBackup (namespaced, immutable spec, printer columns), and the MemorySpace's backup
fields (schedule and retention, restoreFrom immutable, state Offloaded)."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import pytest

from tests.support import cluster as harness

pytestmark = pytest.mark.cluster

GROUP, VERSION = "memspace.dev", "v1alpha1"


def body(
    kind: str, name: str, spec: dict[str, Any], namespace: str | None = None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": metadata, "spec": spec}


def create(cluster: harness.Cluster, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("create", "-f", "-", input=json.dumps(obj), check=False)


def test_a_target_is_cluster_scoped_and_checks_its_bucket(
    cluster: harness.Cluster, crds: list[str]
) -> None:
    assert (
        "customresourcedefinition.apiextensions.k8s.io/memoryspacebackuptargets.memspace.dev"
        in crds
    )
    name = f"store-{uuid.uuid4().hex[:8]}"
    spec = {"endpoint": "http://minio:9000", "bucket": "backups", "prefix": "team-a/",
            "credentialsSecret": {"name": "s3"}}  # fmt: skip
    assert create(cluster, body("MemorySpaceBackupTarget", name, spec)).returncode == 0
    try:
        table = cluster.kubectl("get", "mspbt", name).stdout.splitlines()
        assert table[0].split() == ["NAME", "DEFAULT", "ENDPOINT", "BUCKET", "PREFIX", "AGE"]
        assert table[1].split()[:4] == [name, "http://minio:9000", "backups", "team-a/"]
        got = json.loads(cluster.kubectl("get", "mspbt", name, "-o", "json").stdout)
        assert got["spec"]["region"] == "us-east-1"  # defaulted
    finally:
        cluster.kubectl("delete", "mspbt", name, check=False)
    bad = body("MemorySpaceBackupTarget", f"bad-{uuid.uuid4().hex[:8]}", {"bucket": "No_Caps"})
    result = create(cluster, bad)
    assert result.returncode != 0
    assert "spec.bucket" in result.stderr


def test_a_backup_names_its_space_and_its_spec_is_immutable(
    cluster: harness.Cluster, crds: list[str], namespace: str
) -> None:
    backup = body("MemorySpaceBackup", "nightly", {"memorySpace": "notes"}, namespace)
    assert create(cluster, backup).returncode == 0
    table = cluster.kubectl("get", "mspb", "-n", namespace).stdout.splitlines()
    assert table[0].split() == [
        "NAME", "SPACE", "PHASE", "MEMORIES", "LSN", "BYTES", "UPLOADED", "COMPLETED", "AGE",
    ]  # fmt: skip
    assert table[1].split()[:2] == ["nightly", "notes"]
    result = cluster.kubectl(
        "patch", "mspb", "nightly", "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"memorySpace": "other"}}), check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "immutable" in result.stderr
    missing = create(cluster, body("MemorySpaceBackup", "nothing", {}, namespace))
    assert missing.returncode != 0
    assert "memorySpace" in missing.stderr


def test_a_space_takes_a_schedule_a_restore_and_the_offloaded_state(
    cluster: harness.Cluster, crds: list[str], namespace: str
) -> None:
    space = body(
        "MemorySpace",
        "restored",
        {
            "backup": {"schedule": "0 3 * * *"},
            "restoreFrom": {"backup": "nightly"},
            "state": "Offloaded",
        },
        namespace,
    )
    assert create(cluster, space).returncode == 0
    got = json.loads(
        cluster.kubectl("get", "msp", "restored", "-n", namespace, "-o", "json").stdout
    )
    assert got["spec"]["backup"]["keep"] == 7  # defaulted
    result = cluster.kubectl(
        "patch", "msp", "restored", "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"restoreFrom": {"backup": "another"}}}), check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "spec.restoreFrom is immutable" in result.stderr
    bad = body("MemorySpace", "zero-keep", {"backup": {"keep": 0}}, namespace)
    assert create(cluster, bad).returncode != 0
