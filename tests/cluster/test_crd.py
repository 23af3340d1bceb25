"""The MemorySpace and MemorySpaceClass CRDs on a real API server: established, defaulted, strict
about bad objects; and Kubernetes' own object-count quota on MemorySpaces."""

from __future__ import annotations

import copy
import datetime
import json
import re
import subprocess
import time
import uuid
from typing import Any, cast

import kubernetes.client
import pytest

from tests.support import cluster as harness

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "memspace.dev", "v1alpha1", "memoryspaces"


def memory_space(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MemorySpace",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def apply(cluster: harness.Cluster, body: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("apply", "-f", "-", input=json.dumps(body), check=False)


def test_the_crd_becomes_established(cluster: harness.Cluster, crds: list[str]) -> None:
    assert "customresourcedefinition.apiextensions.k8s.io/memoryspaces.memspace.dev" in crds
    crd = json.loads(
        cluster.kubectl("get", "crd", "memoryspaces.memspace.dev", "-o", "json").stdout
    )
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    assert crd["status"]["acceptedNames"]["shortNames"] == ["msp"]


def test_a_minimal_space_gets_every_default(
    cluster: harness.Cluster, crds: list[str], namespace: str
) -> None:
    with cluster.kube_api() as api:
        objects = kubernetes.client.CustomObjectsApi(api)
        body = memory_space("notes", namespace)
        created = cast(
            "dict[str, Any]",
            objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body),
        )
    # hotCapacity and storage.size stay unset: the space's MemorySpaceClass (or the operator's
    # built-in 100000 and 10Gi) decides them; embeddingDim too (the model's dimension, or the
    # operator's 768 without a model).
    assert created["spec"] == {
        "storage": {"reclaimPolicy": "Retain"},
        "tiers": {"warmCapacity": 1000000, "coldCompression": "zstd"},
        "state": "Active",
    }


def test_a_space_without_spec_gets_defaults_too(
    cluster: harness.Cluster, crds: list[str], namespace: str
) -> None:
    body = memory_space("bare", namespace)
    del body["spec"]
    cluster.kubectl("apply", "-f", "-", input=json.dumps(body))
    got = cluster.kubectl("get", "msp", "bare", "-n", namespace, "-o=jsonpath={.spec.state}")
    assert got.stdout == "Active"
    dim = cluster.kubectl("get", "msp", "bare", "-n", namespace, "-o=jsonpath={.spec.embeddingDim}")
    assert dim.stdout == ""  # left to the operator: 768 without a model


INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "bad-pattern": ({"spaceId": "Bad_ID"}, '"Bad_ID": spec.spaceId in body should match'),
    "too-short": ({"spaceId": "ab"}, '"ab": spec.spaceId in body should be at least 3 chars'),
    "too-long": ({"spaceId": "a" * 64}, "spec.spaceId: Too long: may not be more than 63"),
    "dim-zero": (
        {"embeddingDim": 0},
        "0: spec.embeddingDim in body should be greater than or equal to 1",
    ),
    "dim-big": (
        {"embeddingDim": 4097},
        "4097: spec.embeddingDim in body should be less than or equal to 4096",
    ),
    "bad-state": (
        {"state": "Paused"},
        'spec.state: Unsupported value: "Paused": supported values: "Active", "Inactive"',
    ),
    "bad-codec": (
        {"tiers": {"coldCompression": "gzip"}},
        'spec.tiers.coldCompression: Unsupported value: "gzip"',
    ),
    "bad-policy": (
        {"storage": {"reclaimPolicy": "Recycle"}},
        'spec.storage.reclaimPolicy: Unsupported value: "Recycle"',
    ),
    "bad-size": ({"storage": {"size": "ten"}}, "spec.storage.size must be a positive quantity"),
    "zero-size": ({"storage": {"size": "0"}}, "spec.storage.size must be a positive quantity"),
    "no-hot": ({"tiers": {"hotCapacity": 0}}, "spec.tiers.hotCapacity: Invalid value: 0"),
    "no-quota": ({"quota": {"maxMemories": 0}}, "spec.quota.maxMemories: Invalid value: 0"),
    "no-recalls": (
        {"quota": {"maxRecallsPerSecond": 0}},
        "spec.quota.maxRecallsPerSecond: Invalid value: 0",
    ),
    # No spaceId: the name is the ID, so it must be one.
    "x": (
        {},
        "spec.spaceId is not set, so it defaults to metadata.name, which must then be a valid",
    ),
}


@pytest.mark.usefixtures("crds")
@pytest.mark.parametrize("name", INVALID)
def test_an_invalid_space_is_rejected_with_a_clear_message(
    cluster: harness.Cluster, namespace: str, name: str
) -> None:
    spec, message = INVALID[name]
    result = apply(cluster, memory_space(name, namespace, **spec))
    assert result.returncode != 0
    assert message in result.stderr


IMMUTABLE: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "spaceId changed": ({"spaceId": "first"}, {"spaceId": "second"}, "spec.spaceId is immutable"),
    "spaceId set": ({}, {"spaceId": "other-id"}, "spec.spaceId is immutable"),
    "spaceId unset": ({"spaceId": "first"}, {}, "spec.spaceId is immutable"),
    "embeddingDim": ({"embeddingDim": 384}, {"embeddingDim": 768}, "embeddingDim is immutable"),
    "size shrunk": (
        {"storage": {"size": "10Gi"}},
        {"storage": {"size": "5Gi"}},
        "spec.storage.size may grow but never shrink",
    ),
    "size shrunk a little": (
        {"storage": {"size": "1Gi"}},
        {"storage": {"size": "1023Mi"}},
        "spec.storage.size may grow but never shrink",
    ),
    "class changed": (
        {"storage": {"storageClassName": "fast"}},
        {"storage": {"storageClassName": "slow"}},
        "spec.storage.storageClassName is immutable",
    ),
    "class set": (
        {},
        {"storage": {"storageClassName": "slow"}},
        "spec.storage.storageClassName is immutable",
    ),
}


@pytest.mark.usefixtures("crds")
@pytest.mark.parametrize("change", IMMUTABLE)
def test_an_immutable_change_is_rejected(
    cluster: harness.Cluster, namespace: str, change: str
) -> None:
    before, after, message = IMMUTABLE[change]
    cluster.kubectl(
        "create", "-f", "-", input=json.dumps(memory_space("space", namespace, **before))
    )
    result = cluster.kubectl(
        "replace",
        "-f",
        "-",
        input=json.dumps(memory_space("space", namespace, **after)),
        check=False,
    )
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.usefixtures("crds")
@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({"storage": {"size": "10Gi"}}, {"storage": {"size": "20Gi"}}),
        ({"storage": {"size": "1Gi"}}, {"storage": {"size": "1024Mi"}}),
        ({}, {"spaceId": "space"}),  # the default made explicit is the same ID
        ({"state": "Active"}, {"state": "Inactive"}),
        (
            {"tiers": {"hotCapacity": 10}},
            {"tiers": {"hotCapacity": 20}, "quota": {"maxMemories": 5}},
        ),
    ],
)
def test_an_allowed_change_is_accepted(
    cluster: harness.Cluster, namespace: str, before: dict[str, Any], after: dict[str, Any]
) -> None:
    cluster.kubectl(
        "create", "-f", "-", input=json.dumps(memory_space("space", namespace, **before))
    )
    cluster.kubectl(
        "replace", "-f", "-", input=json.dumps(memory_space("space", namespace, **after))
    )


FULL_STATUS: dict[str, Any] = {
    "observedGeneration": 1,
    "conditions": [
        {
            "type": "Ready",
            "status": "True",
            "reason": "SpaceReady",
            "message": "serving",
            "lastTransitionTime": "2026-01-02T03:04:05Z",
            "observedGeneration": 1,
        },
    ],
    "spaceId": "notes",
    "shard": 0,
    "endpoint": "memspace-shard-0.memspace-system.svc:50051",
    "claimName": "space-notes",
    "credentialsSecret": "notes-memspace",
    "indexGeneration": 1,
    "memories": 1234,
    "pressure": 0.25,
    "walLagMs": 12.5,
    "walOldestRecordTime": "2026-01-02T03:04:05Z",
    "consolidationRate": 3.5,
    "tierMemories": {"hot": 1000, "warm": 200, "cold": 34},
    "lastHealthTime": "2026-01-02T03:04:05Z",
    "kopf": {"progress": {"create": {"retries": 1}}},
}


def test_status_keeps_every_field_and_shows_in_the_printer_columns(
    cluster: harness.Cluster, crds: list[str], namespace: str
) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(memory_space("notes", namespace)))
    status = copy.deepcopy(FULL_STATUS)
    cluster.kubectl(
        "patch", "msp", "notes", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {**status, "unknownField": "pruned"}}),
    )  # fmt: skip
    got = json.loads(cluster.kubectl("get", "msp", "notes", "-n", namespace, "-o", "json").stdout)
    assert got["status"] == status

    table = cluster.kubectl("get", "msp", "notes", "-n", namespace).stdout.splitlines()
    assert table[0].split() == [
        "NAME",
        "SPACEID",
        "READY",
        "REASON",
        "MEMORIES",
        "PRESSURE",
        "WAL-LAG",
        "AGE",
    ]
    row = table[1].split()
    assert row[:6] == ["notes", "notes", "True", "SpaceReady", "1234", "0.25"]
    assert re.fullmatch(r"\d+d", row[6]), row  # WAL-Lag: an age, long since 2026-01-02

    # The age is computed when shown: a record written 90 s ago shows as 90 s, with no status
    # write in between; with nothing waiting the column is empty.
    oldest = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=90)
    stamp = oldest.strftime("%Y-%m-%dT%H:%M:%SZ")
    cluster.kubectl(
        "patch", "msp", "notes", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"walOldestRecordTime": stamp}}),
    )  # fmt: skip
    shown = cluster.kubectl("get", "msp", "notes", "-n", namespace).stdout.splitlines()[1].split()
    assert shown[6] in {"90s", "91s", "92s", "93s"}, shown
    cluster.kubectl(
        "patch", "msp", "notes", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"walOldestRecordTime": None, "walLagMs": 0}}),
    )  # fmt: skip
    header, line = cluster.kubectl("get", "msp", "notes", "-n", namespace).stdout.splitlines()
    start, end = header.index("WAL-LAG"), header.index("AGE")
    assert line[start:end].strip() == "", line


def test_a_bad_status_is_rejected(
    cluster: harness.Cluster, crds: list[str], namespace: str
) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(memory_space("notes", namespace)))
    bad = {"status": {"conditions": [{"type": "Ready", "status": "Maybe"}]}}
    result = cluster.kubectl(
        "patch", "msp", "notes", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps(bad), check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert 'Unsupported value: "Maybe"' in result.stderr


# --- MemorySpaceClass -----------------------------------------------------------------------------

CLASSES = "memoryspaceclasses"


def space_class(name: str, spec: dict[str, Any], default: bool = False) -> dict[str, Any]:
    annotations = {"memspace.dev/is-default-class": "true"} if default else {}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MemorySpaceClass",
        "metadata": {"name": name, "annotations": annotations},
        "spec": spec,
    }


def test_a_class_is_cluster_scoped_and_shows_its_limits(
    cluster: harness.Cluster, crds: list[str]
) -> None:
    assert "customresourcedefinition.apiextensions.k8s.io/memoryspaceclasses.memspace.dev" in crds
    name = f"gold-{uuid.uuid4().hex[:8]}"
    body = space_class(
        name,
        {
            "limits": {"hotCapacity": 5000, "storageSize": "20Gi", "maxRecallsPerSecond": 50},
            "defaults": {"storageSize": "5Gi", "storageClassName": "fast"},
            "allowedStorageClasses": ["fast"],
        },
        default=True,
    )
    cluster.kubectl("create", "-f", "-", input=json.dumps(body))
    try:
        table = cluster.kubectl("get", "mspc", name).stdout.splitlines()
        assert table[0].split() == ["NAME", "DEFAULT", "MAX-HOT", "MAX-SIZE", "AGE"]
        assert table[1].split()[:4] == [name, "true", "5000", "20Gi"]
        # A MemorySpace names its class.
        space = memory_space("classy", "default", className=name)
        assert (
            cluster.kubectl(
                "create", "--dry-run=server", "-f", "-", input=json.dumps(space)
            ).returncode
            == 0
        )
    finally:
        cluster.kubectl("delete", CLASSES, name, check=False)


@pytest.mark.usefixtures("crds")
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"limits": {"hotCapacity": 10}, "defaults": {"hotCapacity": 20}},
            "every default must be at most its limit",
        ),
        (
            {"limits": {"storageSize": "1Gi"}, "defaults": {"storageSize": "2Gi"}},
            "every default must be at most its limit",
        ),
        (
            {"defaults": {"storageClassName": "slow"}, "allowedStorageClasses": ["fast"]},
            "spec.defaults.storageClassName must be one of spec.allowedStorageClasses",
        ),
        ({"limits": {"storageSize": "lots"}}, "must be a positive quantity"),
        ({"limits": {"maxRecallsPerSecond": 0}}, "spec.limits.maxRecallsPerSecond: Invalid value"),
        ({"limits": {"embeddingDim": 5000}}, "spec.limits.embeddingDim: Invalid value"),
    ],
)
def test_an_inconsistent_class_is_rejected(
    cluster: harness.Cluster, spec: dict[str, Any], message: str
) -> None:
    body = space_class(f"bad-{uuid.uuid4().hex[:8]}", spec)
    result = cluster.kubectl(
        "create", "--dry-run=server", "-f", "-", input=json.dumps(body), check=False
    )
    assert result.returncode != 0
    assert message in result.stderr


# --- counts per namespace -------------------------------------------------------------------------


def test_a_resource_quota_caps_the_memory_spaces_of_a_namespace(
    cluster: harness.Cluster, crds: list[str], namespace: str
) -> None:
    """docs/operations.md, "Limits per namespace": Kubernetes' object-count quota, enforced by
    the API server itself."""
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "memspace", "namespace": namespace},
        "spec": {"hard": {"count/memoryspaces.memspace.dev": "2"}},
    }

    def used() -> dict[str, Any]:
        got = cluster.kubectl("get", "resourcequota", "memspace", "-n", namespace, "-o=json")
        return cast("dict[str, Any]", json.loads(got.stdout).get("status") or {})

    # The API server refuses every MemorySpace of the namespace until the quota controller has
    # counted them. It learns a new CRD within 30 s and counts a quota when the quota is made
    # (else at its next full resync, 5 minutes later): a quota made sooner is made again.
    deadline = time.monotonic() + 120
    while True:
        cluster.kubectl("apply", "-f", "-", input=json.dumps(quota))
        counted = time.monotonic() + 10
        while time.monotonic() < counted:
            if "count/memoryspaces.memspace.dev" in (used().get("used") or {}):
                break
            time.sleep(0.5)
        else:
            assert time.monotonic() < deadline, f"the quota was never counted: {used()}"
            cluster.kubectl("delete", "resourcequota", "memspace", "-n", namespace)
            continue
        break
    for name in ("one", "two"):
        assert apply(cluster, memory_space(name, namespace)).returncode == 0
    refused = apply(cluster, memory_space("three", namespace))
    assert refused.returncode != 0
    assert "exceeded quota: memspace" in refused.stderr
    assert "count/memoryspaces.memspace.dev" in refused.stderr
    # Deleting one frees its slot.
    cluster.kubectl("delete", "msp", "one", "-n", namespace)
    deadline = time.monotonic() + 60
    while apply(cluster, memory_space("three", namespace)).returncode != 0:
        assert time.monotonic() < deadline, "the freed slot never became usable"
        time.sleep(0.5)
