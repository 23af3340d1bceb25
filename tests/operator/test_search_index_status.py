"""spec.index and status.index without a cluster: the spec parsed into the index entry, a bad
one refused naming the field, the shard's SearchIndexStatus shown in the status and read back."""

from __future__ import annotations

import pytest

from memspace_contract import index, spaces
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_operator import errors, health, models, statuses, tracking


def body(spec_index: object, status: dict[str, object] | None = None) -> dict[str, object]:
    return {
        "metadata": {"namespace": "team", "name": "notes", "uid": "u", "generation": 2},
        "spec": {"embeddingDim": 8, "index": spec_index},
        "status": status or {},
    }


def test_spec_index_reaches_the_index_entry() -> None:
    space = models.parse(body({"type": "hnsw", "m": 16, "efSearch": 40}))
    entry = models.index_entry(space.spec, None, space.generation)
    assert entry.search == index.SearchIndex(type="hnsw", m=16, ef_search=40)
    assert index.loads(entry.dumps()).search == entry.search


def test_a_space_without_spec_index_searches_auto() -> None:
    space = models.parse(body(None))
    assert space.spec.search == index.SearchIndex()


def test_a_bad_spec_index_is_refused_naming_the_field() -> None:
    with pytest.raises(errors.InvalidSpecError, match=r"spec\.index\.type"):
        models.parse(body({"type": "ivf"}))


def test_the_shards_search_index_status_is_shown_and_read_back() -> None:
    found = pb.SpaceHealth(
        space="notes",
        state="Active",
        memories=500_000,
        tier_memories={"hot": 100_000, "warm": 400_000},
        index=pb.SearchIndexStatus(
            type="hnsw",
            configured_type="auto",
            rows_indexed=400_000,
            build_state="ready",
            recall=0.97312,
            recall_samples=40,
        ),
    )
    answer = health.ShardHealth(
        shard=0, endpoint="e", serving=True, spaces={spaces.SpaceId("notes"): found}
    )
    _, figures = health.assess(answer, spaces.SpaceId("notes"))
    assert figures is not None
    shown = {
        "type": "hnsw",
        "configuredType": "auto",
        "rowsIndexed": 400_000,
        "buildState": "ready",
        "recall": 0.97,
    }
    assert figures.search_index == shown
    observed = statuses.Observed(space_id="notes", generation=2, figures=figures)
    observed.figures_time = statuses.now()
    status = statuses.render(observed, {})
    assert status["index"] == shown
    restored = tracking._restore(models.parse(body(None, status)))
    assert restored.figures is not None
    assert restored.figures.search_index == shown
    assert not figures.differs(restored.figures)
    rebuilt = statuses.Figures(
        **{**figures.__dict__, "search_index": {**shown, "buildState": "building"}}
    )
    assert rebuilt.differs(figures)


def test_a_space_not_loaded_shows_no_index() -> None:
    found = pb.SpaceHealth(space="notes", state="Active")
    answer = health.ShardHealth(
        shard=0, endpoint="e", serving=True, spaces={spaces.SpaceId("notes"): found}
    )
    _, figures = health.assess(answer, spaces.SpaceId("notes"))
    assert figures is not None
    assert figures.search_index is None
    observed = statuses.Observed(space_id="notes", generation=2, figures=figures)
    assert "index" not in statuses.render(observed, {})
