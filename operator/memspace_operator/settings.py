"""The operator's settings: one typed object, loaded once from the environment in `main` (or in
the startup handler when kopf runs the handlers module itself) and passed down.

The environment variables are a contract with the Helm chart (design section 3): each field
names its variable; a value that cannot be used stops the operator at start-up with a message
naming the variable.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULT_ENDPOINT_TEMPLATE = "memspace-shard-{shard}.{namespace}.svc:50051"
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


class SettingsError(ValueError):
    """An environment value that cannot be used; the message names the variable."""


def _env(name: str, help: str) -> dict[str, str]:
    return {"env": name, "help": help}


@dataclasses.dataclass(frozen=True)
class Settings:
    server_namespace: str = dataclasses.field(
        default="memspace-system",
        metadata=_env(
            "MEMSPACE_SERVER_NAMESPACE",
            "namespace of the server shards, their index Secrets and every space's PVC",
        ),
    )
    server_image: str = dataclasses.field(
        default="ghcr.io/memspace/memspace:0.1.0",
        metadata=_env("MEMSPACE_SERVER_IMAGE", "image of the shard pods (`memspace serve`)"),
    )
    storage_class: str | None = dataclasses.field(
        default=None,
        metadata=_env(
            "MEMSPACE_STORAGE_CLASS",
            "StorageClass of spaces that name none; unset: the cluster's default class",
        ),
    )
    max_spaces_per_shard: int = dataclasses.field(
        default=20,
        metadata=_env(
            "MEMSPACE_MAX_SPACES_PER_SHARD",
            "spaces (volumes) per shard; nodes attach a limited number of block volumes",
        ),
    )
    max_shards: int = dataclasses.field(
        default=50,
        metadata=_env(
            "MEMSPACE_MAX_SHARDS",
            "most shards the operator creates; past that new spaces get Ready=False ShardsFull",
        ),
    )
    mount_batch_window_s: float = dataclasses.field(
        default=10.0,
        metadata=_env(
            "MEMSPACE_MOUNT_BATCH_WINDOW",
            "seconds: at most one pod-template change (one restart) per shard in this window; "
            "mount changes that arrive meanwhile are applied together",
        ),
    )
    health_interval_s: float = dataclasses.field(
        default=30.0,
        metadata=_env(
            "MEMSPACE_HEALTH_INTERVAL",
            "seconds between Health RPCs to each shard (one call covers all its spaces)",
        ),
    )
    resync_interval_s: float = dataclasses.field(
        default=300.0,
        metadata=_env(
            "MEMSPACE_RESYNC_INTERVAL",
            "seconds between level-based re-checks of every space's children (drift repair, "
            "retries of SpaceIdConflict and ShardsFull); reads only when nothing drifted",
        ),
    )
    admin_token_file: Path | None = dataclasses.field(
        default=None,
        metadata=_env(
            "MEMSPACE_ADMIN_TOKEN_FILE",
            "file holding the shards' admin token, for Health RPCs; unset: no health polling "
            "(Healthy stays Unknown)",
        ),
    )
    admin_token_secret: str = dataclasses.field(
        default="memspace-admin-token",
        metadata=_env(
            "MEMSPACE_ADMIN_TOKEN_SECRET",
            "Secret (key `token`) in the server namespace that the shard pods mount as their "
            "admin token; the chart creates it",
        ),
    )
    shard_endpoint_template: str = dataclasses.field(
        default=DEFAULT_ENDPOINT_TEMPLATE,
        metadata=_env(
            "MEMSPACE_SHARD_ENDPOINT_TEMPLATE",
            "host:port of shard N, with {shard} and {namespace} (Python format fields); an "
            "operator run outside the cluster points it at loopback ports",
        ),
    )
    server_resources: Mapping[str, Any] = dataclasses.field(
        default_factory=dict,
        metadata=_env(
            "MEMSPACE_SERVER_RESOURCES",
            "JSON of the shard container's `resources` (requests and limits)",
        ),
    )
    service_account: str | None = dataclasses.field(
        default=None,
        metadata=_env(
            "MEMSPACE_SERVER_SERVICE_ACCOUNT",
            "ServiceAccount of the shard pods; unset: the namespace's default (the shards never "
            "talk to the Kubernetes API, so no token is mounted either way)",
        ),
    )
    api_concurrency: int = dataclasses.field(
        default=32,
        metadata=_env(
            "MEMSPACE_API_CONCURRENCY",
            "most Kubernetes API requests in flight at once (keeps 1,000 spaces applied at "
            "once from flooding the API server)",
        ),
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Settings from MEMSPACE_* variables over the defaults; SettingsError names a bad one."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            name = field.metadata["env"]
            raw = environ.get(name, "").strip()
            if raw:
                values[field.name] = _convert(field.name, name, raw)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not _DNS_LABEL.fullmatch(self.server_namespace) or len(self.server_namespace) > 63:
            raise SettingsError(
                f"MEMSPACE_SERVER_NAMESPACE is {self.server_namespace!r}: not a namespace name"
            )
        for name, value in (
            ("MEMSPACE_MAX_SPACES_PER_SHARD", self.max_spaces_per_shard),
            ("MEMSPACE_MAX_SHARDS", self.max_shards),
            ("MEMSPACE_API_CONCURRENCY", self.api_concurrency),
        ):
            if value < 1:
                raise SettingsError(f"{name} is {value}; it must be at least 1")
        for name, seconds in (
            ("MEMSPACE_MOUNT_BATCH_WINDOW", self.mount_batch_window_s),
            ("MEMSPACE_HEALTH_INTERVAL", self.health_interval_s),
            ("MEMSPACE_RESYNC_INTERVAL", self.resync_interval_s),
        ):
            if seconds <= 0:
                raise SettingsError(f"{name} is {seconds}; it must be above 0 (seconds)")
        try:
            self.shard_endpoint_template.format(shard=0, namespace=self.server_namespace)
        except (KeyError, IndexError, ValueError) as err:
            raise SettingsError(
                f"MEMSPACE_SHARD_ENDPOINT_TEMPLATE is {self.shard_endpoint_template!r}: {err!r}; "
                "only {shard} and {namespace} may be used"
            ) from err

    def endpoint(self, shard: int) -> str:
        """host:port of shard N: what clients and the health poller dial."""
        return self.shard_endpoint_template.format(shard=shard, namespace=self.server_namespace)


def _convert(field: str, name: str, raw: str) -> Any:
    kinds: dict[str, type] = {
        "max_spaces_per_shard": int,
        "max_shards": int,
        "api_concurrency": int,
        "mount_batch_window_s": float,
        "health_interval_s": float,
        "resync_interval_s": float,
    }
    if field == "admin_token_file":
        return Path(raw)
    if field == "server_resources":
        try:
            value = json.loads(raw)
        except ValueError as err:
            raise SettingsError(f"{name} is not valid JSON: {err}") from err
        if not isinstance(value, dict):
            raise SettingsError(f"{name} must be a JSON object such as {{'requests': {{}}}}")
        return value
    kind = kinds.get(field)
    if kind is None:
        return raw
    try:
        return kind(raw)
    except ValueError as err:
        raise SettingsError(f"{name} is {raw!r}: not a {kind.__name__}") from err
