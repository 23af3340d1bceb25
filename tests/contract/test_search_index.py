"""The `index` section of a spaces-index entry (spec.index): parsed, defaulted, refused."""

from __future__ import annotations

import pytest

from memspace_contract import index, spaces


def entry_doc(**section: object) -> dict[str, object]:
    return {"spaceId": "alpha", "embeddingDim": 8, "index": section}


def test_an_entry_without_an_index_section_searches_auto_with_the_defaults() -> None:
    entry = index.parse_entry({"spaceId": "alpha", "embeddingDim": 8})
    assert entry.search == index.SearchIndex()
    assert entry.search.type == "auto"
    assert entry.search.auto_threshold == 200_000


def test_an_index_section_round_trips_through_json() -> None:
    search = index.SearchIndex(
        type="hnsw", auto_threshold=10, m=8, ef_construction=40, ef_search=20
    )
    entry = index.IndexEntry(space_id=spaces.SpaceId("alpha"), embedding_dim=8, search=search)
    assert index.loads(entry.dumps()).search == search
    assert entry.to_json()["index"] == {
        "type": "hnsw",
        "autoThreshold": 10,
        "m": 8,
        "efConstruction": 40,
        "efSearch": 20,
    }


@pytest.mark.parametrize(
    ("section", "named"),
    [
        ({"type": "ivf"}, "index.type"),
        ({"m": 2}, "index.m"),
        ({"efSearch": 0}, "index.efSearch"),
        ({"efConstruction": "many"}, "index.efConstruction"),
        ({"autoThreshold": 0}, "index.autoThreshold"),
    ],
)
def test_a_bad_index_section_is_refused_naming_the_field(
    section: dict[str, object], named: str
) -> None:
    with pytest.raises(index.InvalidIndexEntryError, match=named):
        index.parse_entry(entry_doc(**section))
