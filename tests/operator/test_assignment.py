"""Shard assignment rules, without a cluster: fewest spaces first, sticky, a new shard only when
all are full, none past maxShards."""

from __future__ import annotations

from memspace_contract import spaces
from memspace_operator import sharding


def sid(name: str) -> spaces.SpaceId:
    return spaces.parse_space_id(name)


def test_spaces_fill_the_shard_with_the_fewest_then_open_a_new_one() -> None:
    table = sharding.Shards(max_spaces_per_shard=2, max_shards=3)
    assert [table.assign(sid(f"s-{i}"), f"uid-{i}") for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert table.assign(sid("s-6"), "uid-6") is None
    assert table.full()


def test_an_assignment_is_sticky() -> None:
    table = sharding.Shards(max_spaces_per_shard=2, max_shards=3)
    assert table.assign(sid("one"), "uid-1") == 0
    assert table.assign(sid("one"), "uid-1") == 0
    assert table.count(0) == 1


def test_a_freed_slot_is_reused_before_a_new_shard() -> None:
    table = sharding.Shards(max_spaces_per_shard=2, max_shards=5)
    for i in range(4):
        table.assign(sid(f"s-{i}"), f"uid-{i}")
    table.release(sid("s-0"))
    assert table.assign(sid("new"), "uid-new") == 0
    assert table.shards == [0, 1]


def test_the_least_loaded_shard_wins_and_ties_go_to_the_lowest() -> None:
    table = sharding.Shards(max_spaces_per_shard=10, max_shards=5)
    table.record(sid("a-1"), 0, "u1")
    table.record(sid("a-2"), 0, "u2")
    table.record(sid("b-1"), 2, "u3")
    # Shards 0..2 exist (1 is empty): the empty one is chosen first, then 1 again before 2.
    assert table.assign(sid("new-1"), "n1") == 1
    assert table.assign(sid("new-2"), "n2") == 1
    assert table.assign(sid("new-3"), "n3") == 2


def test_known_empty_shards_count_as_existing() -> None:
    table = sharding.Shards(max_spaces_per_shard=1, max_shards=2)
    table.know([0, 1])
    table.record(sid("x-1"), 0, "u")
    assert table.assign(sid("y-1"), "v") == 1
    assert table.assign(sid("z-1"), "w") is None
