"""A write batch validated as columns keeps every rule of a single memory, with its message."""

from __future__ import annotations

import numpy as np
import pytest

from memspace_server import errors
from memspace_server.storage import memories, validating

DIM = 8


def good(**changes: object) -> memories.Draft:
    fields: dict[str, object] = {"content": "fine", "embedding": np.ones(DIM, np.float32)}
    fields.update(changes)
    return memories.Draft(**fields)  # type: ignore[arg-type]


BAD = [
    good(embedding=np.ones(DIM + 1, np.float32)),
    good(embedding=[1.0] * (DIM - 1)),
    good(embedding=np.zeros(DIM, np.float32)),
    good(embedding=np.full(DIM, np.nan, np.float32)),
    good(embedding=["x"] * DIM),
    good(content="x" * (memories.MAX_CONTENT_BYTES + 1)),
    good(content="é" * (memories.MAX_CONTENT_BYTES // 2 + 1)),
    good(content="\ud800"),
    good(confidence=1.5),
    good(confidence=float("nan")),
    good(created_at=-1.0),
    good(id=" padded"),
    good(id="x" * (memories.MAX_ID_LENGTH + 1)),
    good(tags={"": "v"}),
    good(tags={f"k{i}": "v" for i in range(memories.MAX_TAGS + 1)}),
]


@pytest.mark.parametrize("bad", BAD, ids=range(len(BAD)))
def test_a_bad_draft_among_good_ones_is_refused_as_alone(bad: memories.Draft) -> None:
    with pytest.raises(errors.InvalidMemoryError) as alone:
        memories.validate_draft(bad, DIM, 1.0)
    with pytest.raises(errors.InvalidMemoryError) as among:
        validating.validate([good(), bad, good()], DIM, 1.0)
    assert str(among.value) == str(alone.value)
    with pytest.raises(errors.InvalidMemoryError) as single:
        validating.validate([bad], DIM, 1.0)
    assert str(single.value) == str(alone.value)


def test_a_single_draft_comes_back_as_the_batch_path_makes_it() -> None:
    draft = good(content="žluť", id="given", confidence=0.25, tags={"a": "b"})
    one = validating.validate([draft], DIM, 100.0)
    both = validating.validate([draft, good()], DIM, 100.0)
    assert (one.ids, one.contents, one.tags) == (both.ids[:1], both.contents[:1], both.tags[:1])
    assert one.embeddings.tolist() == both.embeddings[:1].tolist()
    assert one.embeddings.dtype == np.float32
    assert one.confidence.tolist() == [0.25]
    assert one.created_at.tolist() == [100.0]
    fresh = validating.validate([good()], DIM, 100.0).ids[0]
    assert len(fresh) == 32


@pytest.mark.parametrize("count", [2, 15, 16, 100])
def test_fresh_ids_are_distinct_strings_of_128_random_bits_at_any_batch_size(count: int) -> None:
    drafts = [good(content=f"m{i}") for i in range(count)]
    ids = validating.validate(drafts, DIM, 100.0).ids
    assert len(set(ids)) == count
    assert all(type(i) is str and len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert all(memories.check_id(i) == i for i in ids)


def test_a_batch_comes_back_as_columns_with_fresh_ids_where_none_was_given() -> None:
    drafts = [
        good(content=f"m{i}", embedding=np.full(DIM, i + 1, np.float32), tags={"i": str(i)})
        for i in range(5)
    ]
    drafts.append(good(id="given", confidence=0.25, created_at=7.0))
    batch = validating.validate(drafts, DIM, 100.0)
    assert batch.ids[-1] == "given"
    fresh = batch.ids[:-1]
    assert len(set(fresh)) == 5
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in fresh)
    assert batch.contents[:2] == ["m0", "m1"]
    assert batch.embeddings.dtype == np.float32
    assert batch.embeddings[:, 0].tolist() == [1, 2, 3, 4, 5, 1]
    assert batch.tags[3] == {"i": "3"}
    assert batch.created_at.tolist() == [100.0] * 5 + [7.0]
    assert batch.confidence.tolist() == [1.0] * 5 + [0.25]
    assert len(validating.validate([], DIM, 1.0)) == 0
