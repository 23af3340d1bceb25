"""The `embedding` section of an index entry: an addition, absent (or null) meaning no model,
and the entry's dimension always the model's."""

from __future__ import annotations

import json

import pytest

from memspace_contract import index, models, spaces

MODEL = models.MODELS[models.DEFAULT_MODEL]


def test_an_entry_with_a_model_round_trips() -> None:
    entry = index.IndexEntry(
        space_id=spaces.SpaceId("team-a"),
        embedding_dim=MODEL.dim,
        embedding=index.Embedding(model=MODEL.name),
    )
    doc = json.loads(entry.dumps())
    assert doc["embedding"] == {"model": MODEL.name}
    assert index.loads(entry.dumps()) == entry


def test_an_entry_without_a_model_has_no_embedding_key_and_old_entries_parse() -> None:
    entry = index.IndexEntry(space_id=spaces.SpaceId("team-a"), embedding_dim=8)
    assert "embedding" not in json.loads(entry.dumps())
    old = {"spaceId": "team-a", "embeddingDim": 8}
    assert index.parse_entry(old).embedding is None
    assert index.parse_entry({**old, "embedding": None}).embedding is None


@pytest.mark.parametrize(
    ("section", "why"),
    [
        ({"model": "no-such-model"}, "unknown"),
        ({"model": ""}, "must be a model name"),
        ({"model": 3}, "must be a model name"),
        ("wordllama", "must be an object"),
    ],
)
def test_a_bad_embedding_section_names_its_field(section: object, why: str) -> None:
    doc = {"spaceId": "team-a", "embeddingDim": MODEL.dim, "embedding": section}
    with pytest.raises(index.InvalidIndexEntryError, match=f"embedding.*{why}"):
        index.parse_entry(doc)


def test_a_dimension_other_than_the_models_is_refused() -> None:
    doc = {"spaceId": "team-a", "embeddingDim": 768, "embedding": {"model": MODEL.name}}
    with pytest.raises(index.InvalidIndexEntryError, match=f"makes {MODEL.dim}-dimensional"):
        index.parse_entry(doc)


def test_a_model_not_offered_is_refused_by_lookup() -> None:
    assert models.lookup(MODEL.name) is MODEL
    with pytest.raises(models.UnknownModelError, match="offered: none"):
        models.lookup(MODEL.name, offered=())
