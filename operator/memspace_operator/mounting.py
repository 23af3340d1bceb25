"""Mounting spaces into their shards, batched: one task per shard keeps the StatefulSet's pod
template mounting exactly the spaces assigned to the shard.

A pod's volumes cannot change in place, so every template change restarts that one shard (it
drains gracefully). Changes are therefore batched: at most one template change per shard per
`mount_batch_window_s`; what arrives meanwhile is applied together at the end of the window,
and a first change waits a short settle time to gather a burst. Other shards never blip.
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
from memspace_operator import errors, indexing, kube, naming, sharding, shards
from memspace_operator.settings import Settings

log = logging.getLogger(__name__)

SETTLE_S = 1.0
"""Longest wait for more changes before a first template change after a quiet period."""
BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)

OnChange = Callable[[int, frozenset[spaces.SpaceId]], Awaitable[None]]


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
        on_change: OnChange,
    ) -> None:
        self._kube = client
        self._settings = settings
        self._assignments = assignments
        self._index = index
        self._on_change = on_change
        self._applied: dict[int, frozenset[spaces.SpaceId]] = {}
        self._changed_at: dict[int, float] = {}
        self._dirty: dict[int, asyncio.Event] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._settled = asyncio.Condition()
        self._services: set[int] = set()
        self.template_changes = 0

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
            self._applied[shard] = shards.mounted_spaces(body)
            annotations = body["metadata"].get("annotations") or {}
            self._changed_at[shard] = _parse_stamp(annotations.get(shards.TEMPLATE_CHANGED))
        return found

    def applied(self, shard: int) -> frozenset[spaces.SpaceId] | None:
        """The spaces shard N's template mounts; None before it is known."""
        return self._applied.get(shard)

    def is_mounted(self, space_id: spaces.SpaceId, shard: int) -> bool:
        return space_id in self._applied.get(shard, frozenset())

    def pending(self, shard: int) -> bool:
        """A template change for shard N is waiting for its batch window."""
        return self._applied.get(shard) != self._assignments.spaces_of(shard)

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

    async def wait_detached(self, space_id: spaces.SpaceId, shard: int, limit_s: float) -> bool:
        """Wait until shard N's template no longer mounts the space; False after `limit_s`."""
        async with self._settled:
            try:
                await asyncio.wait_for(
                    self._settled.wait_for(lambda: not self.is_mounted(space_id, shard)), limit_s
                )
            except TimeoutError:
                return False
        return True

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    # -- the per-shard loop ----------------------------------------------------------------

    async def _run(self, shard: int) -> None:
        event = self._dirty[shard]
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), self._settings.resync_interval_s)
            event.clear()
            try:
                await self._sync(shard, event)
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

    async def _sync(self, shard: int, event: asyncio.Event) -> None:
        namespace = self._settings.server_namespace
        url = kube.statefulsets(namespace, naming.shard_name(shard))
        await self._index.ensure_secret(shard)
        await self._ensure_service(shard)
        current = await self._kube.get_or_none(url)
        if current is not None:
            annotations = current["metadata"].get("annotations") or {}
            self._changed_at[shard] = max(
                self._changed_at.get(shard, 0.0),
                _parse_stamp(annotations.get(shards.TEMPLATE_CHANGED)),
            )
            await self._settle(shard, shards.mounted_spaces(current))
            desired = shards.statefulset(
                self._settings, shard, self._assignments.spaces_of(shard), ""
            )
            if not shards.template_differs(current, desired):
                return
        else:
            self._services.discard(shard)
            await self._ensure_service(shard)
        window_end = self._changed_at.get(shard, 0.0) + self._settings.mount_batch_window_s
        settle = min(SETTLE_S, self._settings.mount_batch_window_s)
        await asyncio.sleep(max(settle, window_end - time.time()))
        event.clear()  # what arrived during the wait is applied now
        mounted = self._assignments.spaces_of(shard)
        now = time.time()
        body = shards.statefulset(self._settings, shard, mounted, _stamp(now))
        if current is None:
            try:
                await self._kube.create(kube.statefulsets(namespace), body)
            except errors.AlreadyExistsError:
                event.set()  # made meanwhile (by an earlier run of ours): compare it next round
                return
            log.info("shard %d: created %s mounting %d spaces", shard, url, len(mounted))
        else:
            patch = {
                "metadata": {"annotations": body["metadata"]["annotations"]},
                "spec": {"template": body["spec"]["template"]},
            }
            await self._kube.patch(url, patch)
            log.info("shard %d: pod template now mounts %d spaces", shard, len(mounted))
        self.template_changes += 1
        self._changed_at[shard] = now
        await self._settle(shard, mounted)

    async def _settle(self, shard: int, mounted: frozenset[spaces.SpaceId]) -> None:
        before = self._applied.get(shard)
        self._applied[shard] = mounted
        if before != mounted:
            async with self._settled:
                self._settled.notify_all()
            await self._on_change(shard, mounted)
