"""Mounting spaces into their shards, batched: one task per shard keeps the StatefulSet's pod
template mounting the spaces the shard serves, without ever restarting a shard for a space that
leaves.

A pod's volumes cannot change in place, so every template change restarts that one shard (it
drains gracefully). Hence:
- additions (new spaces, only ever assigned to the intake shard, see `sharding`) are batched: at
  most one template change per shard per `mount_batch_window_s`, a first change waiting a short
  settle time to gather a burst;
- removals (a deleted or Inactive space) are deferred: the template keeps the volume until the
  shard restarts anyway (a batch of additions, an operator upgrade, its pod deleted or evicted),
  and drops it then. A deleted space's PVC (reclaimPolicy Delete) waits, labelled
  `memspace.dev/delete-pending`, and is deleted once no template mounts it;
- the intake shard is sealed (annotation, no restart) once full or `shard_intake_window_s` after
  it opened; a sealed shard is never changed for spaces coming;
- a shard with no space assigned (Active or Inactive) is scaled to zero and removed
  (StatefulSet, Service, index Secret), which frees its number and its slot under `max_shards`;
  the volumes it still mounted are unmounted with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from memspace_contract import spaces
from memspace_operator import errors, indexing, kube, naming, pods, sharding, shards
from memspace_operator.settings import Settings

log = logging.getLogger(__name__)

SETTLE_S = 1.0
"""Longest wait for more changes before a first template change after a quiet period."""
BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
SCALE_DOWN_WAIT_S = 5.0
"""Longest pause between checks that a shard being removed has no pod left (the pod watch
wakes it sooner)."""

OnChange = Callable[[int, frozenset[spaces.SpaceId]], Awaitable[None]]
OnFreed = Callable[[spaces.SpaceId | None], None]
"""Called when a space ID's pending volume is gone (the ID) or a shard was removed (None)."""


def _stamp(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat(timespec="milliseconds")


def _parse_stamp(value: str | None) -> float:
    if not value:
        return 0.0
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:
        return 0.0


class Mounter:
    def __init__(
        self,
        client: kube.Kube,
        settings: Settings,
        assignments: sharding.Shards,
        index: indexing.Index,
        *,
        shard_pods: pods.ShardPods,
        on_change: OnChange,
        on_freed: OnFreed,
    ) -> None:
        self._kube = client
        self._settings = settings
        self._assignments = assignments
        self._index = index
        self._pods = shard_pods
        self._on_change = on_change
        self._on_freed = on_freed
        self._changed_at: dict[int, float] = {}
        self._dirty: dict[int, asyncio.Event] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._services: set[int] = set()
        self._pod_changes: dict[int, asyncio.Event] = {}
        self._restarted: set[int] = set()
        """Shards seen restarting (a pod deleted or being deleted) since their last look."""
        self.template_changes = 0
        self.removed_shards = 0

    # -- state -----------------------------------------------------------------------------

    def load(self, statefulsets: list[dict[str, Any]]) -> list[int]:
        """What the existing shard StatefulSets mount; returns their shard numbers."""
        found = []
        for body in statefulsets:
            value = (body["metadata"].get("labels") or {}).get(naming.SHARD, "")
            if not value.isdigit():
                continue
            shard = int(value)
            found.append(shard)
            self._describe(shard, body)
        return found

    def _describe(self, shard: int, body: dict[str, Any]) -> None:
        annotations = body["metadata"].get("annotations") or {}
        opened = annotations.get(shards.OPENED_AT)
        self._assignments.describe(
            shard,
            mounted=shards.mounted_spaces(body),
            opened_at=_parse_stamp(opened) if opened else None,
            sealed=bool(annotations.get(shards.SEALED_AT)),
        )
        self._changed_at[shard] = max(
            self._changed_at.get(shard, 0.0),
            _parse_stamp(annotations.get(shards.TEMPLATE_CHANGED)),
        )

    def is_mounted(self, space_id: spaces.SpaceId, shard: int) -> bool:
        """Whether shard N's template mounts the space (its pod may not run it yet)."""
        return space_id in self._assignments.mounted(shard)

    def pending(self, shard: int) -> bool:
        """A template change for shard N is waiting for its batch window."""
        wanted = self._assignments.wanted(shard)
        return bool(wanted - self._assignments.mounted(shard))

    # -- requests --------------------------------------------------------------------------

    def request(self, shard: int) -> None:
        """Bring shard N's template in line with its assignments (soon, batched)."""
        event = self._dirty.get(shard)
        if event is None:
            event = self._dirty[shard] = asyncio.Event()
        event.set()
        task = self._tasks.get(shard)
        if task is None or task.done():
            self._tasks[shard] = asyncio.get_running_loop().create_task(
                self._run(shard), name=f"memspace-mount-shard-{shard}"
            )

    async def on_pods(self, shard: int) -> None:
        """A pod of shard N changed. One going that runs the current template is a restart for
        another reason (deleted, evicted): the shard drops its deferred removals now, so that
        the new pod comes without them. (A pod replaced by a template change of ours runs an
        older template: that rollout already dropped them.)"""
        changed = self._pod_changes.get(shard)
        if changed is not None:
            changed.set()
        ended = self._pods.ended.pop(shard, None)
        restart = ended is not None and ended.mounts == self._assignments.mounted(shard)
        if restart and self._removals(shard):
            # Latched for the very next look only: a later removal must not find it.
            self._restarted.add(shard)
            self.request(shard)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    # -- the per-shard loop ----------------------------------------------------------------

    def _removals(self, shard: int) -> frozenset[spaces.SpaceId]:
        return self._assignments.mounted(shard) - self._assignments.wanted(shard)

    def _wait_s(self, shard: int) -> float:
        """Until the next look without being asked: the resync, or the intake window's end."""
        wait = self._settings.resync_interval_s
        opened = self._assignments.opened_at(shard)
        if opened is not None and not self._assignments.is_sealed(shard):
            wait = min(wait, max(0.05, opened + self._assignments.intake_window_s - time.time()))
        return wait

    async def _run(self, shard: int) -> None:
        event = self._dirty[shard]
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), self._wait_s(shard))
            event.clear()
            try:
                if await self._sync(shard, event):
                    return  # the shard was removed
            except asyncio.CancelledError:
                raise
            except Exception as err:
                delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
                failures += 1
                if isinstance(err, errors.OperatorError):
                    log.warning("shard %d: %s; retrying in %.0f s", shard, err, delay)
                else:
                    log.exception("shard %d: unexpected error; retrying in %.0f s", shard, delay)
                await asyncio.sleep(delay)
                event.set()
            else:
                failures = 0

    async def _ensure_service(self, shard: int) -> None:
        if shard in self._services:
            return
        namespace = self._settings.server_namespace
        with contextlib.suppress(errors.AlreadyExistsError):
            await self._kube.create(kube.services(namespace), shards.service(self._settings, shard))
        self._services.add(shard)

    def _annotations(
        self, shard: int, now: float, current: dict[str, Any] | None
    ) -> dict[str, str]:
        """The shard's opening and sealing times, kept once written."""
        before = ((current or {}).get("metadata") or {}).get("annotations") or {}
        opened = self._assignments.opened_at(shard)
        found = {
            shards.OPENED_AT: before.get(shards.OPENED_AT)
            or _stamp(opened if opened is not None else now)
        }
        if self._assignments.is_sealed(shard):
            found[shards.SEALED_AT] = before.get(shards.SEALED_AT) or _stamp(now)
        return found

    async def _sync(self, shard: int, event: asyncio.Event) -> bool:
        """One look at shard N; True when it was removed."""
        namespace = self._settings.server_namespace
        url = kube.statefulsets(namespace, naming.shard_name(shard))
        current = await self._kube.get_or_none(url)
        assignments = self._assignments
        if current is not None:
            before = assignments.mounted(shard)
            self._describe(shard, current)
            if assignments.mounted(shard) != before:
                await self._on_change(shard, assignments.mounted(shard))
        if assignments.empty(shard):
            if current is None:
                self._forget(shard)
                return True
            await self._remove(shard, current)
            return True
        if current is None and not assignments.wanted(shard):
            return False  # nothing to serve yet: no pod for it
        await self._index.ensure_secret(shard)
        await self._ensure_service(shard)
        if current is None:
            self._services.discard(shard)
            await self._ensure_service(shard)
        mounted = assignments.mounted(shard)
        additions = assignments.wanted(shard) - mounted
        removals = mounted - assignments.wanted(shard)
        drift = current is not None and shards.template_differs(
            current, shards.statefulset(self._settings, shard, mounted, "")
        )
        restarting = current is not None and shard in self._restarted
        self._restarted.discard(shard)
        if not (current is None or additions or drift or (removals and restarting)):
            await self._seal_if_due(shard, url, current)
            return False
        if additions or current is None:
            window_end = self._changed_at.get(shard, 0.0) + self._settings.mount_batch_window_s
            settle = min(SETTLE_S, self._settings.mount_batch_window_s)
            await asyncio.sleep(max(settle, window_end - time.time()))
            event.clear()  # what arrived during the wait is applied now
        await self._write(shard, url, current, event)
        return False

    async def _write(
        self, shard: int, url: str, current: dict[str, Any] | None, event: asyncio.Event
    ) -> None:
        """Write shard N's template with the spaces it wants now (creating the StatefulSet)."""
        namespace = self._settings.server_namespace
        assignments = self._assignments
        mounted = assignments.mounted(shard)
        wanted = assignments.wanted(shard)
        now = time.time()
        assignments.set_mounted(shard, wanted)  # what this write makes it (re-read if it fails)
        if not assignments.takes_new(shard, now + self._settings.mount_batch_window_s):
            # Full, or its window ends before another batch could come: this is its last change.
            assignments.seal(shard)
        body = shards.statefulset(
            self._settings, shard, wanted, _stamp(now), self._annotations(shard, now, current)
        )
        if current is None:
            try:
                await self._kube.create(kube.statefulsets(namespace), body)
            except errors.AlreadyExistsError:
                event.set()  # made meanwhile (by an earlier run of ours): compare it next round
                return
            log.info("shard %d: created %s mounting %d spaces", shard, url, len(wanted))
        else:
            patch = {
                "metadata": {"annotations": body["metadata"]["annotations"]},
                "spec": {"template": body["spec"]["template"]},
            }
            await self._kube.patch(url, patch)
            log.info(
                "shard %d: pod template now mounts %d spaces (%d added, %d dropped)",
                shard,
                len(wanted),
                len(wanted - mounted),
                len(mounted - wanted),
            )
        self.template_changes += 1
        self._changed_at[shard] = now
        await self._on_change(shard, wanted)
        await self._reap(mounted - wanted)

    async def _seal_if_due(self, shard: int, url: str, current: dict[str, Any]) -> None:
        """Seal a shard that takes no more spaces: an annotation, no restart."""
        assignments = self._assignments
        annotations = current["metadata"].get("annotations") or {}
        if annotations.get(shards.SEALED_AT) and annotations.get(shards.OPENED_AT):
            return
        if assignments.takes_new(shard) and annotations.get(shards.OPENED_AT):
            return
        if not assignments.takes_new(shard):
            assignments.seal(shard)
        await self._kube.patch(
            url, {"metadata": {"annotations": self._annotations(shard, time.time(), current)}}
        )
        if assignments.is_sealed(shard):
            log.info("shard %d: sealed with %d spaces", shard, assignments.count(shard))

    # -- volumes left behind and empty shards ----------------------------------------------

    async def _reap(self, candidates: frozenset[spaces.SpaceId]) -> None:
        """Delete the claims waiting for their unmount (delete-pending) that no template mounts
        now: a pod still running with one keeps it (the API server's pvc-protection) until it
        stops, and no new pod asks for it."""
        namespace = self._settings.server_namespace
        for space_id in sorted(candidates):
            if self._assignments.mounted_on(space_id) is not None:
                continue
            if self._assignments.get(space_id) is not None and not self._assignments.is_offloaded(
                space_id
            ):
                continue  # adopted again meanwhile
            url = kube.pvcs(namespace, naming.claim_name(space_id))
            pvc = await self._kube.get_or_none(url)
            labels = ((pvc or {}).get("metadata") or {}).get("labels") or {}
            if pvc is None or labels.get(naming.DELETE_PENDING) != "true":
                continue
            await self._kube.delete(url, uid=pvc["metadata"].get("uid"))
            log.info("deleted claim %s: no shard mounts it any more", url)
            self._on_freed(space_id)

    async def reap(self, space_id: spaces.SpaceId) -> None:
        """Delete one delete-pending claim if no template mounts it."""
        try:
            await self._reap(frozenset([space_id]))
        except errors.OperatorError as err:
            log.warning("deleting the claim of %s failed (%s); retried at start-up", space_id, err)

    async def reap_all(self, claims: list[dict[str, Any]]) -> None:
        """At start-up: the delete-pending claims whose unmount happened while the operator
        was away."""
        found = []
        for pvc in claims:
            labels = pvc["metadata"].get("labels") or {}
            space_id = labels.get(naming.SPACE_ID, "")
            if labels.get(naming.DELETE_PENDING) == "true" and spaces.is_valid_space_id(space_id):
                found.append(spaces.SpaceId(space_id))
        await self._reap(frozenset(found))

    async def _remove(self, shard: int, current: dict[str, Any]) -> None:
        """Scale an empty shard to zero, then delete it with its Service and index Secret."""
        namespace = self._settings.server_namespace
        name = naming.shard_name(shard)
        url = kube.statefulsets(namespace, name)
        self._assignments.close(shard)
        mounted = self._assignments.mounted(shard)
        if (current.get("spec") or {}).get("replicas") != 0:
            await self._kube.patch(url, {"spec": {"replicas": 0}})
            log.info("shard %d: no space left; scaling it to zero", shard)
        changed = self._pod_changes.setdefault(shard, asyncio.Event())
        while self._pods.of(shard):
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), SCALE_DOWN_WAIT_S)
        self._pod_changes.pop(shard, None)
        # The StatefulSet last: while it exists, a restarted operator finishes the removal.
        await self._kube.delete(kube.services(namespace, name))
        await self._kube.delete(kube.secrets(namespace, naming.index_secret(shard)))
        self._index.forget(shard)
        await self._kube.delete(url, uid=current["metadata"].get("uid"))
        self._forget(shard)
        self.removed_shards += 1
        log.info("shard %d: removed", shard)
        await self._reap(mounted)
        self._on_freed(None)

    def _forget(self, shard: int) -> None:
        self._assignments.forget_shard(shard)
        self._services.discard(shard)
        self._changed_at.pop(shard, None)
        self._dirty.pop(shard, None)
        self._tasks.pop(shard, None)
