"""The running operator: its clients, its in-memory tables and its background observers, made
once at start-up (from durable state: the PVCs and the shard StatefulSets) and closed once.

The observers feed each space's `Observed` and publish its status:
- the claim watch: VolumeBound;
- the mounter and the shard pods' watch: Mounted, once the pod that mounts the space is Ready;
- the health poller: Healthy and the health figures.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from memspace_contract import spaces
from memspace_operator import (
    certifying,
    classes,
    events,
    health,
    indexing,
    kube,
    mounting,
    naming,
    pods,
    sharding,
    statuses,
    tracking,
    volumes,
    watching,
)
from memspace_operator.settings import Settings

log = logging.getLogger(__name__)


class Operator:
    def __init__(self, settings: Settings, client: kube.Kube) -> None:
        self.settings = settings
        self.kube = client
        self.recorder = events.Recorder()
        self.book = tracking.Book(client)
        self.classes = classes.Catalog(client, settings.storage_class)
        self.assignments = sharding.Shards(
            settings.max_spaces_per_shard, settings.max_shards, settings.shard_intake_window_s
        )
        self.index = indexing.Index(client, settings)
        self.pods = pods.ShardPods(client, settings, self.on_pods)
        self.mounter = mounting.Mounter(
            client,
            settings,
            self.assignments,
            self.index,
            shard_pods=self.pods,
            on_change=self.on_mounted,
            on_freed=self.on_freed,
        )
        self.freed: Callable[[spaces.SpaceId | None], None] | None = None
        """Re-checks the spaces waiting for a freed space ID or shard slot (set by handlers)."""
        self.nudged: Callable[[spaces.SpaceId], None] | None = None
        """Reconciles, soon, the MemorySpace of a space ID (set by handlers): a backup of it
        completed or failed, or its volume was mounted for a restore."""
        self.claims = watching.ClaimWatch(client, settings, self.on_claim)
        self.certifier = certifying.Certifier(client, settings)
        self.poller = health.Poller(
            settings,
            self.shards_in_use,
            self.on_health,
            lambda: self.certifier.trust,
            self.certifier.operator_certificate,
        )
        self.volume_notes: dict[spaces.SpaceId, str] = {}
        """Per space, a note for VolumeBound's message (a refused expansion, say)."""
        self.background: set[asyncio.Task[None]] = set()
        """Re-checks started outside kopf's handlers (cancelled at close)."""

    @classmethod
    async def start(cls, settings: Settings, client: kube.Kube | None = None) -> Operator:
        client = client or await kube.Kube.open(settings.api_concurrency)
        operator = cls(settings, client)
        try:
            await operator._load()
        except BaseException:
            await client.close()
            raise
        return operator

    async def _load(self) -> None:
        """Rebuild the tables from the cluster, then start the observers."""
        namespace = self.settings.server_namespace
        resource_version = await self.claims.list()
        for pvc in self.claims.claims.values():
            labels = volumes.labels(pvc)
            shard, uid = volumes.shard_of(pvc), volumes.owner_uid(pvc)
            space_id = labels.get(naming.SPACE_ID, "")
            pending = labels.get(naming.DELETE_PENDING) == "true"
            if shard is not None and uid and spaces.is_valid_space_id(space_id) and not pending:
                self.assignments.record(spaces.SpaceId(space_id), shard, uid)
        selector = kube.selector({**naming.managed(), naming.COMPONENT: "shard"})
        listed = await self.kube.list(kube.statefulsets(namespace), selector)
        self.assignments.know(self.mounter.load(listed.get("items") or []))
        for shard in self.assignments.shards:
            for space_id in await self.index.offloaded(shard):
                if self.assignments.get(space_id) is None:
                    # Its MemorySpace's uid is learnt when it is reconciled (kept meanwhile).
                    self.assignments.record(space_id, shard, "")
                    self.assignments.set_offloaded(space_id, True)
        pods_version = await self.pods.list()
        await self.mounter.reap_all(list(self.claims.claims.values()))
        self.certifier.shards.update(self.assignments.shards)
        await self.certifier.start()
        self.claims.start(resource_version)
        self.pods.start(pods_version)
        self.poller.start()
        for shard in self.assignments.shards:
            self.mounter.request(shard)
        log.info(
            "operator ready: %d spaces assigned to %d shards in namespace %s",
            sum(self.assignments.count(s) for s in self.assignments.shards),
            len(self.assignments.shards),
            namespace,
        )

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run `work` in the background until it ends or the operator closes."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def close(self) -> None:
        for task in list(self.background):
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.book.close()
        await self.poller.close()
        await self.certifier.close()
        await self.claims.close()
        await self.pods.close()
        await self.mounter.close()
        await self.kube.close()

    # -- conditions from the tables ------------------------------------------------------------

    def volume_condition(
        self, space_id: spaces.SpaceId, pvc: dict[str, Any] | None = None
    ) -> statuses.Condition:
        """VolumeBound from the freshest of `pvc` and the watch's copy."""
        watched = self.claims.claims.get(naming.claim_name(space_id))
        if pvc is None or (watched is not None and _newer(watched, pvc)):
            pvc = watched
        return volumes.condition(pvc, self.volume_notes.get(space_id))

    def mount_condition(self, space_id: spaces.SpaceId) -> statuses.Condition | None:
        """Mounted: True only once a Ready pod of the shard, made from a template that mounts
        the space, runs (the pod's own spec says what it mounts)."""
        assignment = self.assignments.get(space_id)
        if assignment is None:
            return None
        shard = naming.shard_name(assignment.shard)
        path = naming.mount_path(space_id)
        serving = self.pods.serving(assignment.shard)
        if serving is not None and space_id in serving.mounts:
            return statuses.Condition(
                "Mounted",
                "True",
                "Mounted",
                f"pod {serving.name} (revision {serving.revision or 'unknown'}) mounts it at "
                f"{path} and is Ready",
            )
        if self.mounter.is_mounted(space_id, assignment.shard):
            return statuses.Condition(
                "Mounted",
                "False",
                "PodPending",
                f"{shard}'s pod template mounts it; waiting for the pod made from that template "
                "to be Ready",
            )
        return statuses.Condition(
            "Mounted",
            "False",
            "MountPending",
            f"{shard}'s pod template will mount it with the next batch of changes (at most one "
            f"restart every {self.settings.mount_batch_window_s:g} s)",
        )

    def unmonitored(self) -> statuses.Condition | None:
        if self.poller.enabled:
            return None
        return statuses.Condition(
            "Healthy",
            "Unknown",
            "NotMonitored",
            "the operator has no admin token (MEMSPACE_ADMIN_TOKEN_FILE) to ask the shards",
        )

    def shards_in_use(self) -> list[int]:
        return [s for s in self.assignments.shards if self.assignments.count(s)]

    # -- observers' callbacks --------------------------------------------------------------

    async def on_claim(self, name: str, pvc: dict[str, Any] | None) -> None:
        prefix = "space-"
        if not name.startswith(prefix) or not spaces.is_valid_space_id(name[len(prefix) :]):
            return
        space_id = spaces.SpaceId(name[len(prefix) :])
        if pvc is not None and volumes.is_delete_pending(pvc):
            if self.assignments.mounted_on(space_id) is None:
                # Labelled after its shard let it go (removed meanwhile): deleted now.
                self.spawn(self.mounter.reap(space_id), name=f"memspace-reap-{space_id}")
            return
        tracked = self.book.owner_of(space_id)
        if tracked is None or not tracked.reconciled:
            return
        tracked.observed.volume = volumes.condition(pvc, self.volume_notes.get(space_id))
        self.book.publish_soon(tracked)

    def nudge(self, space_id: spaces.SpaceId) -> None:
        if self.nudged is not None:
            self.nudged(space_id)

    def on_freed(self, space_id: spaces.SpaceId | None) -> None:
        if self.freed is not None:
            self.freed(space_id)

    async def on_pods(self, shard: int) -> None:
        await self.mounter.on_pods(shard)
        await self.on_mounted(shard, self.assignments.mounted(shard))

    async def on_mounted(self, shard: int, mounted: frozenset[spaces.SpaceId]) -> None:
        for space_id in sorted(self.assignments.spaces_of(shard) | mounted):
            tracked = self.book.owner_of(space_id)
            if tracked is None or not tracked.reconciled or tracked.observed.shard is None:
                continue  # its reconcile has not got that far: it publishes the mount itself
            condition = self.mount_condition(space_id)
            if condition is None:
                continue
            before = tracked.observed.mount
            if before == condition:
                continue
            tracked.observed.mount = condition
            if condition.status == "True" and (before is None or before.status != "True"):
                self.recorder.normal(tracked.ref, "Mounted", condition.message)
                hold = tracked.observed.hold
                if hold is not None and hold.reason == "Restoring":
                    self.nudge(space_id)  # its restore waited for this mount
            self.book.publish_soon(tracked)

    async def on_health(self, result: health.ShardHealth) -> None:
        for space_id in sorted(self.assignments.spaces_of(result.shard)):
            tracked = self.book.owner_of(space_id)
            if tracked is None or not tracked.reconciled or tracked.observed.shard is None:
                continue
            condition, figures = health.assess(result, space_id)
            observed = tracked.observed
            before = observed.health
            generation = observed.index_generation
            observed.health = condition
            changed = condition != before
            found = result.spaces.get(space_id)
            if found is not None and (
                found.index_generation >= observed.index_generation
                or result.asked_at > observed.index_confirmed_at
            ):
                observed.index_generation = int(found.index_generation)
                changed |= observed.index_generation != generation
            if figures is not None and figures.differs(observed.figures):
                observed.figures = figures
                observed.figures_time = statuses.now()
                changed = True
            if before is not None and before.status == "True" and condition.status != "True":
                self.recorder.warning(tracked.ref, condition.reason, condition.message)
            # Only a change is published: a publish per space per round (a task each, to find
            # nothing to write) was a third of the operator's CPU at 2,400 spaces.
            if changed:
                self.book.publish_soon(tracked)


def _newer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether object `a` is a later version than `b` (etcd revisions are integers)."""
    try:
        return int(a["metadata"]["resourceVersion"]) > int(b["metadata"]["resourceVersion"])
    except (KeyError, ValueError):
        return False
