"""The spaces index document: the quota section, including the read quota."""

from __future__ import annotations

import json

import pytest

from memspace_contract import index, spaces


def test_max_recalls_per_second_round_trips() -> None:
    entry = index.IndexEntry(
        space_id=spaces.SpaceId("team-a"),
        embedding_dim=8,
        quota=index.Quota(max_writes_per_second=5, max_recalls_per_second=12.5),
    )
    doc = json.loads(entry.dumps())
    assert doc["quota"]["maxRecallsPerSecond"] == 12.5
    assert index.loads(entry.dumps()) == entry


def test_an_entry_without_the_read_quota_still_parses_as_unlimited() -> None:
    old = {
        "spaceId": "team-a",
        "embeddingDim": 8,
        "quota": {"maxMemories": 10, "maxWritesPerSecond": 3},
    }
    entry = index.parse_entry(old)
    assert entry.quota.max_recalls_per_second is None
    assert entry.quota.max_writes_per_second == 3
    assert index.parse_entry({**old, "quota": {"maxRecallsPerSecond": None}}).quota == index.Quota()


@pytest.mark.parametrize(
    ("value", "why"),
    [(0, "above 0"), (-1, "above 0"), ("5", "must be a number"), (True, "must be a number")],
)
@pytest.mark.parametrize("key", ["maxRecallsPerSecond", "maxWritesPerSecond"])
def test_a_bad_rate_names_its_field(key: str, value: object, why: str) -> None:
    with pytest.raises(index.InvalidIndexEntryError, match=f"quota.{key}.*{why}"):
        index.parse_entry({"spaceId": "team-a", "quota": {key: value}})
