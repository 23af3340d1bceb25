"""MemorySpaceClass limits and defaults applied to a spec (classes.apply), without a cluster:
min(spec, class), class defaults for what the spec leaves unset, and what cannot be lowered."""

from __future__ import annotations

from typing import Any

import pytest

from memspace_operator import classes, errors, models


def spec(**doc: Any) -> models.SpaceSpec:
    return models.parse_spec("notes", doc)


SMALL = classes.parse(
    {
        "metadata": {"name": "small", "annotations": {classes.DEFAULT_ANNOTATION: "true"}},
        "spec": {
            "limits": {
                "hotCapacity": 1000,
                "storageSize": "2Gi",
                "maxMemories": 5000,
                "maxWritesPerSecond": 10,
                "maxRecallsPerSecond": 20,
                "embeddingDim": 1024,
            },
            "defaults": {"storageSize": "1Gi", "maxMemories": 100, "maxRecallsPerSecond": 5},
            "allowedStorageClasses": ["standard", "fast"],
        },
    }
)


def test_a_silent_spec_gets_the_class_defaults_and_otherwise_its_limits() -> None:
    applied = classes.apply(spec(), SMALL, "team-a", fallback_storage_class="standard")
    assert applied.exceeded == ()
    served = applied.spec
    assert served.size == "1Gi"
    assert served.tiers.hot_capacity == 1000  # the built-in 100000, lowered without complaint
    assert served.quota.max_memories == 100
    assert served.quota.max_recalls_per_second == 5
    assert served.quota.max_writes_per_second == 10  # no default: a silent spec gets the limit


def test_a_spec_above_its_class_is_served_at_the_limits_and_says_so() -> None:
    asked = spec(
        tiers={"hotCapacity": 5000},
        storage={"size": "8Gi", "storageClassName": "fast"},
        quota={"maxWritesPerSecond": 50, "maxRecallsPerSecond": 3, "maxMemories": 200},
    )
    applied = classes.apply(asked, SMALL, "team-a")
    served = applied.spec
    assert (served.tiers.hot_capacity, served.size) == (1000, "2Gi")
    assert served.quota.max_writes_per_second == 10
    assert served.quota.max_recalls_per_second == 3  # under the limit: the spec's own
    assert served.quota.max_memories == 200
    assert served.storage_class == "fast"
    assert len(applied.exceeded) == 3
    joined = " ".join(applied.exceeded)
    for part in ("spec.tiers.hotCapacity 5000", "spec.storage.size 8Gi", "maxWritesPerSecond 50"):
        assert part in joined
    assert "class small" in joined


def test_no_class_changes_nothing() -> None:
    asked = spec(quota={"maxWritesPerSecond": 50})
    assert classes.apply(asked, None, "team-a") == classes.Applied(asked)
    assert classes.choose({}, None) is None


@pytest.mark.parametrize(
    ("doc", "namespace", "why"),
    [
        ({"embeddingDim": 2048}, "team-a", "spec.embeddingDim 2048 is above 1024"),
        ({"storage": {"storageClassName": "slow"}}, "team-a", "StorageClass slow is not one"),
        ({}, "team-a", "StorageClass (the cluster's default) is not one"),
    ],
)
def test_what_cannot_be_lowered_is_refused(doc: dict[str, Any], namespace: str, why: str) -> None:
    with pytest.raises(errors.ClassLimitError, match=why.replace("(", r"\(").replace(")", r"\)")):
        classes.apply(spec(**doc), SMALL, namespace)


def test_a_class_may_be_kept_to_some_namespaces() -> None:
    kept = classes.parse({"metadata": {"name": "gold"}, "spec": {"allowedNamespaces": ["team-a"]}})
    assert classes.apply(spec(), kept, "team-a").exceeded == ()
    with pytest.raises(errors.ClassLimitError, match="may not be used in this namespace"):
        classes.apply(spec(), kept, "team-b")


def test_a_named_class_wins_and_a_missing_one_is_an_error() -> None:
    other = classes.parse({"metadata": {"name": "big"}, "spec": {}})
    found = {"small": SMALL, "big": other}
    assert classes.choose(found, None) is SMALL
    assert classes.choose(found, "big") is other
    with pytest.raises(errors.ClassLimitError) as raised:
        classes.choose(found, "huge")
    assert raised.value.reason == "ClassNotFound"


def test_the_newest_of_several_default_classes_wins() -> None:
    def default(name: str, created: str) -> classes.SpaceClass:
        return classes.parse(
            {
                "metadata": {
                    "name": name,
                    "creationTimestamp": created,
                    "annotations": {classes.DEFAULT_ANNOTATION: "true"},
                }
            }
        )

    older, newer = default("a", "2026-01-01T00:00:00Z"), default("b", "2026-02-01T00:00:00Z")
    assert classes.choose({"a": older, "b": newer}, None) is newer


def test_the_read_quota_of_the_spec_reaches_the_index_entry() -> None:
    parsed = spec(quota={"maxRecallsPerSecond": 7})
    assert parsed.unset == frozenset(models.DEFAULTABLE) - {"maxRecallsPerSecond"}
    entry = models.index_entry(parsed, None, 1)
    assert entry.quota.max_recalls_per_second == 7
    assert entry.to_json()["quota"]["maxRecallsPerSecond"] == 7
