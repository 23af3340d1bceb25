"""The kopf handlers, kept thin: each hands the body to `reconciling` and maps the operator's
errors to kopf's once, here. The running `Operator` (clients, tables, observers) is made in the
startup handler, kept in `memo`, and closed in the cleanup handler.

Importing this module registers the handlers with kopf's global registry: `memspace operator`
(main.py) does, and so does `kopf run -m memspace_operator.handlers` in the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf

from memspace_operator import (
    backups,
    errors,
    models,
    naming,
    operating,
    reconciling,
    schedules,
    tracing,
)
from memspace_operator.settings import Settings

log = logging.getLogger(__name__)

RESOURCE = (naming.GROUP, naming.VERSION, naming.PLURAL)
BACKUPS = (naming.GROUP, naming.VERSION, naming.BACKUP_PLURAL)
MAX_DELAY_S = 300.0
RECONCILE_WORKERS = 200
"""MemorySpaces handled at once (kopf's workers); the others wait their turn. Without a limit,
10,000 spaces applied at once were all started together and shared the API client's slots,
each one step at a time, so that every one would finish near the end (after 5 minutes 1,300
claims were made and only 46 spaces reported VolumeBound, the rate falling). A worker stays
5 s after its object's last event, so this also bounds the rate: 200 workers, 40 spaces/s."""

Step = Callable[[operating.Operator, Mapping[str, Any]], Awaitable[None]]


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf's own settings: our finalizer and annotation prefix, Events as memspace-operator."""
    settings.persistence.finalizer = naming.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=naming.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=naming.GROUP, key="last-handled-configuration"
    )
    settings.posting.reporting_component = naming.MANAGER
    settings.posting.event_name_prefix = "memspace-"
    settings.execution.default_backoff = 30
    settings.queueing.worker_limit = RECONCILE_WORKERS
    settings.watching.server_timeout = 300
    # The CRD is installed before the operator: no CRD or namespace watching, so the RBAC needs
    # no list/watch on either (restart the operator after adding a CRD version).
    settings.scanning.disabled = True


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    configure(settings)
    tracing.configure(os.environ)
    loaded = memo.get("settings")
    if not isinstance(loaded, Settings):
        loaded = Settings.from_env(os.environ)
    operator = await operating.Operator.start(loaded)
    operator.freed = lambda space_id: reconciling.nudge_waiting(operator, space_id)
    operator.nudged = lambda space_id: reconciling.nudge(operator, space_id)
    memo["operator"] = operator
    memo["resync"] = asyncio.get_running_loop().create_task(
        reconciling.resync_forever(operator), name="memspace-resync"
    )
    memo["schedules"] = asyncio.get_running_loop().create_task(
        schedules.run_forever(operator), name="memspace-schedules"
    )


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    for key in ("resync", "schedules"):
        task = memo.get(key)
        if isinstance(task, asyncio.Task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    operator = memo.get("operator")
    if isinstance(operator, operating.Operator):
        await operator.close()
    tracing.shutdown()


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
async def reconcile(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    await _run(memo, body, retry, reconciling.reconcile)


@kopf.on.event(*RESOURCE)
async def forget_deleted(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A MemorySpace gone without our finalizer (removed by hand) is no longer re-checked."""
    if event["type"] == "DELETED":
        operator: operating.Operator = memo["operator"]
        operator.book.forget(str(event["object"].get("metadata", {}).get("uid", "")))


@kopf.on.delete(*RESOURCE)
async def finalize(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    await _run(memo, body, retry, reconciling.finalize)


@kopf.on.resume(*BACKUPS)
@kopf.on.create(*BACKUPS)
async def take_backup(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    operator: operating.Operator = memo["operator"]
    await _run_backup(operator, body, lambda: backups.run(operator, body, retry), retry)


@kopf.on.delete(*BACKUPS)
async def delete_backup(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    operator: operating.Operator = memo["operator"]
    await _run_backup(operator, body, lambda: backups.remove(operator, body), retry)


async def _run_backup(
    operator: operating.Operator,
    body: kopf.Body,
    step: Callable[[], Awaitable[None]],
    retry: int,
) -> None:
    metadata = body.get("metadata") or {}
    ref = backups.BackupRef(
        str(metadata.get("namespace")), str(metadata.get("name")), str(metadata.get("uid"))
    )
    try:
        await step()
    except errors.PermanentError as err:
        operator.recorder.warning(ref, err.reason, err.message)
        raise kopf.PermanentError(f"{err.reason}: {err.message}") from err
    except errors.TemporaryError as err:
        delay = min(MAX_DELAY_S, max(err.delay, 1.0) * 2 ** min(retry, 8))
        operator.recorder.warning(ref, err.reason, f"{err.message}; retrying in {delay:.0f} s")
        raise kopf.TemporaryError(f"{err.reason}: {err.message}", delay=delay) from err


async def _run(memo: kopf.Memo, body: kopf.Body, retry: int, step: Step) -> None:
    operator: operating.Operator = memo["operator"]
    metadata = body.get("metadata") or {}
    ref = models.SpaceRef(
        str(metadata.get("namespace")), str(metadata.get("name")), str(metadata.get("uid"))
    )
    try:
        await step(operator, body)
    except errors.PermanentError as err:
        operator.recorder.warning(ref, err.reason, err.message)
        raise kopf.PermanentError(f"{err.reason}: {err.message}") from err
    except errors.TemporaryError as err:
        delay = min(MAX_DELAY_S, max(err.delay, 1.0) * 2 ** min(retry, 8))
        operator.recorder.warning(ref, err.reason, f"{err.message}; retrying in {delay:.0f} s")
        raise kopf.TemporaryError(f"{err.reason}: {err.message}", delay=delay) from err
    except Exception as err:
        operator.recorder.warning(ref, "ReconcileError", f"unexpected error: {err!r}")
        raise
