"""What keeps the operator's cost per space flat at 10,000 spaces, without a cluster: the shard
table's reads by shard, the Event recorder's memory of recent posts, the claim watch's copies of
the PVCs, and one read of the classes and one create of an index Secret for a burst of spaces."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from memspace_contract import index, spaces
from memspace_operator import (
    classes,
    errors,
    events,
    indexing,
    models,
    naming,
    sharding,
    volumes,
    watching,
)
from memspace_operator.settings import Settings


def ref(i: int) -> models.SpaceRef:
    return models.SpaceRef("tenant", f"space-{i:05d}", f"uid-{i:05d}")


def test_the_recorder_posts_an_event_once_per_repeat_window_and_forgets_a_deleted_space(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = events.Recorder()
    with caplog.at_level(logging.INFO, logger=events.__name__):
        recorder.normal(ref(1), "ClaimCreated", "created")
        recorder.normal(ref(1), "ClaimCreated", "created")
        recorder.normal(ref(2), "ClaimCreated", "created")
        recorder.forget(ref(1))
        recorder.normal(ref(1), "ClaimCreated", "created")
    assert len(caplog.records) == 3


def test_the_recorder_remembers_10_000_spaces_events_in_linear_time() -> None:
    """Three events for each of 10,000 spaces, all within the repeat window: pruning at every
    post past a fixed size made this quadratic (minutes of the operator's CPU)."""
    recorder = events.Recorder()
    logging.getLogger(events.__name__).disabled = True
    try:
        started = time.perf_counter()
        for i in range(10_000):
            for reason in ("ClaimCreated", "CredentialsCreated", "Mounted"):
                recorder.normal(ref(i), reason, f"{reason} for space {i}")
        elapsed = time.perf_counter() - started
        for i in range(10_000):
            recorder.forget(ref(i))
    finally:
        logging.getLogger(events.__name__).disabled = False
    assert elapsed < 10.0, f"30,000 posts took {elapsed:.1f} s"


def claim(**status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": "space-notes",
            "namespace": "memspace-system",
            "uid": "c1",
            "resourceVersion": "42",
            "labels": {naming.SHARD: "3", naming.SPACE_ID: "notes"},
            "annotations": {
                naming.OWNER_UID: "u1",
                naming.CREDENTIALS_UID: "s1",
                "pv.kubernetes.io/bind-completed": "yes",
            },
            "managedFields": [{"manager": "kube-controller-manager", "fieldsV1": {"f:x": {}}}],
            "finalizers": ["kubernetes.io/pvc-protection"],
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "hostpath",
            "volumeName": "pvc-c1",
            "resources": {"requests": {"storage": "2Gi"}},
        },
        "status": {"accessModes": ["ReadWriteOnce"], **status},
    }


def test_the_claim_watch_keeps_what_the_operator_reads_of_a_claim_and_no_more() -> None:
    whole = claim(phase="Bound", capacity={"storage": "1Gi"})
    kept = watching.slim(whole)
    assert "managedFields" not in kept["metadata"]
    assert "pv.kubernetes.io/bind-completed" not in kept["metadata"]["annotations"]
    assert volumes.condition(kept) == volumes.condition(whole)
    for read in (volumes.labels, volumes.shard_of, volumes.owner_uid, volumes.credentials_uid):
        assert read(kept) == read(whole)
    assert volumes.requested(kept) == volumes.requested(whole) == "2Gi"
    assert kept["metadata"]["resourceVersion"] == "42"


def test_a_health_round_over_10_000_spaces_reads_each_shard_in_its_own_time() -> None:
    """Every health round (each 30 s) and every mount reads each shard's spaces and load:
    scanning every assignment for each shard made a round over 10,000 spaces in 500 shards
    take seconds of the operator's loop."""
    table = sharding.Shards(max_spaces_per_shard=20, max_shards=501, intake_window_s=600)
    for i in range(10_000):
        space_id = spaces.parse_space_id(f"space-{i:05d}")
        shard = table.assign(space_id, f"uid-{i}", now=1_000.0)
        assert shard == i // 20
        if i % 20 == 19:
            table.set_mounted(shard, table.wanted(shard))
            table.seal(shard)
    started = time.perf_counter()
    for _ in range(10):
        in_use = [s for s in table.shards if table.count(s)]
        held = sum(len(table.spaces_of(s) | table.mounted(s)) for s in in_use)
    elapsed = time.perf_counter() - started
    assert (len(in_use), held) == (500, 10_000)
    assert elapsed < 2.0, f"10 rounds took {elapsed:.1f} s"
    table.release(spaces.parse_space_id("space-00000"))
    assert len(table.spaces_of(0)) == 19
    assert table.count(0) == 20  # still mounted: it counts until its shard unmounts it
    assert table.mounted_on(spaces.parse_space_id("space-00000")) == 0
    table.set_mounted(0, table.wanted(0))
    assert table.mounted_on(spaces.parse_space_id("space-00000")) is None


class CountingKube:
    """A stand-in for the operator's API client: answers after a pause, counts requests."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.patches: list[dict[str, Any]] = []
        self.refuse = False

    async def list(self, url: str, selector: str | None = None) -> dict[str, Any]:
        self.requests.append(("LIST", url))
        await asyncio.sleep(0.05)
        return {"items": [], "metadata": {"resourceVersion": "1"}}

    async def create(self, url: str, body: dict[str, Any], **_: Any) -> dict[str, Any]:
        self.requests.append(("POST", url))
        await asyncio.sleep(0.05)
        return body

    async def get_or_none(self, url: str) -> dict[str, Any] | None:
        self.requests.append(("GET", url))
        data: dict[str, Any] = {}
        for patch in self.patches:
            data.update(patch["data"])
        return {"data": {k: v for k, v in data.items() if v is not None}}

    async def patch(self, url: str, body: dict[str, Any], **_: Any) -> dict[str, Any]:
        self.requests.append(("PATCH", url))
        self.patches.append(body)
        await asyncio.sleep(0.05)
        if self.refuse:
            raise errors.NotFoundError(404, "NotFound", "gone")
        return body


def test_reconciles_that_start_together_read_the_classes_and_make_an_index_secret_once() -> None:
    """200 reconciles starting at once (a burst of new spaces) made 200 LISTs of the classes
    and, per intake shard, a create of its index Secret each (all but one refused)."""
    client = CountingKube()
    settings = Settings.from_env({})
    catalog = classes.Catalog(client, None)  # type: ignore[arg-type]
    index = indexing.Index(client, settings)  # type: ignore[arg-type]

    async def burst() -> None:
        await asyncio.gather(*(catalog.classes() for _ in range(200)))
        await asyncio.gather(*(index.ensure_secret(i // 100) for i in range(200)))

    asyncio.run(burst())
    verbs = [verb for verb, _ in client.requests]
    assert verbs == ["LIST", "POST", "POST"]


def test_index_entries_written_at_the_same_time_share_one_patch_and_each_lands() -> None:
    """20 new spaces of the intake shard writing their entries at once made 20 patches of one
    Secret; now the first writes its own and the 19 that came meanwhile share the next."""
    client = CountingKube()
    table = indexing.Index(client, Settings.from_env({}))  # type: ignore[arg-type]
    entries = [
        index.IndexEntry(space_id=spaces.parse_space_id(f"space-{i:05d}"), embedding_dim=8)
        for i in range(20)
    ]

    async def burst() -> None:
        await asyncio.gather(*(table.put(0, entry) for entry in entries))
        await table.remove(0, entries[0].space_id)

    asyncio.run(burst())
    patches = [url for verb, url in client.requests if verb == "PATCH"]
    assert len(patches) == 3  # 1 + 19 together, then the removal
    written: dict[str, Any] = {}
    for patch in client.patches:
        written.update(patch["data"])
    assert {k for k, v in written.items() if v is not None} == {
        index.entry_filename(e.space_id) for e in entries[1:]
    }


def test_every_writer_sharing_a_refused_index_patch_is_told() -> None:
    client = CountingKube()
    client.refuse = True  # the index Secret vanished
    table = indexing.Index(client, Settings.from_env({}))  # type: ignore[arg-type]
    entries = [
        index.IndexEntry(space_id=spaces.parse_space_id(f"space-{i:05d}"), embedding_dim=8)
        for i in range(5)
    ]

    async def burst() -> list[BaseException | None]:
        return await asyncio.gather(
            *(table.put(0, entry) for entry in entries), return_exceptions=True
        )

    outcomes = asyncio.run(burst())
    assert all(isinstance(outcome, errors.TemporaryError) for outcome in outcomes)
    assert len([verb for verb, _ in client.requests if verb == "PATCH"]) == 2
