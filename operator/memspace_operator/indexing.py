"""The spaces index of each shard: Secret `memspace-shard-N-spaces` in the server namespace,
one key `<spaceId>.json` per space in the format of memspace_contract.index. The shard mounts
it and reloads it on change, so tier, quota and state changes reach the server without a
restart. Entries are written with JSON merge patches of their keys only: concurrent writers of
different spaces never conflict, and entries written at the same time share one patch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
from typing import Any

from memspace_contract import index, spaces, wire
from memspace_operator import errors, kube, naming
from memspace_operator.settings import Settings


def manifest(settings: Settings, shard: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": naming.index_secret(shard),
            "namespace": settings.server_namespace,
            "labels": naming.shard_labels(shard, component="index"),
        },
        "type": "Opaque",
        "data": {},
    }


@dataclasses.dataclass
class _Batch:
    """Entries of one shard's index waiting to be written together (None removes one)."""

    data: dict[str, str | None]
    written: asyncio.Future[None]


class Index:
    def __init__(self, client: kube.Kube, settings: Settings) -> None:
        self._kube = client
        self._settings = settings
        self._present: set[int] = set()
        self._creating: dict[int, asyncio.Lock] = {}
        self._open: dict[int, _Batch] = {}
        """Per shard, the entries that the next patch writes."""
        self._writing: dict[int, asyncio.Lock] = {}

    def _url(self, shard: int) -> str:
        return kube.secrets(self._settings.server_namespace, naming.index_secret(shard))

    async def ensure_secret(self, shard: int) -> None:
        """Create shard N's index Secret unless it is known to exist. One create per shard:
        the intake shard's new spaces come together, and each of them creating it (all but one
        refused as AlreadyExists) was a request per space at 10,000 spaces."""
        if shard in self._present:
            return
        async with self._creating.setdefault(shard, asyncio.Lock()):
            if shard in self._present:
                return
            with contextlib.suppress(errors.AlreadyExistsError):
                await self._kube.create(
                    kube.secrets(self._settings.server_namespace), manifest(self._settings, shard)
                )
            self._present.add(shard)

    def forget(self, shard: int) -> None:
        """Shard N's index Secret was deleted with the shard (made again if the number is)."""
        self._present.discard(shard)

    async def get(self, shard: int, space_id: spaces.SpaceId) -> index.IndexEntry | None:
        """The space's entry in shard N's index, None when there is none (or it is unreadable:
        then it is rewritten)."""
        secret = await self._kube.get_or_none(self._url(shard))
        if secret is None:
            self._present.discard(shard)
            return None
        raw = (secret.get("data") or {}).get(index.entry_filename(space_id))
        if raw is None:
            return None
        try:
            return index.loads(base64.b64decode(raw))
        except (index.InvalidIndexEntryError, ValueError):
            return None

    async def offloaded(self, shard: int) -> list[spaces.SpaceId]:
        """The spaces whose entry in shard N's index says Offloaded (they have no claim, so the
        index is where an operator starting up learns that the shard still keeps them)."""
        secret = await self._kube.get_or_none(self._url(shard))
        found = []
        for raw in ((secret or {}).get("data") or {}).values():
            try:
                entry = index.loads(base64.b64decode(raw))
            except (index.InvalidIndexEntryError, ValueError):
                continue
            if entry.state == wire.OFFLOADED:
                found.append(entry.space_id)
        return found

    async def put(self, shard: int, entry: index.IndexEntry) -> None:
        await self.ensure_secret(shard)
        value = base64.b64encode(entry.dumps().encode()).decode()
        try:
            await self._write(shard, index.entry_filename(entry.space_id), value)
        except errors.NotFoundError:
            self._present.discard(shard)
            raise errors.TemporaryError(
                f"index Secret {naming.index_secret(shard)} vanished; recreating it", delay=0.5
            ) from None

    async def remove(self, shard: int, space_id: spaces.SpaceId) -> bool:
        """Remove the space's entry; False when the Secret or the entry was not there."""
        secret = await self._kube.get_or_none(self._url(shard))
        if secret is None or index.entry_filename(space_id) not in (secret.get("data") or {}):
            return False
        try:
            await self._write(shard, index.entry_filename(space_id), None)
        except errors.NotFoundError:
            return False
        return True

    async def _write(self, shard: int, key: str, value: str | None) -> None:
        """Write one key of shard N's index, in one patch with the keys of the other spaces
        written meanwhile: the intake shard's new spaces come together, and a patch each (all of
        one object, which the API server applies one after another) was a request per space.
        Returns once a patch holding the key succeeded; raises what that patch raised."""
        batch = self._open.get(shard)
        if batch is None:
            batch = _Batch({}, asyncio.get_running_loop().create_future())
            self._open[shard] = batch
        batch.data[key] = value
        async with self._writing.setdefault(shard, asyncio.Lock()):
            if self._open.get(shard) is batch:  # not written yet: this caller writes it
                del self._open[shard]
                try:
                    await self._kube.patch(self._url(shard), {"data": batch.data})
                except Exception as err:
                    batch.written.set_exception(err)
                except BaseException:
                    batch.written.set_exception(
                        errors.TemporaryError("the index write was interrupted", delay=0.5)
                    )
                    raise
                else:
                    batch.written.set_result(None)
        batch.written.result()
