"""MemorySpaceClass on the real control plane: the operator serves each space with min(spec,
class) and the class defaults, reports ClassLimitExceeded where a spec asks for more, and follows
a class the platform admin changes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes.client
import pytest

from tests.operator.conftest import (
    GROUP,
    VERSION,
    Deployment,
    Kube,
    condition,
    unique,
    wait_events,
    wait_for,
)

pytestmark = pytest.mark.cluster

PLURAL = "memoryspaceclasses"

MakeClass = Callable[..., str]


@pytest.fixture
def space_class(kube: Kube) -> Iterator[MakeClass]:
    """Create MemorySpaceClasses (cluster-scoped) that are deleted after the test."""
    made: list[str] = []

    def make(prefix: str, spec: dict[str, Any], *, default: bool = False) -> str:
        name = unique(prefix)
        annotations = {"memspace.dev/is-default-class": "true"} if default else {}
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MemorySpaceClass",
            "metadata": {"name": name, "annotations": annotations},
            "spec": spec,
        }
        kube.custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
        made.append(name)
        return name

    yield make
    for name in made:
        with contextlib.suppress(kubernetes.client.ApiException):
            kube.custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)


def _ready_reason(deployment: Deployment, name: str) -> str:
    return str(condition(deployment.space(name), "Ready").get("reason", ""))


def test_a_class_sets_the_limits_and_defaults_its_spaces_are_served_with(
    deployment: Deployment, space_class: MakeClass
) -> None:
    kube, server_ns = deployment.kube, deployment.server_namespace
    small = space_class(
        "small",
        {
            "limits": {
                "hotCapacity": 1000,
                "storageSize": "2Gi",
                "maxWritesPerSecond": 10,
                "maxRecallsPerSecond": 20,
                "embeddingDim": 64,
            },
            "defaults": {"storageSize": "1Gi", "maxRecallsPerSecond": 5},
        },
        default=True,
    )
    with deployment.running():
        # Silent on everything: the default class's defaults, else its limits.
        deployment.apply("modest", embeddingDim=8)
        deployment.wait_condition("modest", "Mounted", "True")
        entry = deployment.index(0)["modest.json"]
        assert entry["quota"]["maxRecallsPerSecond"] == 5
        assert entry["quota"]["maxWritesPerSecond"] == 10
        assert entry["tiers"]["hotCapacity"] == 1000
        pvc = kube.pvc(server_ns, "space-modest") or {}
        assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
        assert _ready_reason(deployment, "modest") != "ClassLimitExceeded"

        # Asking for more than the class allows: served at the limits, and told so.
        deployment.apply(
            "greedy",
            className=small,
            embeddingDim=8,
            tiers={"hotCapacity": 5000},
            quota={"maxWritesPerSecond": 50},
        )
        body = deployment.wait_condition("greedy", "Ready", "False", "ClassLimitExceeded")
        message = condition(body, "Ready")["message"]
        assert "spec.tiers.hotCapacity 5000 is above 1000" in message
        assert "spec.quota.maxWritesPerSecond 50 is above 10" in message
        deployment.wait_condition("greedy", "Mounted", "True")
        entry = deployment.index(0)["greedy.json"]
        assert (entry["quota"]["maxWritesPerSecond"], entry["tiers"]["hotCapacity"]) == (10, 1000)
        wait_events(kube, deployment.namespace, "greedy", "ClassLimitExceeded")

        # What cannot be lowered is not served at all; a missing class neither.
        deployment.apply("wide", embeddingDim=128)
        body = deployment.wait_condition("wide", "Ready", "False", "ClassLimitExceeded")
        assert "spec.embeddingDim 128 is above 64" in condition(body, "Ready")["message"]
        deployment.apply("lost", className=unique("no-such-class"), embeddingDim=8)
        deployment.wait_condition("lost", "Ready", "False", "ClassNotFound")
        assert kube.pvc(server_ns, "space-wide") is None
        assert kube.pvc(server_ns, "space-lost") is None

        # The platform admin raises the class: the space gets what it asked for.
        kube.custom.patch_cluster_custom_object(
            GROUP,
            VERSION,
            PLURAL,
            small,
            {"spec": {"limits": {"hotCapacity": 10000, "maxWritesPerSecond": 100}}},
        )
        wait_for(
            "greedy to be within its class",
            lambda: _ready_reason(deployment, "greedy") not in ("", "ClassLimitExceeded"),
        )
        wait_for(
            "the index to carry greedy's own quota",
            lambda: deployment.index(0)["greedy.json"]["quota"]["maxWritesPerSecond"] == 50,
        )
        assert deployment.index(0)["greedy.json"]["tiers"]["hotCapacity"] == 5000
