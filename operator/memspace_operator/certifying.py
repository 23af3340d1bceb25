"""The shards' TLS material, kept current.

Two sources (MEMSPACE_TLS_SECRET decides):
- cert-manager: one Secret in the server namespace (tls.crt, tls.key, ca.crt) that every shard
  mounts; the operator only reads its `ca.crt`, the trust it hands to tenants and checks the
  shards against.
- the operator's own CA: Secret `memspace-ca` in the server namespace holds a current and a next
  CA, the next valid for a whole CA lifetime past the current one's end. The trust bundle is
  both, so a tenant's `ca.crt` (written once, when its credentials are
  made: the operator never reads or rewrites a tenant's Secret) still verifies the shards after
  the next CA takes over, which happens when a third of the current one's lifetime is left.
  Shard N's certificate, Secret `memspace-shard-N-tls`, is signed by the current CA for the
  shard Service's DNS names; it is re-issued when a third of its lifetime is left, when
  another CA signed it, or when its names or trust bundle are out of date. The shard re-reads
  the mounted files at its next handshake: no restart.

Every write is a create (AlreadyExists: someone else made it; read it again) or a patch
conditioned on the resourceVersion read, so two operators never keep different CAs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import logging
import secrets
from typing import Any

from memspace_operator import certificates, errors, kube, naming
from memspace_operator.settings import Settings

log = logging.getLogger(__name__)

RENEW_AT = 1 / 3
"""Renew a certificate when this share of its lifetime is left."""
DAY = datetime.timedelta(days=1)


@dataclasses.dataclass(frozen=True)
class Authority:
    """The operator's CA: the one that signs now and the one that takes over next."""

    current: certificates.KeyPair
    next: certificates.KeyPair

    @property
    def trust(self) -> bytes:
        return certificates.bundle(self.current.cert, self.next.cert)


def _decode(secret: dict[str, Any], key: str) -> bytes:
    raw = (secret.get("data") or {}).get(key)
    return base64.b64decode(raw) if raw else b""


def _encode(values: dict[str, bytes]) -> dict[str, str]:
    return {key: base64.b64encode(value).decode() for key, value in values.items()}


class Certifier:
    """Makes and renews the CA and the shard certificates; `trust` is what clients verify the
    shards against (None when TLS is off, or before cert-manager has issued)."""

    def __init__(self, client: kube.Kube, settings: Settings) -> None:
        self._kube = client
        self._settings = settings
        self._authority: Authority | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.trust: bytes | None = None
        self.shards: set[int] = set()
        """Shards whose certificate is kept current (those that have been ensured)."""
        self._operator_pair: certificates.KeyPair | None = None
        self._checked: set[int] = set()
        self._issuing: dict[int, asyncio.Lock] = {}
        """Per shard: one reconcile checks (and issues) its certificate at a time, the others
        wait for it (the spaces of a new shard would all race to issue one)."""
        """Shards checked since the last renewal round: a reconcile does not read again."""

    @property
    def enabled(self) -> bool:
        return self._settings.tls_enabled

    @property
    def external(self) -> bool:
        """cert-manager issues (the operator only reads the CA)."""
        return self._settings.tls_secret is not None

    def secret_name(self, shard: int) -> str:
        """The Secret shard N's pod mounts at TLS_PATH."""
        return self._settings.tls_secret or naming.tls_secret(shard)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.enabled:
            return
        try:
            await self.refresh()
        except errors.TemporaryError as err:
            log.warning("TLS: %s", err.message)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="memspace-tls")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.tls_check_interval_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except errors.OperatorError as err:
                log.warning("TLS renewal round failed (%s); retrying next round", err)
            except Exception:
                log.exception("TLS renewal round failed; retrying next round")

    async def refresh(self) -> None:
        """One round: the CA (or cert-manager's Secret), then every known shard's certificate."""
        if self.external:
            await self._read_external()
            return
        await self._ensure_authority()
        self._checked.clear()
        for shard in sorted(self.shards):
            await self.ensure_shard(shard)

    async def require_trust(self) -> bytes | None:
        """The trust bundle for a tenant's Secret; None when TLS is off. TemporaryError while
        cert-manager has not issued yet."""
        if not self.enabled:
            return None
        if self.trust is None:
            await self.refresh()
        if self.trust is None:
            raise errors.TemporaryError(
                f"waiting for cert-manager to issue Secret {self._settings.tls_secret} (with "
                "ca.crt) in the server namespace",
                reason="CertificatePending",
                delay=5.0,
            )
        return self.trust

    # -- cert-manager ------------------------------------------------------------------------------

    async def _read_external(self) -> None:
        name = self._settings.tls_secret
        assert name is not None
        secret = await self._kube.get_or_none(kube.secrets(self._settings.server_namespace, name))
        ca = _decode(secret, "ca.crt") if secret is not None else b""
        if not ca:
            if secret is not None:
                log.warning("TLS Secret %s has no ca.crt: its issuer must provide one", name)
            return
        if ca != self.trust:
            log.info("TLS: trusting the CA of Secret %s", name)
        self.trust = ca

    # -- the operator's own CA ---------------------------------------------------------------------

    def _ca_url(self, name: str | None = None) -> str:
        return kube.secrets(self._settings.server_namespace, name)

    def _new_ca(self, outlives: certificates.KeyPair | None = None) -> certificates.KeyPair:
        """A CA valid for the CA lifetime; one made to succeed `outlives` is valid that long
        past its end, so that it still has most of its life ahead when it takes over."""
        lifetime = self._settings.tls_ca_days * DAY
        if outlives is not None:
            ahead = outlives.certificate.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
            lifetime += max(ahead, datetime.timedelta(0))
        # A random part keeps the names of two CAs made in the same second apart.
        name = f"memspace CA {self._settings.server_namespace} {secrets.token_hex(4)}"
        return certificates.new_ca(name, lifetime)

    def _ca_manifest(self, authority: Authority) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": self._settings.tls_ca_secret,
                "namespace": self._settings.server_namespace,
                "labels": {**naming.managed(), naming.NAME: "memspace", naming.COMPONENT: "ca"},
            },
            "type": "Opaque",
            "data": _encode(
                {
                    "ca.crt": authority.current.cert,
                    "ca.key": authority.current.key,
                    "next.crt": authority.next.cert,
                    "next.key": authority.next.key,
                    "trust.crt": authority.trust,
                }
            ),
        }

    async def _ensure_authority(self) -> Authority:
        async with self._lock:
            url = self._ca_url(self._settings.tls_ca_secret)
            secret = await self._kube.get_or_none(url)
            if secret is None:
                current = self._new_ca()
                made = Authority(current, self._new_ca(outlives=current))
                try:
                    await self._kube.create(self._ca_url(), self._ca_manifest(made))
                except errors.AlreadyExistsError:
                    secret = await self._kube.get(url)
                else:
                    log.info("TLS: created the CA in Secret %s", self._settings.tls_ca_secret)
                    return self._keep(made)
            found = self._parse(secret)
            if found is None:
                raise errors.TemporaryError(
                    f"Secret {self._settings.tls_ca_secret} does not hold a usable CA (ca.crt, "
                    "ca.key, next.crt, next.key); delete it and the operator makes a new one",
                    delay=60.0,
                )
            if certificates.remaining(found.current.cert) > RENEW_AT:
                return self._keep(found)
            # The next CA takes over; a new next one is made. Shards get certificates of the
            # new current CA at their next check; clients trust both meanwhile.
            successor = found.next
            if certificates.remaining(successor.cert) <= RENEW_AT:
                successor = self._new_ca()  # the operator was away for most of a lifetime
            rotated = Authority(successor, self._new_ca(outlives=successor))
            body = self._ca_manifest(rotated)
            body["metadata"]["resourceVersion"] = secret["metadata"]["resourceVersion"]
            try:
                await self._kube.patch(url, {"metadata": body["metadata"], "data": body["data"]})
            except errors.ConflictError as err:
                raise errors.TemporaryError(
                    "the CA Secret changed while it was being rotated; reading it again", delay=1.0
                ) from err
            log.info("TLS: the next CA took over in Secret %s", self._settings.tls_ca_secret)
            return self._keep(rotated)

    def _keep(self, authority: Authority) -> Authority:
        self._authority = authority
        self.trust = authority.trust
        return authority

    @staticmethod
    def _parse(secret: dict[str, Any]) -> Authority | None:
        pairs = []
        for prefix in ("ca", "next"):
            pair = certificates.KeyPair(
                _decode(secret, f"{prefix}.crt"), _decode(secret, f"{prefix}.key")
            )
            try:
                if not certificates.matches(pair):
                    return None
            except ValueError:
                return None
            pairs.append(pair)
        return Authority(pairs[0], pairs[1])

    async def ensure_shard(self, shard: int) -> None:
        """Shard N's certificate exists, is signed by the current CA, names the shard's Service
        and has time left. Nothing to do under cert-manager (its Secret serves every shard)."""
        if not self.enabled:
            return
        if self.external:
            await self.require_trust()
            return
        self.shards.add(shard)
        if shard in self._checked:
            return
        async with self._issuing.setdefault(shard, asyncio.Lock()):
            if shard not in self._checked:
                await self._ensure_shard(shard)

    async def _ensure_shard(self, shard: int) -> None:
        authority = self._authority or await self._ensure_authority()
        names = naming.shard_dns_names(
            shard, self._settings.server_namespace, self._settings.cluster_domain
        )
        url = self._ca_url(naming.tls_secret(shard))
        secret = await self._kube.get_or_none(url)
        if secret is not None and self._current(secret, authority, names):
            self._checked.add(shard)
            return
        issued = certificates.issue(
            authority.current,
            naming.shard_name(shard),
            names,
            self._settings.tls_cert_days * DAY,
        )
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": naming.tls_secret(shard),
                "namespace": self._settings.server_namespace,
                "labels": naming.shard_labels(shard, component="tls"),
            },
            "type": "kubernetes.io/tls",
            "data": _encode(
                {"tls.crt": issued.cert, "tls.key": issued.key, "ca.crt": authority.trust}
            ),
        }
        if secret is None:
            try:
                await self._kube.create(self._ca_url(), body)
            except errors.AlreadyExistsError as err:
                raise errors.TemporaryError(
                    f"Secret {naming.tls_secret(shard)} appeared meanwhile; checking it again",
                    delay=0.5,
                ) from err
            log.info("TLS: issued the certificate of %s", naming.shard_name(shard))
            self._checked.add(shard)
            return
        body["metadata"]["resourceVersion"] = secret["metadata"]["resourceVersion"]
        try:
            await self._kube.patch(url, {"metadata": body["metadata"], "data": body["data"]})
        except errors.ConflictError as err:
            raise errors.TemporaryError(
                f"Secret {naming.tls_secret(shard)} changed meanwhile; checking it again",
                delay=0.5,
            ) from err
        log.info("TLS: renewed the certificate of %s", naming.shard_name(shard))
        self._checked.add(shard)

    # -- client certificates (mutual TLS) ----------------------------------------------------------

    async def tenant_certificate(self, space_id: str) -> certificates.KeyPair | None:
        """A client certificate for a space's credentials Secret, or None without mutual TLS.
        Signed by the next CA and valid until its end: the Secret is written once, and the
        next CA stays trusted through the following rotation, as does the Secret's ca.crt."""
        if not (self.enabled and self._settings.tls_client_auth):
            return None
        authority = self._authority or await self._ensure_authority()
        lifetime = authority.next.certificate.not_valid_after_utc - datetime.datetime.now(
            datetime.UTC
        )
        return certificates.issue(authority.next, f"space {space_id}", [], lifetime)

    def operator_certificate(self) -> certificates.KeyPair | None:
        """The health checks' own client certificate (mutual TLS), renewed with a third of its
        lifetime left or when another CA signs; None without mutual TLS or before the CA."""
        authority = self._authority
        if not (self.enabled and self._settings.tls_client_auth) or authority is None:
            return None
        held = self._operator_pair
        if (
            held is None
            or not certificates.signed_by(held.cert, authority.current.cert)
            or certificates.remaining(held.cert) <= RENEW_AT
        ):
            held = self._operator_pair = certificates.issue(
                authority.current, "memspace-operator", [], self._settings.tls_cert_days * DAY
            )
        return held

    @staticmethod
    def _current(secret: dict[str, Any], authority: Authority, names: list[str]) -> bool:
        pair = certificates.KeyPair(_decode(secret, "tls.crt"), _decode(secret, "tls.key"))
        try:
            return (
                certificates.matches(pair)
                and _decode(secret, "ca.crt") == authority.trust
                and certificates.signed_by(pair.cert, authority.current.cert)
                and sorted(certificates.dns_names(pair.cert)) == sorted(names)
                and certificates.remaining(pair.cert) > RENEW_AT
            )
        except ValueError:
            return False
