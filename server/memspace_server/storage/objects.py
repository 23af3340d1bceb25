"""Backup targets: S3-compatible object storage (`s3://bucket/prefix`) or a local directory, through
obstore (the Rust `object_store` crate), with the few calls backups need: put, get, list, delete.

S3 targets use path-style addressing (`endpoint/bucket/key`), which MinIO and most S3-compatible
stores serve; credentials come from the target's configuration, else the usual AWS variables.
Every failure of the store becomes an `errors.ObjectStoreError` naming the target and the key
(never the credentials); a key that is not there is `MissingObjectError`. Nothing here knows what
a backup is (`backups` does).
"""

from __future__ import annotations

import dataclasses
import datetime
import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import obstore
import obstore.store

from memspace_server import errors

if TYPE_CHECKING:
    from obstore import ObjectMeta

ENDPOINT_VARIABLES = ("MEMSPACE_BACKUP_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
"""Variables naming an S3 endpoint, first found wins (MinIO or another S3-compatible store)."""


class MissingObjectError(errors.ObjectStoreError):
    """The key is not in the store."""


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """Where backups go and how to reach it."""

    url: str
    """`s3://bucket[/prefix]`, `file:///directory`, or a plain directory path."""
    endpoint: str | None = None
    """The S3 endpoint (`http://host:port` for MinIO); None: AWS's endpoint for the region.
    An `http://` endpoint is allowed as given (a store on the same network or loopback)."""
    region: str = "us-east-1"
    """The S3 region; MinIO accepts any, `us-east-1` by default."""
    access_key_id: str | None = None
    """S3 credentials; None: none configured (obstore then reads the AWS_* variables)."""
    secret_access_key: str | None = dataclasses.field(default=None, repr=False)
    retry_timeout_s: float = 30.0
    """How long one call retries a failing store before the backup fails (seconds): long enough
    to ride out a store's restart, short enough that a store that went away fails the backup
    cleanly rather than hanging it."""
    connect_timeout_s: float = 5.0
    """How long to wait for a connection (seconds)."""

    @classmethod
    def from_environment(
        cls, url: str, environ: Mapping[str, str], **overrides: Any
    ) -> TargetConfig:
        """A target for `url` with its endpoint, region and credentials from `environ` (the AWS
        variables and MEMSPACE_BACKUP_ENDPOINT); `overrides` win."""
        endpoint = next((environ[v] for v in ENDPOINT_VARIABLES if environ.get(v)), None)
        values: dict[str, Any] = {
            "endpoint": endpoint,
            "region": environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            "access_key_id": environ.get("AWS_ACCESS_KEY_ID"),
            "secret_access_key": environ.get("AWS_SECRET_ACCESS_KEY"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(url=url, **values)


def _store(config: TargetConfig) -> tuple[Any, str]:
    """The obstore store of a target and a description of it for messages."""
    parsed = urllib.parse.urlparse(config.url)
    retry = {
        "max_retries": 10,
        "retry_timeout": datetime.timedelta(seconds=config.retry_timeout_s),
        "backoff": {
            "init_backoff": datetime.timedelta(milliseconds=100),
            "max_backoff": datetime.timedelta(seconds=2),
            "base": 2,
        },
    }
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise errors.InvalidArgumentError(
                f"backup target {config.url!r} names no bucket; use s3://BUCKET[/PREFIX]"
            )
        options: dict[str, Any] = {
            "connect_timeout": datetime.timedelta(seconds=config.connect_timeout_s),
        }
        credentials: dict[str, Any] = {}
        if config.endpoint:
            credentials["endpoint"] = config.endpoint.rstrip("/")
            options["allow_http"] = config.endpoint.startswith("http://")
        if config.access_key_id and config.secret_access_key:
            credentials["access_key_id"] = config.access_key_id
            credentials["secret_access_key"] = config.secret_access_key
        store = obstore.store.S3Store(
            parsed.netloc,
            prefix=parsed.path.strip("/") or None,
            region=config.region,
            virtual_hosted_style_request=False,
            client_options=options,  # type: ignore[arg-type]
            retry_config=retry,  # type: ignore[arg-type]
            **credentials,
        )
        where = f"s3://{parsed.netloc}/{parsed.path.strip('/')}"
        if config.endpoint:
            where += f" at {config.endpoint}"
        return store, where
    if parsed.scheme in ("", "file"):
        directory = Path(urllib.parse.unquote(parsed.path) if parsed.scheme else config.url)
        directory = directory.expanduser().absolute()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise errors.ObjectStoreError(
                f"backup directory {directory} cannot be created: {err.strerror}"
            ) from err
        return obstore.store.LocalStore(prefix=directory), str(directory)
    raise errors.InvalidArgumentError(
        f"backup target {config.url!r}: use s3://BUCKET[/PREFIX], file:///DIRECTORY or a directory"
    )


class Target:
    """One backup target. Keys are relative to its prefix, with `/` between parts."""

    def __init__(self, config: TargetConfig) -> None:
        self.config = config
        self._store, self.where = _store(config)

    def _failed(self, action: str, key: str, err: Exception) -> errors.ObjectStoreError:
        if isinstance(err, FileNotFoundError):
            return MissingObjectError(f"{key} is not in the backup target {self.where}")
        # obstore's messages carry the request and the store's answer, never the secret key.
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return errors.ObjectStoreError(
            f"the backup target {self.where} failed to {action} {key}: {detail}"
        )

    async def put(self, key: str, data: bytes | memoryview | Path) -> None:
        """Store `data` (bytes, or a file read by obstore, in parts if large) at `key`, whole:
        a reader sees the old object, or the new one, never part of it."""
        try:
            await obstore.put_async(self._store, key, data)
        except Exception as err:
            raise self._failed("store", key, err) from err

    async def get(self, key: str) -> bytes:
        try:
            result = await obstore.get_async(self._store, key)
            return bytes(await result.bytes_async())
        except Exception as err:
            raise self._failed("read", key, err) from err

    async def stream(self, key: str) -> AsyncIterator[memoryview]:
        """The object at `key` in pieces, as they arrive."""
        try:
            result = await obstore.get_async(self._store, key)
            async for piece in result.stream(min_chunk_size=4 * 1024 * 1024):
                yield memoryview(piece)
        except Exception as err:
            raise self._failed("read", key, err) from err

    async def keys(self, prefix: str) -> dict[str, int]:
        """Every key under `prefix` (a whole path segment) with its size in bytes."""
        found: dict[str, int] = {}
        try:
            stream = obstore.list(self._store, prefix, chunk_size=1000)
            batch: Sequence[ObjectMeta]
            async for batch in stream:
                for meta in batch:
                    found[meta["path"]] = int(meta["size"])
        except Exception as err:
            raise self._failed("list", prefix, err) from err
        return found

    async def children(self, prefix: str) -> list[str]:
        """The names of the "directories" right under `prefix`."""
        try:
            result = await obstore.list_with_delimiter_async(self._store, prefix)
        except Exception as err:
            raise self._failed("list", prefix, err) from err
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in result["common_prefixes"])

    async def delete(self, keys: Sequence[str]) -> None:
        """Delete `keys`; a key already gone is not an error."""
        for start in range(0, len(keys), 1000):
            part = list(keys[start : start + 1000])
            try:
                await obstore.delete_async(self._store, part)
            except FileNotFoundError:
                continue
            except Exception as err:
                raise self._failed("delete", part[0], err) from err
