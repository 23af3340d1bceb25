"""The settings of one `memspace serve` process: one typed object, loaded once from flags and
environment in `main` and passed down. Each field names its flag and environment variable; a
flag wins over the environment, the environment over the default."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from memspace_server.storage.settings import EngineSettings

LogFormat = Literal["text", "json"]


def _meta(flag: str, env: str, help: str, metavar: str) -> dict[str, str]:
    return {"flag": flag, "env": env, "help": help, "metavar": metavar}


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    data_root: Path = dataclasses.field(
        metadata=_meta(
            "--data-root",
            "MEMSPACE_DATA_ROOT",
            "standalone: the server's own directory (index/ and spaces/ under it); managed: the "
            "directory holding one mounted volume per space, <data-root>/<spaceId>",
            "DIR",
        )
    )
    index_dir: Path | None = dataclasses.field(
        default=None,
        metadata=_meta(
            "--index-dir",
            "MEMSPACE_INDEX_DIR",
            "managed mode: the spaces index directory written by the operator (one <spaceId>.json "
            "per space), reloaded on change; unset: standalone, with an index of its own",
            "DIR",
        ),
    )
    listen: str = dataclasses.field(
        default="127.0.0.1:50051",
        metadata=_meta(
            "--listen",
            "MEMSPACE_LISTEN",
            "gRPC address HOST:PORT (port 0 picks a free port). Loopback by default: a standalone "
            "server without an admin token checks no tokens",
            "HOST:PORT",
        ),
    )
    metrics_listen: str = dataclasses.field(
        default="127.0.0.1:9090",
        metadata=_meta(
            "--metrics-listen",
            "MEMSPACE_METRICS_LISTEN",
            "Prometheus metrics address HOST:PORT; 'off' disables the endpoint",
            "HOST:PORT",
        ),
    )
    admin_token_file: Path | None = dataclasses.field(
        default=None,
        metadata=_meta(
            "--admin-token-file",
            "MEMSPACE_ADMIN_TOKEN_FILE",
            "file holding the admin token (opens SpaceService); re-read when it changes. Given in "
            "standalone mode, it turns token checks on",
            "FILE",
        ),
    )
    metrics_token_file: Path | None = dataclasses.field(
        default=None,
        metadata=_meta(
            "--metrics-token-file",
            "MEMSPACE_METRICS_TOKEN_FILE",
            "file holding a bearer token the metrics port requires (401 without "
            "'Authorization: Bearer <token>'); re-read when it changes. Unset: metrics are open "
            "to anyone who can reach the port",
            "FILE",
        ),
    )
    tls_cert_file: Path | None = dataclasses.field(
        default=None,
        metadata=_meta(
            "--tls-cert-file",
            "MEMSPACE_TLS_CERT_FILE",
            "PEM certificate (chain) the gRPC port serves TLS with; with --tls-key-file. Re-read "
            "when it changes (a rotated Secret is used by the next connection, no restart); "
            "unset: plaintext",
            "FILE",
        ),
    )
    tls_key_file: Path | None = dataclasses.field(
        default=None,
        metadata=_meta(
            "--tls-key-file",
            "MEMSPACE_TLS_KEY_FILE",
            "PEM private key of --tls-cert-file, re-read with it",
            "FILE",
        ),
    )
    tls_client_ca_file: Path | None = dataclasses.field(
        default=None,
        metadata=_meta(
            "--tls-client-ca-file",
            "MEMSPACE_TLS_CLIENT_CA_FILE",
            "PEM CA bundle: given, every client must present a certificate it signed (mutual "
            "TLS); re-read when it changes",
            "FILE",
        ),
    )
    insecure: bool = dataclasses.field(
        default=False,
        metadata=_meta(
            "--insecure",
            "MEMSPACE_INSECURE",
            "allow listening on a non-loopback address without TLS or without an admin token "
            "(refused otherwise: tokens and memories would cross the network in clear, or "
            "anyone who reaches the port opens every space)",
            "",
        ),
    )
    health_listen: str = dataclasses.field(
        default="off",
        metadata=_meta(
            "--health-listen",
            "MEMSPACE_HEALTH_LISTEN",
            "plaintext address HOST:PORT serving only grpc.health.v1, for probes that cannot "
            "speak TLS (Kubernetes' gRPC probes); 'off' disables it",
            "HOST:PORT",
        ),
    )
    max_receive_message_bytes: int = dataclasses.field(
        default=4 * 1024 * 1024,
        metadata=_meta(
            "--max-receive-message-bytes",
            "MEMSPACE_MAX_RECEIVE_MESSAGE_BYTES",
            "largest request message accepted (bytes); larger ones get RESOURCE_EXHAUSTED. 4 MiB "
            "holds a 64 KiB memory with a 4096-dimension embedding many times over",
            "BYTES",
        ),
    )
    max_send_message_bytes: int = dataclasses.field(
        default=64 * 1024 * 1024,
        metadata=_meta(
            "--max-send-message-bytes",
            "MEMSPACE_MAX_SEND_MESSAGE_BYTES",
            "largest response message sent (bytes): 1,000 hits with 4096-dimension embeddings and "
            "64 KiB contents need about 80 MiB; the default covers typical recalls",
            "BYTES",
        ),
    )
    drain_timeout_s: float = dataclasses.field(
        default=25.0,
        metadata=_meta(
            "--drain-timeout",
            "MEMSPACE_DRAIN_TIMEOUT",
            "seconds from SIGTERM to exit: in-flight calls finish, then WAL and tiers are flushed. "
            "Below Kubernetes' default 30 s grace period",
            "SECONDS",
        ),
    )
    drain_notice_s: float = dataclasses.field(
        default=0.0,
        metadata=_meta(
            "--drain-notice",
            "MEMSPACE_DRAIN_NOTICE",
            "seconds of a drain spent still serving while grpc.health.v1 answers NOT_SERVING, so "
            "load balancers that probe health move traffic away first; part of the drain timeout",
            "SECONDS",
        ),
    )
    default_embedding_dim: int = dataclasses.field(
        default=768,
        metadata=_meta(
            "--default-embedding-dim",
            "MEMSPACE_DEFAULT_EMBEDDING_DIM",
            "standalone: embedding size of the 'default' space when it is created",
            "N",
        ),
    )
    index_refresh_s: float = dataclasses.field(
        default=1.0,
        metadata=_meta(
            "--index-refresh",
            "MEMSPACE_INDEX_REFRESH",
            "managed mode: seconds between checks of the index directory for changes",
            "SECONDS",
        ),
    )
    idle_unload_s: float = dataclasses.field(
        default=300.0,
        metadata=_meta(
            "--idle-unload",
            "MEMSPACE_IDLE_UNLOAD",
            "seconds without requests after which a space is unloaded (no RAM, no open files)",
            "SECONDS",
        ),
    )
    maintain_interval_s: float = dataclasses.field(
        default=5.0,
        metadata=_meta(
            "--maintain-interval",
            "MEMSPACE_MAINTAIN_INTERVAL",
            "seconds between housekeeping rounds: idle unload, due consolidations, metrics",
            "SECONDS",
        ),
    )
    metrics_interval_s: float = dataclasses.field(
        default=15.0,
        metadata=_meta(
            "--metrics-interval",
            "MEMSPACE_METRICS_INTERVAL",
            "seconds between refreshes of the per-space gauges (each walks the loaded spaces' "
            "volumes in a worker thread); Prometheus' usual scrape interval",
            "SECONDS",
        ),
    )
    subscriber_buffer: int = dataclasses.field(
        default=1024,
        metadata=_meta(
            "--subscriber-buffer",
            "MEMSPACE_SUBSCRIBER_BUFFER",
            "events a Subscribe stream may fall behind before it ends with RESOURCE_EXHAUSTED",
            "EVENTS",
        ),
    )
    max_batch: int = dataclasses.field(
        default=10_000,
        metadata=_meta(
            "--max-batch",
            "MEMSPACE_MAX_BATCH",
            "most memories in one RememberBatch stream (all are held until the stream ends)",
            "N",
        ),
    )
    log_format: LogFormat = dataclasses.field(
        default="text",
        metadata=_meta(
            "--log-format",
            "MEMSPACE_LOG_FORMAT",
            "'text' for a terminal, 'json' for containers (one object per line)",
            "text|json",
        ),
    )
    log_level: str = dataclasses.field(
        default="INFO",
        metadata=_meta("--log-level", "MEMSPACE_LOG_LEVEL", "logging level", "LEVEL"),
    )

    @property
    def tls(self) -> bool:
        """The gRPC port speaks TLS."""
        return self.tls_cert_file is not None

    @property
    def managed(self) -> bool:
        """Spaces come from an operator-written index: CreateSpace/DeleteSpace are refused."""
        return self.index_dir is not None

    def engine(self) -> EngineSettings:
        return EngineSettings(subscriber_buffer=self.subscriber_buffer)


class SettingsError(ValueError):
    """A flag or environment value that cannot be used; the message names it."""


def _fields() -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(ServerSettings)
    return [(field, hints[field.name]) for field in dataclasses.fields(ServerSettings)]


def _base_type(hint: Any) -> Any:
    if isinstance(hint, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def _convert(value: str, hint: Any, source: str) -> Any:
    base = _base_type(hint)
    try:
        if typing.get_origin(base) is Literal:
            if value not in typing.get_args(base):
                allowed = ", ".join(typing.get_args(base))
                raise SettingsError(f"{source} is {value!r}; allowed: {allowed}")
            return value
        if base is Path:
            return Path(value)
        if base is int:
            return int(value)
        if base is float:
            return float(value)
        if base is bool:
            return _boolean(value, source)
    except ValueError as err:
        if isinstance(err, SettingsError):
            raise
        raise SettingsError(f"{source} is {value!r}: not a {base.__name__}") from err
    return value


def _boolean(value: str, source: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{source} is {value!r}; allowed: true, false")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare one flag per setting (defaults resolved later, so the environment can apply)."""
    for field, hint in _fields():
        meta = field.metadata
        default = field.default
        if hint is bool:
            parser.add_argument(
                meta["flag"],
                dest=field.name,
                action="store_const",
                const="true",
                default=None,
                help=f"{meta['help']}; env {meta['env']}=true",
            )
            continue
        shown = "" if default in (None, dataclasses.MISSING) else f" (default {default})"
        parser.add_argument(
            meta["flag"],
            dest=field.name,
            default=None,
            metavar=meta["metavar"],
            help=f"{meta['help']}{shown}; env {meta['env']}",
        )


def load(flags: Mapping[str, str | None], environ: Mapping[str, str]) -> ServerSettings:
    """Settings from parsed flags (None: not given) over the environment over the defaults."""
    values: dict[str, Any] = {}
    for field, hint in _fields():
        meta = field.metadata
        raw = flags.get(field.name)
        source = meta["flag"]
        if raw is None:
            raw = environ.get(meta["env"]) or None
            source = meta["env"]
        if raw is not None:
            values[field.name] = _convert(raw, hint, source)
    if "data_root" not in values:
        raise SettingsError("--data-root (or MEMSPACE_DATA_ROOT) is required")
    settings = ServerSettings(**values)
    validate(settings)
    return settings


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise SettingsError(f"address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:50051")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(settings: ServerSettings) -> None:
    host, _ = split_address(settings.listen)
    for address in (settings.metrics_listen, settings.health_listen):
        if address != "off":
            split_address(address)
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        raise SettingsError("--tls-cert-file and --tls-key-file go together: give both or neither")
    if settings.tls_client_ca_file is not None and not settings.tls:
        raise SettingsError(
            "--tls-client-ca-file needs TLS: give --tls-cert-file and --tls-key-file too"
        )
    if not is_loopback(host) and not settings.insecure:
        missing = [
            what
            for what, absent in (
                ("without TLS (--tls-cert-file, --tls-key-file)", not settings.tls),
                ("without an admin token (--admin-token-file)", settings.admin_token_file is None),
            )
            if absent
        ]
        if missing:
            raise SettingsError(
                f"refusing to listen on {settings.listen} {' and '.join(missing)}: anyone who "
                "can reach that address could read tokens and memories in transit or open "
                "every space. Give them, listen on a loopback address (127.0.0.1:PORT), or pass "
                "--insecure to accept the risk (e.g. behind a mesh that encrypts traffic)"
            )
    positive = {
        "--max-receive-message-bytes": settings.max_receive_message_bytes,
        "--max-send-message-bytes": settings.max_send_message_bytes,
        "--drain-timeout": settings.drain_timeout_s,
        "--index-refresh": settings.index_refresh_s,
        "--idle-unload": settings.idle_unload_s,
        "--maintain-interval": settings.maintain_interval_s,
        "--metrics-interval": settings.metrics_interval_s,
        "--subscriber-buffer": settings.subscriber_buffer,
        "--max-batch": settings.max_batch,
    }
    for flag, value in positive.items():
        if value <= 0:
            raise SettingsError(f"{flag} is {value}; it must be above 0")
    if not 0 <= settings.drain_notice_s < settings.drain_timeout_s:
        raise SettingsError(
            f"--drain-notice is {settings.drain_notice_s}; allowed 0 up to the drain timeout "
            f"({settings.drain_timeout_s})"
        )
    if not 1 <= settings.default_embedding_dim <= 4096:
        raise SettingsError(
            f"--default-embedding-dim is {settings.default_embedding_dim}; allowed 1..4096"
        )
