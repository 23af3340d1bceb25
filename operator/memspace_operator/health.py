"""Health of the spaces, from their shards, and index entries handed to them directly.

Every `health_interval_s` one Health RPC per shard (admin token, no space named: every space of
the shard in one answer), through the contract's gRPC client, over TLS verified against the
shards' CA (for the name of the shard's Service) unless TLS is off. What it reports becomes each
space's Healthy condition and health figures; the status is written only when they changed
meaningfully (see statuses.Figures.differs).

`Poller.apply` hands one changed index entry to its shard (SpaceService.ApplyIndexEntry) right
after the operator wrote it to the shard's index Secret, whose projection a kubelet refreshes
only about once a minute: the shard answers with the generation it now applies, which the
space's Ready waits for (Health reports it too, after a shard restart for instance).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from memspace_contract import client, index, spaces, wire
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_operator import certificates, errors, statuses
from memspace_operator.settings import Settings

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 5.0
RETRY_AFTER_S = 1.0
"""A shard that did not answer a round's Health (UNAVAILABLE, DEADLINE_EXCEEDED) is asked once
more this long after, before its spaces are reported ShardUnreachable: one call lost to a busy
moment would otherwise turn every space of the shard unhealthy until the next round."""
RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
APPLY_TIMEOUT_S = 2.0
"""ApplyIndexEntry runs inside a reconcile: a shard that cannot answer soon (its pod is not up)
gets the change from its index Secret instead, and the reconcile goes on."""


@dataclasses.dataclass(frozen=True)
class ShardHealth:
    """One shard's answer: the spaces it reports, or why it could not be asked."""

    shard: int
    endpoint: str
    serving: bool = False
    spaces: Mapping[spaces.SpaceId, pb.SpaceHealth] = dataclasses.field(default_factory=dict)
    error: str | None = None
    asked_at: float = 0.0
    """When (time.monotonic) the shard was asked."""


_STATES: dict[str, tuple[statuses.ConditionStatus, str, str]] = {
    wire.ACTIVE: ("True", "Serving", "served by {shard}"),
    wire.INACTIVE: ("True", "Inactive", "unloaded by {shard} (Inactive)"),
    wire.UNMOUNTED: ("False", "VolumeNotMounted", "{shard} does not see the space's volume yet"),
    wire.RESTORING: ("False", "Restoring", "{shard} is filling the space's volume from a backup"),
    wire.OFFLOADED: ("True", "Offloaded", "unloaded by {shard} (Offloaded: it lives in a backup)"),
}
_FAILED: tuple[statuses.ConditionStatus, str, str] = (
    "False",
    "SpaceFailed",
    "{shard} reports the space {state}: see the shard's log (a volume of another space or "
    "another embeddingDim is refused, as is a corrupt WAL)",
)


def assess(
    result: ShardHealth, space_id: spaces.SpaceId
) -> tuple[statuses.Condition, statuses.Figures | None]:
    """The space's Healthy condition and figures from its shard's answer."""
    shard = f"memspace-shard-{result.shard} ({result.endpoint})"
    if result.error is not None:
        message = f"{shard} did not answer: {result.error}"
        return statuses.Condition("Healthy", "False", "ShardUnreachable", message), None
    found = result.spaces.get(space_id)
    if found is None:
        message = f"{shard} has not loaded the space's index entry yet"
        return statuses.Condition("Healthy", "False", "NotLoaded", message), None
    figures = statuses.Figures(
        memories=found.memories,
        pressure=found.pressure,
        wal_lag_ms=found.wal_lag_ms,
        consolidation_rate=found.consolidation_rate,
        tier_memories={k: int(v) for k, v in found.tier_memories.items()},
        unknown=frozenset(found.unknown),
        search_index=search_index(found.index) if found.HasField("index") else None,
    )
    if not result.serving:
        return statuses.Condition(
            "Healthy", "False", "ShardDraining", f"{shard} is draining"
        ), figures
    status, reason, template = _STATES.get(found.state, _FAILED)
    message = template.format(shard=shard, state=found.state)
    return statuses.Condition("Healthy", status, reason, message), figures


def search_index(found: pb.SearchIndexStatus) -> dict[str, Any]:
    """status.index from Health's SearchIndexStatus (the recall rounded to 0.01, so that its
    small moves do not rewrite the status)."""
    shown: dict[str, Any] = {
        "type": found.type,
        "configuredType": found.configured_type,
        "rowsIndexed": found.rows_indexed,
        "buildState": found.build_state,
    }
    if found.HasField("recall"):
        shown["recall"] = round(found.recall, 2)
    return shown


class AdminToken:
    """The admin token file, re-read when it changes (a mounted Secret is updated in place)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._token: str | None = None

    def read(self) -> str | None:
        if self.path is None:
            return None
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                self._token = self.path.read_text().strip() or None
                self._stamp = stamp
        except OSError as err:
            log.warning("cannot read the admin token file %s: %s", self.path, err)
        return self._token


class Poller:
    def __init__(
        self,
        settings: Settings,
        shards_in_use: Callable[[], list[int]],
        on_health: Callable[[ShardHealth], Awaitable[None]],
        trust: Callable[[], bytes | None] = lambda: None,
        client_pair: Callable[[], certificates.KeyPair | None] = lambda: None,
    ) -> None:
        self._settings = settings
        self._trust = trust
        self._client_pair = client_pair
        self._shards_in_use = shards_in_use
        self._on_health = on_health
        self._token = AdminToken(settings.admin_token_file)
        self._clients: dict[int, client.Client] = {}
        self._task: asyncio.Task[None] | None = None
        self.enabled = settings.admin_token_file is not None

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="memspace-health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for shard_client in self._clients.values():
            await shard_client.close()
        self._clients.clear()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.health_interval_s)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("health round failed; retrying next round")

    async def poll(self) -> None:
        """One round: ask every shard in use, concurrently."""
        shards = self._shards_in_use()
        results = await asyncio.gather(*(self._ask(shard) for shard in shards))
        for result in results:
            await self._on_health(result)

    def _credentials(self, shard: int, token: str, trust: bytes | None) -> client.Credentials:
        if not self._settings.tls_enabled:
            return client.Credentials(endpoint=self._settings.endpoint(shard), token=token)
        pair = self._client_pair()
        return client.Credentials(
            endpoint=self._settings.endpoint(shard),
            token=token,
            ca=trust,
            cert=None if pair is None else pair.cert,
            key=None if pair is None else pair.key,
            server_name=self._settings.shard_server_name(shard),
        )

    async def _client(self, credentials: client.Credentials, shard: int) -> client.Client:
        found = self._clients.get(shard)
        if found is not None and found.credentials == credentials:
            return found
        if found is not None:
            await found.close()
        fresh = client.connect(credentials)
        self._clients[shard] = fresh
        return fresh

    async def _ask(self, shard: int) -> ShardHealth:
        endpoint = self._settings.endpoint(shard)
        token = self._token.read()
        if token is None:
            return ShardHealth(shard, endpoint, error="no admin token to ask with")
        trust = self._trust()
        if self._settings.tls_enabled and trust is None:
            return ShardHealth(shard, endpoint, error="no CA to verify the shard with yet")
        shard_client = await self._client(self._credentials(shard, token, trust), shard)
        for attempt in (1, 2):
            asked_at = time.monotonic()
            try:
                answer = await shard_client.spaces.Health(pb.HealthRequest(), timeout=RPC_TIMEOUT_S)
                break
            except grpc.aio.AioRpcError as err:
                log.debug("shard %d at %s: %s %s", shard, endpoint, err.code().name, err.details())
                if attempt == 2 or err.code() not in RETRIED:
                    # The code alone: details vary from call to call and would rewrite every
                    # status.
                    return ShardHealth(shard, endpoint, error=err.code().name)
            await asyncio.sleep(RETRY_AFTER_S)
        return ShardHealth(
            shard,
            endpoint,
            serving=answer.status == wire.SERVING,
            spaces={spaces.SpaceId(s.space): s for s in answer.spaces},
            asked_at=asked_at,
        )

    async def admin(self, shard: int) -> client.Client:
        """A client of shard N with the admin token, for the admin calls of backups (the
        channel Health and ApplyIndexEntry use). TemporaryError while there is no token or
        no CA to verify the shard with yet."""
        token = self._token.read()
        if token is None:
            raise errors.TemporaryError(
                "the operator has no admin token (MEMSPACE_ADMIN_TOKEN_FILE) to call the shards",
                reason="NoAdminToken",
                delay=30.0,
            )
        trust = self._trust()
        if self._settings.tls_enabled and trust is None:
            raise errors.TemporaryError(
                "no CA to verify the shards with yet", reason="NoShardTrust", delay=5.0
            )
        return await self._client(self._credentials(shard, token, trust), shard)

    async def apply(
        self, shard: int, space_id: spaces.SpaceId, entry: index.IndexEntry | None, generation: int
    ) -> int | None:
        """Hand shard N the space's entry (None: its removal at `generation`). Returns the
        generation the shard confirmed it applies, or None when it could not be told (it is
        not up yet, say): then its projected index brings the change later, and Health
        confirms it."""
        endpoint = self._settings.endpoint(shard)
        token = self._token.read()
        trust = self._trust()
        if token is None or (self._settings.tls_enabled and trust is None):
            return None
        shard_client = await self._client(self._credentials(shard, token, trust), shard)
        request = pb.ApplyIndexEntryRequest(
            space=space_id,
            entry="" if entry is None else entry.dumps(),
            removed_generation=generation if entry is None else 0,
        )
        try:
            answer = await shard_client.spaces.ApplyIndexEntry(request, timeout=APPLY_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            log.info(
                "shard %d at %s did not take the index entry of %s (%s %s); its projected "
                "index brings it later",
                shard,
                endpoint,
                space_id,
                err.code().name,
                err.details(),
            )
            return None
        return int(answer.generation)
