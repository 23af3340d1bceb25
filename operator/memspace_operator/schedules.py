"""Scheduled backups of MemorySpaces (`spec.backup.schedule`, a cron expression in UTC) and
their retention (`spec.backup.keep`).

One loop checks every tracked space with a schedule every MEMSPACE_BACKUP_SCHEDULE_INTERVAL:
when a tick of its schedule has passed since its newest scheduled backup (or since the operator
first saw the schedule), it makes a MemorySpaceBackup named for that tick (a re-run makes no
second one: the name is taken), labelled scheduled; missed ticks are not caught up, only the
latest is taken. Then the scheduled backups of the space beyond the newest `keep` completed ones
are deleted, oldest first (their finalizer deletes their manifests from the target); a failed
one older than the oldest kept goes too. Backups made by hand are never pruned.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any

import croniter

from memspace_operator import errors, kube, naming, statuses, tracking
from memspace_operator.operating import Operator

log = logging.getLogger(__name__)

STAMP = "%Y%m%dt%H%M%S"


def due(
    schedule: str, since: datetime.datetime, now: datetime.datetime
) -> datetime.datetime | None:
    """The latest tick of `schedule` after `since` and at or before `now`, if any.
    ValueError for an expression croniter does not take."""
    try:
        ticks = croniter.croniter(schedule, since)
    except (croniter.CroniterError, ValueError, KeyError) as err:
        raise ValueError(str(err)) from err
    latest = None
    for _ in range(100_000):
        tick = ticks.get_next(datetime.datetime)
        if tick > now:
            break
        latest = tick
    return latest


def _tick_of(item: dict[str, Any]) -> datetime.datetime | None:
    raw = (item["metadata"].get("annotations") or {}).get(naming.SCHEDULED_AT)
    if not raw:
        return None
    try:
        return datetime.datetime.strptime(raw, statuses.TIME_FORMAT).replace(tzinfo=datetime.UTC)
    except ValueError:
        return None


class Scheduler:
    def __init__(self, op: Operator) -> None:
        self.op = op
        self.first_seen: dict[str, datetime.datetime] = {}
        """Per MemorySpace uid: when the operator first saw its schedule (no backup yet)."""

    async def check(self, tracked: tracking.Tracked, now: datetime.datetime) -> None:
        space = tracked.space
        policy = space.spec.backup
        if policy.schedule is None or space.deleting:
            self.first_seen.pop(space.ref.uid, None)
            return
        ref = space.ref
        selector = kube.selector(
            {naming.BACKUP_OF: naming.label_value(ref.name), naming.BACKUP_PURPOSE: "scheduled"}
        )
        listed = await self.op.kube.list(kube.memoryspacebackups(ref.namespace), selector)
        items = [i for i in listed.get("items") or [] if _tick_of(i) is not None]
        items.sort(key=lambda i: _tick_of(i) or now)
        since = _tick_of(items[-1]) if items else None
        if since is None:
            since = self.first_seen.setdefault(ref.uid, now)
        if not space.spec.offloaded:
            try:
                tick = due(policy.schedule, since, now)
            except ValueError as err:
                self.op.recorder.warning(
                    ref,
                    "InvalidSchedule",
                    f"spec.backup.schedule {policy.schedule!r} is not a cron expression "
                    f"({err}); no scheduled backups until it is",
                )
                return
            if tick is not None:
                made = await self._make(tracked, tick)
                if made is not None:
                    items.append(made)
        await self._prune(tracked, items, policy.keep)

    async def _make(
        self, tracked: tracking.Tracked, tick: datetime.datetime
    ) -> dict[str, Any] | None:
        space = tracked.space
        ref = space.ref
        name = naming.scheduled_backup(ref.name, tick.strftime(STAMP))
        body = naming.backup_object(
            ref.name,
            ref.namespace,
            name,
            target=space.spec.backup.target,
            purpose="scheduled",
            annotations={naming.SCHEDULED_AT: tick.strftime(statuses.TIME_FORMAT)},
        )
        try:
            made = await self.op.kube.create(kube.memoryspacebackups(ref.namespace), body)
        except errors.AlreadyExistsError:
            return None
        self.first_seen.pop(ref.uid, None)
        self.op.recorder.normal(
            ref,
            "BackupScheduled",
            f"made MemorySpaceBackup {name} for the schedule's tick at "
            f"{tick.strftime(statuses.TIME_FORMAT)}",
        )
        return made

    async def _prune(
        self, tracked: tracking.Tracked, items: list[dict[str, Any]], keep: int
    ) -> None:
        """Delete scheduled backups beyond the newest `keep` completed ones (oldest first)."""
        completed = [i for i in items if (i.get("status") or {}).get("phase") == "Completed"]
        if len(completed) <= keep:
            return
        kept = completed[-keep:]
        oldest_kept = _tick_of(kept[0])
        assert oldest_kept is not None
        doomed = [
            i
            for i in items
            if i not in kept
            and (i.get("status") or {}).get("phase") in ("Completed", "Failed")
            and (_tick_of(i) or oldest_kept) < oldest_kept
            and not i["metadata"].get("deletionTimestamp")
        ]
        for item in doomed:
            name = item["metadata"]["name"]
            await self.op.kube.delete(kube.memoryspacebackups(tracked.ref.namespace, name))
            self.op.recorder.normal(
                tracked.ref,
                "BackupPruned",
                f"deleted MemorySpaceBackup {name}: spec.backup.keep is {keep}",
            )


async def run_forever(op: Operator) -> None:
    """Check every scheduled space once per interval until cancelled."""
    scheduler = Scheduler(op)
    while True:
        await asyncio.sleep(op.settings.backup_schedule_interval_s)
        now = datetime.datetime.now(datetime.UTC)
        for tracked in list(op.book.all()):
            if op.book.get(tracked.ref.uid) is not tracked:
                continue
            try:
                await scheduler.check(tracked, now)
            except asyncio.CancelledError:
                raise
            except errors.OperatorError as err:
                log.info(
                    "%s: backup schedule check failed (%s); retried next round", tracked.ref, err
                )
            except Exception:
                log.exception("%s: backup schedule check failed", tracked.ref)
