"""MemorySpaceBackupTargets: where backups go, set up by the platform admin (cluster-scoped).

A target names an S3-compatible bucket and prefix and a credentials Secret (keys `accessKeyId`
and `secretAccessKey`) in a namespace the operator may read Secrets in: the server namespace
unless it says another. The operator reads the Secret for each backup call and hands the
credentials to the shard in the call, so no shard restarts for a new or rotated target and
tenants never see the credentials. Which target applies: the one named, else the operator's
MEMSPACE_BACKUP_DEFAULT_TARGET, else the target annotated `memspace.dev/is-default-target`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Mapping
from typing import Any

from memspace_operator import errors, kube, naming
from memspace_operator.settings import Settings

ACCESS_KEY = "accessKeyId"
SECRET_KEY = "secretAccessKey"  # noqa: S105  # a key's name, not a secret


class TargetError(errors.TemporaryError):
    """The target (or its credentials) cannot be used now; the admin may fix it, so retried."""

    reason = "TargetUnavailable"


@dataclasses.dataclass(frozen=True)
class Target:
    """A resolved target: its S3 URL and the credentials to reach it."""

    name: str
    url: str
    """`s3://bucket/prefix`, as the server's object-store layer takes it."""
    endpoint: str
    region: str
    access_key_id: str
    secret_access_key: str = dataclasses.field(repr=False)
    allowed_restore_namespaces: tuple[str, ...] = ()

    def allows_restore(self, backup_namespace: str, space_namespace: str) -> bool:
        """Whether a space in `space_namespace` may restore a backup of `backup_namespace`."""
        if backup_namespace == space_namespace:
            return True
        allowed = self.allowed_restore_namespaces
        return "*" in allowed or space_namespace in allowed


def url_of(spec: Mapping[str, Any]) -> str:
    prefix = str(spec.get("prefix") or "").strip("/")
    bucket = str(spec.get("bucket") or "")
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


async def choose(client: kube.Kube, settings: Settings, name: str | None) -> str:
    """The name of the target in effect for `name` (None: the default one)."""
    if name:
        return name
    if settings.backup_default_target:
        return settings.backup_default_target
    listed = await client.list(kube.backuptargets())
    defaults = sorted(
        item["metadata"]["name"]
        for item in listed.get("items") or []
        if (item["metadata"].get("annotations") or {}).get(naming.DEFAULT_TARGET) == "true"
    )
    if not defaults:
        raise TargetError(
            "no MemorySpaceBackupTarget is named and none is the default (annotate one "
            f'{naming.DEFAULT_TARGET}: "true", or set the chart\'s backup.defaultTarget)',
            reason="NoBackupTarget",
            delay=30.0,
        )
    if len(defaults) > 1:
        raise TargetError(
            f"more than one MemorySpaceBackupTarget is annotated {naming.DEFAULT_TARGET}: "
            f"{', '.join(defaults)}; keep one, or name the target",
            reason="NoBackupTarget",
            delay=30.0,
        )
    return str(defaults[0])


async def resolve(client: kube.Kube, settings: Settings, name: str | None) -> Target:
    """The target `name` (None: the default) with its credentials read from its Secret."""
    chosen = await choose(client, settings, name)
    found = await client.get_or_none(kube.backuptargets(chosen))
    if found is None:
        raise TargetError(
            f"MemorySpaceBackupTarget {chosen!r} does not exist (kubectl get "
            "memoryspacebackuptargets lists them)",
            reason="TargetNotFound",
            delay=30.0,
        )
    spec = found.get("spec") or {}
    ref = spec.get("credentialsSecret") or {}
    secret_namespace = str(ref.get("namespace") or settings.server_namespace)
    secret_name = str(ref.get("name") or "")
    access, secret = "", ""
    if secret_name:
        try:
            body = await client.get_or_none(kube.secrets(secret_namespace, secret_name))
        except errors.ForbiddenError as err:
            raise TargetError(
                f"the operator may not read Secret {secret_namespace}/{secret_name} of "
                f"MemorySpaceBackupTarget {chosen!r}: keep it in the server namespace or list "
                "its namespace in the chart's backup.credentialsNamespaces",
                reason="TargetCredentialsForbidden",
                delay=60.0,
            ) from err
        if body is None:
            raise TargetError(
                f"Secret {secret_namespace}/{secret_name} of MemorySpaceBackupTarget "
                f"{chosen!r} does not exist",
                reason="TargetCredentialsMissing",
                delay=30.0,
            )
        data = body.get("data") or {}
        access, secret = _decoded(data, ACCESS_KEY), _decoded(data, SECRET_KEY)
        if not access or not secret:
            raise TargetError(
                f"Secret {secret_namespace}/{secret_name} of MemorySpaceBackupTarget "
                f"{chosen!r} needs keys {ACCESS_KEY} and {SECRET_KEY}",
                reason="TargetCredentialsMissing",
                delay=30.0,
            )
    return Target(
        name=chosen,
        url=url_of(spec),
        endpoint=str(spec.get("endpoint") or ""),
        region=str(spec.get("region") or "us-east-1"),
        access_key_id=access,
        secret_access_key=secret,
        allowed_restore_namespaces=tuple(
            str(n) for n in spec.get("allowedRestoreNamespaces") or ()
        ),
    )


def _decoded(data: Mapping[str, Any], key: str) -> str:
    raw = data.get(key)
    if not raw:
        return ""
    try:
        return base64.b64decode(raw).decode().strip()
    except (binascii.Error, UnicodeDecodeError):
        return ""
