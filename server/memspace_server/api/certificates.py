"""The server's TLS credentials, re-read when their files change.

grpc asks a certificate fetcher for the configuration at every new connection's handshake; the
fetcher here compares the files' stamps (mtime, size, inode) with the last load and answers None
(keep the current configuration) unless one changed. A changed set is validated first (the key
must match the certificate, the client CA must parse): a half-written rotation keeps the previous
certificate until the files are whole, and is tried again at the next handshake. So a certificate
that cert-manager or the operator rotates in a mounted Secret is used by the next connection,
without a restart; connections already open keep the certificate they were made with.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from memspace_server import importing

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
else:
    # Only a server with TLS reads certificates: a plaintext one does not import them at start.
    x509 = importing.lazy("cryptography.x509")
    serialization = importing.lazy("cryptography.hazmat.primitives.serialization")

log = logging.getLogger(__name__)

Stamp = tuple[int, int, int]


class CertificateError(ValueError):
    """Certificate files that are missing, unreadable or do not fit together."""


@dataclasses.dataclass(frozen=True)
class Files:
    """Where the server's certificate, its key and (optionally) the client CA live."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def paths(self) -> tuple[Path, ...]:
        return (
            (self.cert, self.key)
            if self.client_ca is None
            else (self.cert, self.key, self.client_ca)
        )


@dataclasses.dataclass(frozen=True)
class Loaded:
    """One validated set of PEM bytes."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    not_after: float
    """Expiry of the server certificate (POSIX seconds)."""

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)], self.client_ca)


def _stamps(files: Files) -> tuple[Stamp, ...]:
    stamps = []
    for path in files.paths():
        stat = path.stat()  # follows the symlinks of a projected Secret volume
        stamps.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(stamps)


def load(files: Files) -> Loaded:
    """Read and check the files: CertificateError says which one is wrong and why."""
    try:
        cert, key = files.cert.read_bytes(), files.key.read_bytes()
        client_ca = None if files.client_ca is None else files.client_ca.read_bytes()
    except OSError as err:
        raise CertificateError(f"cannot read a TLS file: {err}") from err
    try:
        chain = x509.load_pem_x509_certificates(cert)
    except ValueError as err:
        raise CertificateError(f"{files.cert} holds no PEM certificate: {err}") from err
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as err:
        raise CertificateError(f"{files.key} holds no unencrypted PEM private key: {err}") from err
    if _public(private.public_key()) != _public(chain[0].public_key()):
        raise CertificateError(
            f"the key in {files.key} does not match the certificate {files.cert}"
        )
    if client_ca is not None:
        try:
            x509.load_pem_x509_certificates(client_ca)
        except ValueError as err:
            raise CertificateError(f"{files.client_ca} holds no PEM CA certificate: {err}") from err
    return Loaded(cert, key, client_ca, chain[0].not_valid_after_utc.timestamp())


def _public(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class Reloading:
    """Server credentials whose files are re-read at a handshake after they change."""

    def __init__(self, files: Files) -> None:
        self.files = files
        self._lock = threading.Lock()
        try:
            self._stamps = _stamps(files)
        except OSError as err:
            raise CertificateError(f"cannot read a TLS file: {err}") from err
        self.current = load(files)
        self._refused: tuple[Stamp, ...] | None = None
        """Stamps of a changed set that could not be used: not read again until they change."""
        self._problem: str | None = None
        self.reloads = 0
        """Certificate sets loaded after the first (a figure for tests and logs)."""

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.current.configuration(),
            self._fetch,  # type: ignore[arg-type]  # grpc's stubs omit None: "keep the current"
            require_client_authentication=self.files.client_ca is not None,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's certificate fetcher: a new configuration, or None to keep the current one.
        Runs on one of grpc's threads at each handshake; must not raise. A set of files that
        cannot be used is warned about once and not read again until it changes."""
        with self._lock:
            try:
                stamps = _stamps(self.files)
            except OSError as err:
                self._refuse(None, f"cannot read a TLS file: {err}")
                return None
            if stamps in (self._stamps, self._refused):
                return None
            try:
                loaded = load(self.files)
            except CertificateError as err:
                self._refuse(stamps, str(err))
                return None
            self._stamps = stamps
            self._refused = None
            self.current = loaded
            self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.files.cert)
        return loaded.configuration()

    def _refuse(self, stamps: tuple[Stamp, ...] | None, problem: str) -> None:
        if problem != self._problem:
            log.warning("TLS files changed but cannot be used (%s); keeping the previous", problem)
        self._problem = problem
        if stamps is not None:
            self._refused = stamps
