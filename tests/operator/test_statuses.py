"""Status rendering and health assessment, without a cluster: conditions, the Ready summary,
and the rule that health figures are written only when they change meaningfully."""

from __future__ import annotations

import pytest

from memspace_contract import spaces
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_operator import health, statuses

BOUND = statuses.Condition("VolumeBound", "True", "Bound", "bound")
MOUNTED = statuses.Condition("Mounted", "True", "Mounted", "mounted")
SERVING = statuses.Condition("Healthy", "True", "Serving", "served")


def observed(**fields: object) -> statuses.Observed:
    base = statuses.Observed(
        space_id="notes",
        generation=3,
        shard=0,
        endpoint="memspace-shard-0.ns.svc:50051",
        claim_name="space-notes",
        credentials_secret="notes-memspace",
        volume=BOUND,
        mount=MOUNTED,
        health=SERVING,
    )
    for key, value in fields.items():
        setattr(base, key, value)
    return base


def ready(found: statuses.Observed) -> dict[str, object]:
    status = statuses.render(found, {})
    return next(c for c in status["conditions"] if c["type"] == "Ready")


def figures(**fields: object) -> statuses.Figures:
    values: dict[str, object] = {
        "memories": 10,
        "pressure": 0.1,
        "wal_lag_ms": 0.0,
        "consolidation_rate": 0.0,
        "tier_memories": {"hot": 10, "warm": 0, "cold": 0},
    }
    values.update(fields)
    return statuses.Figures(**values)  # type: ignore[arg-type]


def test_a_space_with_every_part_true_is_ready() -> None:
    found = ready(observed())
    assert (found["status"], found["reason"]) == ("True", "Ready")
    assert "memspace-shard-0" in str(found["message"])


def test_ready_names_the_first_part_that_is_not_true() -> None:
    pending = statuses.Condition("VolumeBound", "False", "VolumePending", "waiting")
    assert ready(observed(volume=pending))["reason"] == "VolumePending"
    unknown = statuses.Condition("Healthy", "Unknown", "NotMonitored", "no token")
    found = ready(observed(health=unknown))
    assert (found["status"], found["reason"]) == ("Unknown", "NotMonitored")


def test_an_inactive_space_is_not_ready_whatever_its_health() -> None:
    down = statuses.Condition("Healthy", "False", "ShardUnreachable", "down")
    found = ready(observed(state="Inactive", health=down))
    assert (found["status"], found["reason"]) == ("False", "Inactive")


def test_a_conflict_shows_only_ready() -> None:
    problem = statuses.Problem("SpaceIdConflict", "held by ns/other")
    status = statuses.render(statuses.Observed("notes", 1, problem=problem), {})
    assert [c["type"] for c in status["conditions"]] == ["Ready"]
    assert status["conditions"][0]["reason"] == "SpaceIdConflict"
    assert "shard" not in status


def test_every_condition_carries_the_observed_generation() -> None:
    status = statuses.render(observed(), {})
    assert status["observedGeneration"] == 3
    assert {c["observedGeneration"] for c in status["conditions"]} == {3}
    assert [c["type"] for c in status["conditions"]] == [
        "VolumeBound",
        "Mounted",
        "Healthy",
        "Ready",
    ]


def test_a_transition_time_changes_only_with_the_status() -> None:
    first = statuses.render(observed(), {})
    for condition in first["conditions"]:
        condition["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    again = statuses.render(observed(), first)
    assert statuses.same(again, first)
    lost = statuses.Condition("VolumeBound", "False", "VolumeLost", "lost")
    changed = statuses.render(observed(volume=lost), first)
    times = {c["type"]: c["lastTransitionTime"] for c in changed["conditions"]}
    assert times["VolumeBound"] != "2020-01-01T00:00:00Z"
    assert times["Mounted"] == "2020-01-01T00:00:00Z"


def test_a_merge_patch_removes_fields_that_are_gone_but_not_kopfs() -> None:
    old = {"shard": 1, "endpoint": "x", "kopf": {"progress": {}}, "spaceId": "notes"}
    patch = statuses.merge_patch({"spaceId": "notes"}, old)
    assert patch == {"spaceId": "notes", "shard": None, "endpoint": None}


@pytest.mark.parametrize(
    ("change", "meaningful"),
    [
        ({}, False),
        ({"memories": 11}, True),
        ({"tier_memories": {"hot": 9, "warm": 1, "cold": 0}}, True),
        ({"pressure": 0.105}, False),
        ({"pressure": 0.12}, True),
        ({"wal_lag_ms": 500.0}, True),  # zero to non-zero
        ({"consolidation_rate": 0.5}, True),
    ],
)
def test_figures_are_rewritten_only_on_meaningful_change(
    change: dict[str, object], meaningful: bool
) -> None:
    assert figures(**change).differs(figures()) is meaningful


def test_a_growing_wal_lag_is_rewritten_when_it_changes_by_half() -> None:
    shown = figures(wal_lag_ms=10_000.0)
    assert not figures(wal_lag_ms=12_000.0).differs(shown)
    assert figures(wal_lag_ms=20_000.0).differs(shown)
    assert not figures(wal_lag_ms=1.0).differs(figures(wal_lag_ms=0.5))  # below the floor


def test_health_of_an_unreachable_shard_keeps_the_figures() -> None:
    result = health.ShardHealth(0, "127.0.0.1:1", error="UNAVAILABLE")
    condition, found = health.assess(result, spaces.SpaceId("notes"))
    assert (condition.status, condition.reason) == ("False", "ShardUnreachable")
    assert found is None


@pytest.mark.parametrize(
    ("state", "serving", "expected"),
    [
        ("Active", True, ("True", "Serving")),
        ("Inactive", True, ("True", "Inactive")),
        ("Unmounted", True, ("False", "VolumeNotMounted")),
        ("Failed", True, ("False", "SpaceFailed")),
        ("Active", False, ("False", "ShardDraining")),
    ],
)
def test_health_states_map_to_conditions(
    state: str, serving: bool, expected: tuple[str, str]
) -> None:
    report = pb.SpaceHealth(
        space="notes", state=state, memories=4, pressure=0.5, tier_memories={"hot": 4}
    )
    result = health.ShardHealth(
        0, "127.0.0.1:1", serving=serving, spaces={spaces.SpaceId("notes"): report}
    )
    condition, found = health.assess(result, spaces.SpaceId("notes"))
    assert (condition.status, condition.reason) == expected
    assert found is not None
    assert found.memories == 4


def test_a_space_the_shard_does_not_report_is_not_loaded_yet() -> None:
    result = health.ShardHealth(0, "127.0.0.1:1", serving=True, spaces={})
    condition, _ = health.assess(result, spaces.SpaceId("notes"))
    assert condition.reason == "NotLoaded"


def test_figures_the_shard_does_not_know_are_left_out_never_shown_as_zero() -> None:
    answer = health.ShardHealth(
        0,
        "127.0.0.1:1",
        serving=True,
        spaces={
            spaces.SpaceId("notes"): pb.SpaceHealth(
                space="notes",
                state="Active",
                consolidation_rate=0.5,
                unknown=["memories", "tier_memories", "pressure", "wal_lag_ms"],
            )
        },
    )
    _, found = health.assess(answer, spaces.SpaceId("notes"))
    assert found is not None
    status = statuses.render(observed(figures=found), {})
    for key in ("memories", "tierMemories", "pressure", "walLagMs"):
        assert key not in status
    assert status["consolidationRate"] == 0.5
    # Once known they are shown (and the change is worth a write).
    known = figures(memories=5)
    assert known.differs(found)
    assert statuses.render(observed(figures=known), {})["memories"] == 5


def test_ready_waits_for_the_shard_to_confirm_the_generation() -> None:
    pending = ready(observed(confirming=True, index_generation=2))
    assert (pending["status"], pending["reason"]) == ("False", "IndexPending")
    inactive = ready(observed(confirming=True, index_generation=2, state="Inactive"))
    assert inactive["reason"] == "Deactivating"
    confirmed = ready(observed(confirming=True, index_generation=3, state="Inactive"))
    assert confirmed["reason"] == "Inactive"
    assert ready(observed(confirming=True, index_generation=3))["reason"] == "Ready"
    assert ready(observed(confirming=False))["reason"] == "Ready"  # no admin token to ask with


def test_the_wal_lag_is_shown_as_the_time_of_the_oldest_waiting_record() -> None:
    """kubectl shows WAL-Lag as the age of walOldestRecordTime: it stays true between status
    writes, where a lag in milliseconds is stale as soon as it is written."""
    lagging = observed(figures=figures(wal_lag_ms=46_332.6), figures_time="2026-01-02T03:04:05Z")
    status = statuses.render(lagging, {})
    assert status["walLagMs"] == 46_332.6
    assert status["walOldestRecordTime"] == "2026-01-02T03:03:18Z"
    idle = statuses.render(
        observed(figures=figures(wal_lag_ms=0.0), figures_time="2026-01-02T03:04:05Z"), {}
    )
    assert "walOldestRecordTime" not in idle
    unknown = figures(wal_lag_ms=9_000.0, unknown=frozenset({"wal_lag_ms"}))
    status = statuses.render(observed(figures=unknown, figures_time="2026-01-02T03:04:05Z"), {})
    assert "walOldestRecordTime" not in status
