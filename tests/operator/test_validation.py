"""Objects the operator could not honour never reach it: the API server refuses them at
`kubectl apply`, with a message that says what is wrong (crds/, design section 2)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.operator.conftest import Kube, memory_space, unique
from tests.support import cluster as harness

pytestmark = pytest.mark.cluster


@pytest.fixture
def tenant(kube: Kube) -> Any:
    name = unique("valid")
    kube.create_namespace(name)
    yield name
    kube.delete_namespace(name)


def apply(cluster: harness.Cluster, body: dict[str, Any]) -> tuple[int, str]:
    result = cluster.kubectl("apply", "-f", "-", input=json.dumps(body), check=False)
    return result.returncode, result.stderr


@pytest.mark.parametrize(
    ("name", "spec", "says"),
    [
        ("ok-name", {"spaceId": "Bad_ID"}, "spec.spaceId"),
        ("x", {}, "spaceId"),
        ("ok-name", {"embeddingDim": 0}, "spec.embeddingDim"),
        ("ok-name", {"embeddingDim": 5000}, "spec.embeddingDim"),
        ("ok-name", {"storage": {"reclaimPolicy": "Recycle"}}, "spec.storage.reclaimPolicy"),
        ("ok-name", {"storage": {"size": "lots"}}, "spec.storage.size"),
        ("ok-name", {"tiers": {"coldCompression": "gzip"}}, "spec.tiers.coldCompression"),
        ("ok-name", {"state": "Paused"}, "spec.state"),
        ("ok-name", {"quota": {"maxMemories": 0}}, "spec.quota.maxMemories"),
    ],
)
def test_an_invalid_space_is_refused_with_a_clear_message(
    cluster: harness.Cluster, tenant: str, name: str, spec: dict[str, Any], says: str
) -> None:
    code, message = apply(cluster, memory_space(name, tenant, **spec))
    assert code != 0
    assert says in message, message


@pytest.mark.parametrize(
    ("before", "after", "says"),
    [
        ({"spaceId": "first-id"}, {"spaceId": "second-id"}, "spaceId is immutable"),
        ({"embeddingDim": 8}, {"embeddingDim": 16}, "embeddingDim is immutable"),
        (
            {"storage": {"storageClassName": "hostpath"}},
            {"storage": {"storageClassName": "other"}},
            "storageClassName is immutable",
        ),
        ({"storage": {"size": "2Gi"}}, {"storage": {"size": "1Gi"}}, "never shrink"),
    ],
)
def test_an_immutable_field_or_a_shrink_is_refused(
    cluster: harness.Cluster,
    tenant: str,
    before: dict[str, Any],
    after: dict[str, Any],
    says: str,
) -> None:
    assert apply(cluster, memory_space("changing", tenant, **before))[0] == 0
    code, message = apply(cluster, memory_space("changing", tenant, **after))
    assert code != 0
    assert says in message, message
