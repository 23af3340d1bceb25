"""Credentials of a client: the keys of the operator's credentials Secret (`space`, `endpoint`,
`token`, and `ca.crt` where the shards serve TLS), read from the environment, from a mounted
Secret directory or given in code, and what they make of a gRPC channel (TLS, metadata).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc

from memspace_contract import spaces, wire

SECRET_KEYS = ("space", "endpoint", "token")
CA_KEY = "ca.crt"
"""The key of the CA bundle in a credentials Secret (and its file in a mounted one)."""
CERT_KEY, KEY_KEY = "tls.crt", "tls.key"
"""The keys of a client certificate and its key in a credentials Secret (mutual TLS)."""
TLS_ENV = {
    "secure": "MEMSPACE_SECURE",
    "ca_file": "MEMSPACE_CA_FILE",
    "cert_file": "MEMSPACE_CERT_FILE",
    "key_file": "MEMSPACE_KEY_FILE",
    "server_name": "MEMSPACE_SERVER_NAME",
}
DEFAULT_ENDPOINT = "127.0.0.1:50051"
DEFAULT_CREDENTIALS_DIR = Path("/var/run/memspace")
"""Where a pod mounts its credentials Secret by convention (docs/install.md): read when
MEMSPACE_CREDENTIALS_DIR is unset and this directory exists."""
SPACE_METADATA = wire.SPACE_KEY
AUTHORIZATION_METADATA = wire.AUTHORIZATION_KEY


class CredentialsError(ValueError):
    """Credentials that are missing or unreadable; the message says where they were looked for."""


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a client needs: the keys of the operator's credentials Secret, and how to reach the
    server over TLS."""

    endpoint: str = DEFAULT_ENDPOINT
    space: str | None = None
    """None: the server's default space (standalone servers only)."""
    token: str | None = None
    """None: no authorization metadata (a standalone server without tokens)."""
    secure: bool = False
    """TLS to the server. Any of `ca_file`, `ca`, `cert_file` turns it on."""
    ca_file: Path | None = None
    """PEM CA bundle the server's certificate must chain to; None: the system's roots."""
    ca: bytes | None = None
    """The same bundle in memory (PEM), instead of a file."""
    cert_file: Path | None = None
    """PEM client certificate, for servers that require one (mutual TLS); with `key_file`."""
    key_file: Path | None = None
    cert: bytes | None = None
    """The client certificate in memory (PEM), instead of a file; with `key`."""
    key: bytes | None = None
    server_name: str | None = None
    """The name the server's certificate must carry when it is not the endpoint's host (an
    endpoint reached through a port-forward, say)."""

    def __post_init__(self) -> None:
        if self.space is not None:
            spaces.parse_space_id(self.space)
        for key in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, key, Path(value))  # a str given by a caller
        if (self.cert_file is None) != (self.key_file is None):
            raise CredentialsError("a client certificate needs both cert_file and key_file")
        if (self.cert is None) != (self.key is None):
            raise CredentialsError("a client certificate needs both cert and key")
        if self.ca is not None and self.ca_file is not None:
            raise CredentialsError("give the CA as ca_file or as ca, not both")
        if self.cert is not None and self.cert_file is not None:
            raise CredentialsError("give the client certificate as files or in memory, not both")
        if not self.secure and (self.ca_file or self.ca or self.cert_file or self.cert):
            object.__setattr__(self, "secure", True)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike[str]) -> Credentials:
        """Read the files `space`, `endpoint`, `token`, `ca.crt`, `tls.crt` and `tls.key` of a
        mounted Secret (each optional; `ca.crt` turns TLS on, `tls.crt` and `tls.key` are a
        client certificate for mutual TLS)."""
        root = Path(directory)
        if not root.is_dir():
            raise CredentialsError(f"credentials directory {root} does not exist")
        found = {key: _read(root / key) for key in SECRET_KEYS if (root / key).exists()}
        ca_file, cert_file, key_file = root / CA_KEY, root / CERT_KEY, root / KEY_KEY
        pair = cert_file.exists() and key_file.exists()
        return cls(
            endpoint=found.get("endpoint") or DEFAULT_ENDPOINT,
            space=found.get("space") or None,
            token=found.get("token") or None,
            ca_file=ca_file if ca_file.exists() else None,
            cert_file=cert_file if pair else None,
            key_file=key_file if pair else None,
        )

    @classmethod
    def from_secret_dir(cls, directory: str | os.PathLike[str]) -> Credentials:
        """The same as `from_directory`: a credentials Secret mounted as a volume."""
        return cls.from_directory(directory)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        default_dir: Path | None = DEFAULT_CREDENTIALS_DIR,
    ) -> Credentials:
        """Credentials from the environment, in this order for each key:

        MEMSPACE_SPACE, MEMSPACE_ENDPOINT, MEMSPACE_TOKEN           the value itself
        MEMSPACE_SPACE_FILE, MEMSPACE_ENDPOINT_FILE, MEMSPACE_TOKEN_FILE   a file holding it
        MEMSPACE_CREDENTIALS_DIR                                    a mounted Secret directory
        `default_dir` (/var/run/memspace), when it exists            the same, by convention

        and for TLS: MEMSPACE_SECURE (true/false), MEMSPACE_CA_FILE, MEMSPACE_CERT_FILE,
        MEMSPACE_KEY_FILE, MEMSPACE_SERVER_NAME.
        """
        env = os.environ if environ is None else environ
        directory: str | Path | None = env.get("MEMSPACE_CREDENTIALS_DIR")
        if not directory and default_dir is not None and default_dir.is_dir():
            directory = default_dir
        base = cls.from_directory(directory) if directory else cls()
        values: dict[str, str] = {}
        for key in SECRET_KEYS:
            name = f"MEMSPACE_{key.upper()}"
            if env.get(name):
                values[key] = env[name].strip()
            elif env.get(f"{name}_FILE"):
                values[key] = _read(Path(env[f"{name}_FILE"]))
        tls = {key: env.get(name, "").strip() for key, name in TLS_ENV.items()}
        secure = base.secure
        if tls["secure"]:
            secure = _boolean(tls["secure"], TLS_ENV["secure"])

        def path(key: str, default: Path | None) -> Path | None:
            return Path(tls[key]) if tls[key] else default

        return cls(
            endpoint=values.get("endpoint", base.endpoint),
            space=values.get("space", base.space),
            token=values.get("token", base.token),
            secure=secure,
            ca_file=path("ca_file", base.ca_file),
            cert_file=path("cert_file", base.cert_file),
            key_file=path("key_file", base.key_file),
            server_name=tls["server_name"] or base.server_name,
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        pairs = []
        if self.space is not None:
            pairs.append((SPACE_METADATA, self.space))
        if self.token is not None:
            pairs.append((AUTHORIZATION_METADATA, f"{wire.BEARER} {self.token}"))
        return tuple(pairs)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials of the channel (files read now); None: plaintext."""
        if not self.secure:
            return None
        roots = self.ca if self.ca is not None else _read_bytes(self.ca_file)
        chain = self.cert if self.cert is not None else _read_bytes(self.cert_file)
        key = self.key if self.key is not None else _read_bytes(self.key_file)
        return grpc.ssl_channel_credentials(
            root_certificates=roots, private_key=key, certificate_chain=chain
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        if self.secure and self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


def _boolean(value: str, name: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise CredentialsError(f"{name} is {value!r}; allowed: true, false")


def _read_bytes(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        raise CredentialsError(f"cannot read TLS file {path}: {err}") from err


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as err:
        raise CredentialsError(f"cannot read credentials file {path}: {err}") from err
