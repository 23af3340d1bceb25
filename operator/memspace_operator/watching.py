"""A list-and-watch of the spaces' PVCs in the server namespace: VolumeBound follows the
volumes as they bind, resize or get lost, without polling each claim.

kopf cannot watch the PVCs itself without watching them cluster-wide (its namespace scope
applies to every resource), which the operator's least-privilege RBAC does not allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from memspace_operator import errors, kube, naming
from memspace_operator.settings import Settings

log = logging.getLogger(__name__)

BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)

OnClaim = Callable[[str, dict[str, Any] | None], Awaitable[None]]
"""Called with (claim name, PVC or None when deleted)."""


class ListWatch:
    """A list, then a watch from the list's resourceVersion, listed again after a 410 Gone or
    (with backoff) any failure. Subclasses list and follow; `name` names the task and logs."""

    name = "resources"

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    async def list(self) -> str:
        raise NotImplementedError

    async def _follow(self, resource_version: str) -> str:
        raise NotImplementedError

    async def _relisted(self) -> None:
        """Called after a list made by the watch itself (not at start-up)."""

    def start(self, resource_version: str) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(resource_version), name=f"memspace-{type(self).__name__}"
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, resource_version: str) -> None:
        failures = 0
        while True:
            try:
                if not resource_version:
                    resource_version = await self.list()
                    await self._relisted()
                resource_version = await self._follow(resource_version)
                failures = 0
            except asyncio.CancelledError:
                raise
            except errors.GoneError:
                resource_version = ""
            except Exception as err:
                delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
                failures += 1
                log.warning("watching the %s failed (%s); again in %.1f s", self.name, err, delay)
                await asyncio.sleep(delay)
                resource_version = ""


class ClaimWatch(ListWatch):
    name = "spaces' claims"

    def __init__(self, client: kube.Kube, settings: Settings, on_claim: OnClaim) -> None:
        super().__init__()
        self._kube = client
        self._settings = settings
        self._on_claim = on_claim
        self.claims: dict[str, dict[str, Any]] = {}
        """The managed PVCs by name, as last seen (the parts the operator reads: `slim`)."""

    async def list(self) -> str:
        """List the PVCs (also used at start-up); returns the list's resourceVersion."""
        listed = await self._kube.list(
            kube.pvcs(self._settings.server_namespace), kube.selector(naming.managed())
        )
        seen = {item["metadata"]["name"]: slim(item) for item in listed.get("items") or []}
        gone = set(self.claims) - set(seen)
        self.claims = seen
        for name in gone:
            await self._on_claim(name, None)
        resource_version: str = listed["metadata"]["resourceVersion"]
        return resource_version

    async def _relisted(self) -> None:
        for name, pvc in list(self.claims.items()):
            await self._on_claim(name, pvc)

    async def _follow(self, resource_version: str) -> str:
        events = self._kube.watch(
            kube.pvcs(self._settings.server_namespace),
            resource_version,
            kube.selector(naming.managed()),
        )
        # Closed at once when cancelled mid-event, so its connection does not outlive the loop.
        async with contextlib.aclosing(events):
            async for kind, obj in events:
                resource_version = obj.get("metadata", {}).get("resourceVersion", resource_version)
                if kind == "BOOKMARK":
                    continue
                name = obj["metadata"]["name"]
                if kind == "DELETED":
                    self.claims.pop(name, None)
                    await self._on_claim(name, None)
                else:
                    self.claims[name] = slim(obj)
                    await self._on_claim(name, obj)
        return resource_version


_METADATA = ("name", "namespace", "uid", "resourceVersion", "labels")
_SPEC = ("volumeName", "storageClassName", "resources")
_STATUS = ("phase", "capacity")
_OURS = f"{naming.GROUP}/"


def slim(pvc: dict[str, Any]) -> dict[str, Any]:
    """The parts of a PVC the operator reads from the watch's copy (its labels, our
    annotations, the volume, the phase and sizes): a whole PVC, managedFields and all, is several
    KiB in Python, and 10,000 of them were a good part of the operator's memory."""
    metadata = pvc.get("metadata") or {}
    spec = pvc.get("spec") or {}
    status = pvc.get("status") or {}
    annotations = metadata.get("annotations") or {}
    return {
        "metadata": {
            **{key: metadata[key] for key in _METADATA if key in metadata},
            "annotations": {k: v for k, v in annotations.items() if k.startswith(_OURS)},
        },
        "spec": {key: spec[key] for key in _SPEC if key in spec},
        "status": {key: status[key] for key in _STATUS if key in status},
    }
