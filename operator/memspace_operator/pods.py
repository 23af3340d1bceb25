"""A list-and-watch of the shard pods in the server namespace: which pod of a shard is Ready,
with which revision of the template and which spaces' volumes (its own spec, copied from the
template that made it), and the last pod of each shard seen going (deleted or evicted).

`Mounted=True` follows this, not the StatefulSet's template: a template change mounts nothing
until the pod made from it runs and is Ready.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from memspace_contract import spaces
from memspace_operator import kube, naming, shards, watching
from memspace_operator.settings import Settings

log = logging.getLogger(__name__)

BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
REVISION = "controller-revision-hash"

OnPods = Callable[[int], Awaitable[None]]
"""Called with the shard number whenever one of its pods changes."""


@dataclasses.dataclass(frozen=True)
class ShardPod:
    name: str
    shard: int
    revision: str
    ready: bool
    terminating: bool
    mounts: frozenset[spaces.SpaceId]


def parse(body: dict[str, Any]) -> ShardPod | None:
    metadata = body.get("metadata") or {}
    labels = metadata.get("labels") or {}
    value = labels.get(naming.SHARD, "")
    if not value.isdigit():
        return None
    conditions = (body.get("status") or {}).get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    return ShardPod(
        name=str(metadata.get("name", "")),
        shard=int(value),
        revision=str(labels.get(REVISION, "")),
        ready=ready,
        terminating=bool(metadata.get("deletionTimestamp")),
        mounts=shards.spec_mounts(body.get("spec") or {}),
    )


class ShardPods(watching.ListWatch):
    name = "shard pods"

    def __init__(self, client: kube.Kube, settings: Settings, on_pods: OnPods) -> None:
        super().__init__()
        self._kube = client
        self._settings = settings
        self._on_pods = on_pods
        self.pods: dict[str, ShardPod] = {}
        """The shard pods by name, as last seen."""
        self.ended: dict[int, ShardPod] = {}
        """Per shard, the last pod seen going (being deleted, or gone), until taken."""

    def of(self, shard: int) -> list[ShardPod]:
        return [pod for pod in self.pods.values() if pod.shard == shard]

    def serving(self, shard: int) -> ShardPod | None:
        """The shard's Ready pod that is not being deleted, if any."""
        for pod in self.of(shard):
            if pod.ready and not pod.terminating:
                return pod
        return None

    def _selector(self) -> str:
        return kube.selector({**naming.managed(), naming.COMPONENT: "shard"})

    async def list(self) -> str:
        listed = await self._kube.list(kube.pods(self._settings.server_namespace), self._selector())
        seen: dict[str, ShardPod] = {}
        for item in listed.get("items") or []:
            pod = parse(item)
            if pod is not None:
                seen[pod.name] = pod
        touched = {p.shard for p in self.pods.values()} | {p.shard for p in seen.values()}
        self.pods = seen
        for shard in sorted(touched):
            await self._on_pods(shard)
        resource_version: str = listed["metadata"]["resourceVersion"]
        return resource_version

    async def _follow(self, resource_version: str) -> str:
        events = self._kube.watch(
            kube.pods(self._settings.server_namespace), resource_version, self._selector()
        )
        async with contextlib.aclosing(events):
            async for kind, obj in events:
                resource_version = obj.get("metadata", {}).get("resourceVersion", resource_version)
                if kind == "BOOKMARK":
                    continue
                pod = parse(obj)
                if pod is None:
                    continue
                if kind == "DELETED" or pod.terminating:
                    self.ended[pod.shard] = pod
                if kind == "DELETED":
                    self.pods.pop(pod.name, None)
                else:
                    self.pods[pod.name] = pod
                await self._on_pods(pod.shard)
        return resource_version
