"""Shard assignment rules, without a cluster: new spaces go only to the intake shard, which is
sealed once full or past its window; a sealed shard takes nothing new; a space still mounted
somewhere goes back there; deleted and Inactive spaces stop counting once unmounted; an empty
shard's number is free again; none past maxShards."""

from __future__ import annotations

import time

from memspace_contract import spaces
from memspace_operator import sharding

T0 = 1_000_000.0


def sid(name: str) -> spaces.SpaceId:
    return spaces.parse_space_id(name)


def test_spaces_fill_the_intake_shard_then_open_a_new_one_up_to_max_shards() -> None:
    table = sharding.Shards(max_spaces_per_shard=2, max_shards=3, intake_window_s=60)
    got = [table.assign(sid(f"s-{i}"), f"uid-{i}", now=T0) for i in range(6)]
    assert got == [0, 0, 1, 1, 2, 2]
    assert table.assign(sid("s-6"), "uid-6", now=T0) is None
    assert table.full()


def test_an_assignment_is_sticky() -> None:
    table = sharding.Shards(max_spaces_per_shard=2, max_shards=3)
    assert table.assign(sid("one"), "uid-1") == 0
    assert table.assign(sid("one"), "uid-1") == 0
    assert table.count(0) == 1


def test_an_intake_shard_past_its_window_takes_no_new_space() -> None:
    table = sharding.Shards(max_spaces_per_shard=10, max_shards=5, intake_window_s=60)
    assert table.assign(sid("early"), "u1", now=T0) == 0
    assert table.takes_new(0, now=T0 + 59)
    assert not table.takes_new(0, now=T0 + 60)
    assert table.assign(sid("late"), "u2", now=T0 + 61) == 1


def test_a_sealed_shard_with_room_takes_no_new_space() -> None:
    table = sharding.Shards(max_spaces_per_shard=10, max_shards=5, intake_window_s=600)
    table.describe(0, mounted=[sid("old-1")], opened_at=T0, sealed=True)
    table.record(sid("old-1"), 0, "u0")
    assert table.count(0) == 1
    assert table.assign(sid("new-1"), "n1", now=T0 + 1) == 1


def test_a_shard_made_before_intake_shards_counts_as_sealed() -> None:
    table = sharding.Shards(max_spaces_per_shard=10, max_shards=5)
    table.describe(0, mounted=[], opened_at=None, sealed=False)
    assert table.is_sealed(0)
    assert table.assign(sid("new-1"), "n1") == 1


def test_a_space_still_mounted_goes_back_to_its_shard_even_when_sealed() -> None:
    table = sharding.Shards(max_spaces_per_shard=2, max_shards=5, intake_window_s=600)
    table.describe(0, mounted=[sid("kept"), sid("other")], opened_at=T0, sealed=True)
    assert table.assign(sid("kept"), "new-owner", now=T0 + 1) == 0
    assert table.keeps(sid("kept"), 0)


def test_deleted_and_inactive_spaces_count_until_unmounted() -> None:
    table = sharding.Shards(max_spaces_per_shard=2, max_shards=5, intake_window_s=600)
    for name in ("gone", "asleep"):
        table.record(sid(name), 0, name)
    table.describe(0, mounted=[sid("gone"), sid("asleep")], opened_at=T0, sealed=False)
    table.release(sid("gone"))
    table.set_inactive(sid("asleep"), True)
    assert table.wanted(0) == frozenset()
    assert table.count(0) == 2  # both still in the pod template
    table.set_mounted(0, table.wanted(0))  # the shard restarted for another reason
    assert table.count(0) == 0
    assert table.spaces_of(0) == {sid("asleep")}
    assert not table.empty(0)


def test_an_inactive_space_unmounted_from_a_sealed_shard_moves_when_active_again() -> None:
    table = sharding.Shards(max_spaces_per_shard=5, max_shards=5, intake_window_s=600)
    table.describe(0, mounted=[], opened_at=T0, sealed=True)
    table.record(sid("asleep"), 0, "u")
    table.set_inactive(sid("asleep"), True)
    assert table.keeps(sid("asleep"), 0)  # Inactive: it needs no mount
    table.set_inactive(sid("asleep"), False)
    assert not table.keeps(sid("asleep"), 0)  # mounting it would restart a sealed shard


def test_a_removed_shards_number_and_slot_are_free_again() -> None:
    table = sharding.Shards(max_spaces_per_shard=1, max_shards=2, intake_window_s=600)
    assert table.assign(sid("aaa"), "ua", now=T0) == 0
    assert table.assign(sid("bbb"), "ub", now=T0) == 1
    assert table.assign(sid("ccc"), "uc", now=T0) is None
    table.release(sid("aaa"))
    table.set_mounted(0, [])
    assert table.empty(0)
    table.close(0)
    assert table.assign(sid("ccc"), "uc", now=T0) is None  # closing: not yet free
    table.forget_shard(0)
    assert table.assign(sid("ccc"), "uc", now=T0) == 0


def test_a_shard_whose_statefulset_was_never_made_takes_new_spaces_after_a_takeover() -> None:
    # An operator assigned spaces to shard 1 (their claims' labels) and was killed before it
    # made the shard's StatefulSet: the next operator fills shard 1 instead of opening shard 2,
    # whichever space it reconciles first.
    table = sharding.Shards(max_spaces_per_shard=3, max_shards=5, intake_window_s=600)
    table.describe(
        0, mounted=[sid("space-a"), sid("space-b"), sid("space-c")], opened_at=T0, sealed=True
    )
    for name in ("space-a", "space-b", "space-c"):
        table.record(sid(name), 0, f"u-{name}")
    table.record(sid("space-d"), 1, "u-d")
    assert table.assign(sid("space-e"), "u-e", now=T0 + 5) == 1
    assert table.assign(sid("space-f"), "u-f", now=T0 + 5) == 1
    assert table.assign(sid("space-g"), "u-g", now=T0 + 5) == 2


def test_the_space_that_fills_the_intake_shard_keeps_its_place() -> None:
    """The last space assigned to the intake shard fills it: it stays there (it moved out and
    back in, rewriting its claim and index entry, once for every shard of a burst)."""
    table = sharding.Shards(max_spaces_per_shard=3, max_shards=5, intake_window_s=60)
    table.know([0])
    now = time.time()  # keeps() reads the clock
    table.describe(0, mounted=[], opened_at=now, sealed=False)
    for i in range(3):
        assert table.assign(sid(f"s-{i}"), f"uid-{i}", now=now) == 0
    assert not table.takes_new(0, now=now)
    assert table.keeps(sid("s-2"), 0)
    assert table.assign(sid("s-3"), "uid-3", now=now) == 1


def test_a_shard_first_made_by_the_next_operator_is_not_sealed_with_room_left() -> None:
    """An operator was killed after labelling claims for shards 0 (full) and 1 (one place
    left) and before making either StatefulSet. The next one reads the claims and makes both
    shards before it reconciles any of shard 1's spaces: shard 1 stays the intake shard (it was
    sealed at that first write, having no opening time, and a new space opened shard 2)."""
    table = sharding.Shards(max_spaces_per_shard=3, max_shards=5, intake_window_s=600)
    now = time.time()  # record() reads the clock
    for name in ("a-0", "a-1", "a-2"):
        table.record(sid(name), 0, f"u-{name}")
    for name in ("b-0", "b-1"):
        table.record(sid(name), 1, f"u-{name}")
    for shard in (0, 1):
        # What the mounter's first write of a shard does: mount what is wanted, then seal the
        # shard unless it takes a new space after one more batch window.
        table.set_mounted(shard, table.wanted(shard))
        if not table.takes_new(shard, now + 0.5):
            table.seal(shard)
    assert table.is_sealed(0)
    assert not table.is_sealed(1)
    assert table.assign(sid("c-0"), "u-c-0") == 1
    assert table.assign(sid("c-1"), "u-c-1") == 2


def test_a_shard_made_before_intake_shards_stays_sealed_when_its_claims_are_read_first() -> None:
    table = sharding.Shards(max_spaces_per_shard=10, max_shards=5)
    table.record(sid("old-1"), 0, "u0")  # the claims are read before the StatefulSets
    table.describe(0, mounted=[sid("old-1")], opened_at=None, sealed=False)
    assert table.is_sealed(0)
    assert table.opened_at(0) is None
    assert table.assign(sid("new-1"), "n1") == 1
