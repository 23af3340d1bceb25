"""The settings of one `memspace serve` process, for the gRPC edge and the storage engine alike:
one typed object, loaded once from flags and environment in `main` and passed down. Each field
is declared once (memspace_contract.settings): its type, bounds, help text and environment
variable, from which its flag derives; a flag wins over the environment, the environment over
the default."""

from __future__ import annotations

import ipaddress
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import pydantic

from memspace_contract import index, models
from memspace_contract.settings import Settings, SettingsError, setting
from memspace_server.storage.settings import EngineSettings

__all__ = [
    "ServerSettings",
    "SettingsError",
    "is_loopback",
    "load",
    "split_address",
    "validate",
]

LogFormat = Literal["text", "json"]
EventLoop = Literal["uvloop", "asyncio"]


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


def _address(value: str) -> str:
    try:
        split_address(value)
    except SettingsError as err:
        raise ValueError(str(err).removeprefix(f"address {value!r}: ")) from err
    return value


Address = typing.Annotated[str, pydantic.AfterValidator(_address)]


class ServerSettings(Settings):
    flags: typing.ClassVar[bool] = True

    data_root: Path = setting(
        env="MEMSPACE_DATA_ROOT",
        metavar="DIR",
        help="standalone: the server's own directory (index/ and spaces/ under it); managed: the "
        "directory holding one mounted volume per space, <data-root>/<spaceId>",
    )
    index_dir: Path | None = setting(
        None,
        env="MEMSPACE_INDEX_DIR",
        metavar="DIR",
        help="managed mode: the spaces index directory written by the operator (one "
        "<spaceId>.json per space), reloaded on change; unset: standalone, with an index of its "
        "own",
    )
    listen: Address = setting(
        "127.0.0.1:50051",
        env="MEMSPACE_LISTEN",
        metavar="HOST:PORT",
        help="gRPC address HOST:PORT (port 0 picks a free port). Loopback by default: a "
        "standalone server without an admin token checks no tokens",
    )
    metrics_listen: str = setting(
        "127.0.0.1:9090",
        env="MEMSPACE_METRICS_LISTEN",
        metavar="HOST:PORT",
        help="Prometheus metrics address HOST:PORT; 'off' disables the endpoint",
    )
    admin_token_file: Path | None = setting(
        None,
        env="MEMSPACE_ADMIN_TOKEN_FILE",
        metavar="FILE",
        help="file holding the admin token (opens SpaceService); re-read when it changes. Given "
        "in standalone mode, it turns token checks on",
    )
    metrics_token_file: Path | None = setting(
        None,
        env="MEMSPACE_METRICS_TOKEN_FILE",
        metavar="FILE",
        help="file holding a bearer token the metrics port requires (401 without "
        "'Authorization: Bearer <token>'); re-read when it changes. Unset: metrics are open "
        "to anyone who can reach the port",
    )
    tls_cert_file: Path | None = setting(
        None,
        env="MEMSPACE_TLS_CERT_FILE",
        metavar="FILE",
        help="PEM certificate (chain) the gRPC port serves TLS with; with --tls-key-file. Re-read "
        "when it changes (a rotated Secret is used by the next connection, no restart); "
        "unset: plaintext",
    )
    tls_key_file: Path | None = setting(
        None,
        env="MEMSPACE_TLS_KEY_FILE",
        metavar="FILE",
        help="PEM private key of --tls-cert-file, re-read with it",
    )
    tls_client_ca_file: Path | None = setting(
        None,
        env="MEMSPACE_TLS_CLIENT_CA_FILE",
        metavar="FILE",
        help="PEM CA bundle: given, every client must present a certificate it signed (mutual "
        "TLS); re-read when it changes",
    )
    insecure: bool = setting(
        False,
        env="MEMSPACE_INSECURE",
        help="allow listening on a non-loopback address without TLS or without an admin token "
        "(refused otherwise: tokens and memories would cross the network in clear, or "
        "anyone who reaches the port opens every space)",
    )
    health_listen: str = setting(
        "off",
        env="MEMSPACE_HEALTH_LISTEN",
        metavar="HOST:PORT",
        help="plaintext address HOST:PORT serving only grpc.health.v1, for probes that cannot "
        "speak TLS (Kubernetes' gRPC probes); 'off' disables it",
    )
    http_listen: str = setting(
        "off",
        env="MEMSPACE_HTTP_LISTEN",
        metavar="HOST:PORT",
        help="HTTP/JSON address HOST:PORT serving the same API as the gRPC port, through the "
        "same routing, auth and limits (TLS with the gRPC port's certificate when it has one; "
        "docs/api.md); 'off' disables it",
    )
    max_receive_message_bytes: int = setting(
        4 * 1024 * 1024,
        env="MEMSPACE_MAX_RECEIVE_MESSAGE_BYTES",
        metavar="BYTES",
        gt=0,
        help="largest request message accepted (bytes); larger ones get RESOURCE_EXHAUSTED. "
        "4 MiB holds a 64 KiB memory with a 4096-dimension embedding many times over",
    )
    max_send_message_bytes: int = setting(
        64 * 1024 * 1024,
        env="MEMSPACE_MAX_SEND_MESSAGE_BYTES",
        metavar="BYTES",
        gt=0,
        help="largest response message sent (bytes): 1,000 hits with 4096-dimension embeddings "
        "and 64 KiB contents need about 80 MiB; the default covers typical recalls",
    )
    drain_timeout_s: float = setting(
        25.0,
        env="MEMSPACE_DRAIN_TIMEOUT",
        metavar="SECONDS",
        gt=0,
        help="seconds from SIGTERM to exit: in-flight calls finish, then WAL and tiers are "
        "flushed. Below Kubernetes' default 30 s grace period",
    )
    drain_notice_s: float = setting(
        0.0,
        env="MEMSPACE_DRAIN_NOTICE",
        metavar="SECONDS",
        help="seconds of a drain spent still serving while grpc.health.v1 answers NOT_SERVING, "
        "so load balancers that probe health move traffic away first; ends early once no call has "
        "arrived for 0.2 s; part of the drain timeout",
    )
    default_embedding_dim: int = setting(
        index.DEFAULT_EMBEDDING_DIM,
        env="MEMSPACE_DEFAULT_EMBEDDING_DIM",
        metavar="N",
        ge=1,
        le=index.MAX_EMBEDDING_DIM,
        help="standalone: embedding size of the 'default' space when it is created",
    )
    default_embedding_model: str = setting(
        models.NONE,
        env="MEMSPACE_DEFAULT_EMBEDDING_MODEL",
        metavar="NAME",
        help="standalone: the embedding model of the 'default' space when it is created (one of "
        "--embedding-models; its dimension replaces --default-embedding-dim), so text-only "
        "Remember and Recall work on it; 'none': the client sends vectors",
    )
    index_refresh_s: float = setting(
        1.0,
        env="MEMSPACE_INDEX_REFRESH",
        metavar="SECONDS",
        gt=0,
        help="managed mode: seconds between checks of the index directory for changes",
    )
    idle_unload_s: float = setting(
        300.0,
        env="MEMSPACE_IDLE_UNLOAD",
        metavar="SECONDS",
        gt=0,
        help="seconds without requests after which a space is unloaded (no RAM, no open files)",
    )
    backup_store_timeout_s: float = setting(
        30.0,
        env="MEMSPACE_BACKUP_STORE_TIMEOUT",
        metavar="SECONDS",
        gt=0,
        help="BackupSpace, RestoreSpace, DeleteBackup: how long one request to the object store "
        "is retried before the call fails with UNAVAILABLE (long enough to ride out a store's "
        "restart; a store that went away fails the call rather than hanging it)",
    )
    maintain_interval_s: float = setting(
        5.0,
        env="MEMSPACE_MAINTAIN_INTERVAL",
        metavar="SECONDS",
        gt=0,
        help="seconds between housekeeping rounds: idle unload, due consolidations, metrics",
    )
    metrics_interval_s: float = setting(
        15.0,
        env="MEMSPACE_METRICS_INTERVAL",
        metavar="SECONDS",
        gt=0,
        help="seconds between refreshes of the per-space gauges (each walks the loaded spaces' "
        "volumes in a worker thread); Prometheus' usual scrape interval",
    )
    subscriber_buffer: int = setting(
        1024,
        env="MEMSPACE_SUBSCRIBER_BUFFER",
        metavar="EVENTS",
        gt=0,
        help="events a Subscribe stream may fall behind before it ends with RESOURCE_EXHAUSTED",
    )
    cold_cache_bytes: int = setting(
        256 * 1024 * 1024,
        env="MEMSPACE_COLD_CACHE_BYTES",
        metavar="BYTES",
        ge=0,
        help="bytes of decompressed cold-tier chunks kept in RAM for the whole server, shared "
        "by its spaces (least recently used first, the largest holder first), so a repeated "
        "cold recall does not decompress again; 0 turns the cache off",
    )
    recall_sample: float = setting(
        0.01,
        env="MEMSPACE_RECALL_SAMPLE",
        metavar="FRACTION",
        ge=0.0,
        le=1.0,
        help="fraction of recalls answered through a space's HNSW graph that are run again "
        "exactly in the background, to measure and export the recall@k users get (Health, "
        "memspace_space_recall_at_k); 0 turns the measurement off",
    )
    index_build_threads: int = setting(
        1,
        env="MEMSPACE_INDEX_BUILD_THREADS",
        metavar="N",
        ge=1,
        help="threads a background build of a space's HNSW graph may use (builds run one at a "
        "time per server); the other cores stay with recalls",
    )
    max_batch: int = setting(
        10_000,
        env="MEMSPACE_MAX_BATCH",
        metavar="N",
        gt=0,
        help="most memories in one RememberBatch stream",
    )
    max_batch_bytes: int = setting(
        64 * 1024 * 1024,
        env="MEMSPACE_MAX_BATCH_BYTES",
        metavar="BYTES",
        gt=0,
        help="most bytes of memories (content, embedding, tags, ids) in one RememberBatch "
        "stream; the stream is validated and staged on the space's volume as it arrives, so it "
        "holds only a small chunk in RAM until it commits. 64 MiB: five such streams at once "
        "keep a server well under 1 GiB",
    )
    max_recall_response_bytes: int = setting(
        16 * 1024 * 1024,
        env="MEMSPACE_MAX_RECALL_RESPONSE_BYTES",
        metavar="BYTES",
        gt=0,
        help="largest Recall answer (bytes); a larger one is refused, asking for a smaller k or "
        "no embeddings. 16 MiB holds 1,000 hits of 768-dimension embeddings and 8 KiB contents",
    )
    max_calls: int = setting(
        4096,
        env="MEMSPACE_MAX_CALLS",
        metavar="N",
        gt=0,
        help="calls in flight on the whole server (unary and streams); more are refused at once",
    )
    max_streams: int = setting(
        2048,
        env="MEMSPACE_MAX_STREAMS",
        metavar="N",
        gt=0,
        help="open streams (Subscribe, RememberBatch) on the whole server",
    )
    max_calls_per_space: int = setting(
        256,
        env="MEMSPACE_MAX_CALLS_PER_SPACE",
        metavar="N",
        gt=0,
        help="unary calls and RememberBatch streams in flight on one space, so one tenant cannot "
        "take every call slot of a shard",
    )
    working_calls_per_space: int = setting(
        2,
        env="MEMSPACE_WORKING_CALLS_PER_SPACE",
        metavar="N",
        ge=0,
        help="unary calls of one space the event loop works on at once while other spaces call "
        "too; the space's further calls wait in its own queue, so a flooding tenant's share of "
        "the loop does not grow with how hard it pushes (a space alone is not held back; 0: "
        "off)",
    )
    working_time_share: float = setting(
        0.5,
        env="MEMSPACE_WORKING_TIME_SHARE",
        metavar="FRACTION",
        gt=0.0,
        le=1.0,
        help="part of the time a space's unary calls may be at work while other spaces call too, "
        "once its clients send more calls than its working calls: its further calls wait until "
        "its share has room, so the event loop is free when a quiet tenant's call arrives (a "
        "client calling one at a time and a space alone are never held; 1: off)",
    )
    embedding_models: str = setting(
        ",".join(models.MODELS),
        env="MEMSPACE_EMBEDDING_MODELS",
        metavar="NAME[,NAME...]",
        help="the embedding models this server offers to spaces (spec.embedding.model, "
        "CreateSpace's embedding_model), comma-separated; 'none': none. Each is loaded from its "
        "installed package on first use, never downloaded",
    )
    embedding_threads: int = setting(
        1,
        env="MEMSPACE_EMBEDDING_THREADS",
        metavar="N",
        gt=0,
        help="batches of text the server embeds at once, each on a thread of its own, whatever "
        "the number of spaces asking; further batches wait, taken from each space in turn so "
        "one tenant cannot hold the CPU (1 leaves the other core of a 2-core pod to the event "
        "loop)",
    )
    embedding_batch: int = setting(
        64,
        env="MEMSPACE_EMBEDDING_BATCH",
        metavar="N",
        gt=0,
        le=4096,
        help="most texts embedded in one call of the model (RememberBatch streams are embedded "
        "in groups of this many)",
    )
    thread_switch_ms: float = setting(
        0.5,
        env="MEMSPACE_THREAD_SWITCH_MS",
        metavar="MS",
        gt=0,
        le=100,
        help="how long a worker thread that has finished a scan or an fsync waits at most for a "
        "busy event loop's thread to hand over the interpreter (Python's switch interval, 5 by "
        "default: a 5 ms wait per hop for a quiet space's call while another floods the loop)",
    )
    event_loop: EventLoop = setting(
        "uvloop",
        env="MEMSPACE_EVENT_LOOP",
        metavar="uvloop|asyncio",
        help="the event loop the server runs on: 'uvloop' (libuv's; a Recall costs the server "
        "about an eighth less CPU than on asyncio's own) or 'asyncio' (Python's)",
    )
    max_subscribers_per_space: int = setting(
        1024,
        env="MEMSPACE_MAX_SUBSCRIBERS_PER_SPACE",
        metavar="N",
        gt=0,
        help="open Subscribe streams on one space (each holds up to --subscriber-buffer events)",
    )
    log_format: LogFormat = setting(
        "text",
        env="MEMSPACE_LOG_FORMAT",
        metavar="text|json",
        help="'text' for a terminal, 'json' for containers (one object per line)",
    )
    log_level: str = setting(
        "INFO", env="MEMSPACE_LOG_LEVEL", metavar="LEVEL", help="logging level"
    )

    @pydantic.field_validator("metrics_listen", "health_listen", "http_listen")
    @classmethod
    def _address_or_off(cls, value: str) -> str:
        return value if value == "off" else _address(value)

    @property
    def offered_models(self) -> tuple[str, ...]:
        """The names of `embedding_models`, in order."""
        return models.offered(self.embedding_models)

    @property
    def tls(self) -> bool:
        """The gRPC port speaks TLS."""
        return self.tls_cert_file is not None

    @property
    def managed(self) -> bool:
        """Spaces come from an operator-written index: CreateSpace/DeleteSpace are refused."""
        return self.index_dir is not None

    @property
    def default_embedding(self) -> tuple[int, index.Embedding | None]:
        """Standalone: the dimension and embedding model of a new 'default' space."""
        if self.default_embedding_model == models.NONE:
            return self.default_embedding_dim, None
        model = models.MODELS[self.default_embedding_model]
        return model.dim, index.Embedding(model=model.name)

    def engine(self) -> EngineSettings:
        return EngineSettings(
            subscriber_buffer=self.subscriber_buffer,
            cold_cache_bytes=self.cold_cache_bytes,
            ann_recall_sample=self.recall_sample,
            ann_build_threads=self.index_build_threads,
        )


add_arguments = ServerSettings.add_arguments


def load(flags: Mapping[str, object], environ: Mapping[str, str]) -> ServerSettings:
    """Settings from parsed flags (None: not given) over the environment over the defaults."""
    settings = ServerSettings.load(environ, flags)
    validate(settings)
    return settings


def validate(settings: ServerSettings) -> None:
    """The rules between settings (each field's own bounds hold already): TLS files go
    together, and a non-loopback port needs TLS and an admin token unless --insecure."""
    for name in settings.offered_models:
        if name not in models.MODELS:
            raise SettingsError(
                f"--embedding-models names {name!r}, which this server does not know; known: "
                f"{', '.join(models.MODELS)}"
            )
    default_model = settings.default_embedding_model
    if default_model != models.NONE and default_model not in settings.offered_models:
        raise SettingsError(
            f"--default-embedding-model names {default_model!r}, which this server does not "
            f"offer; offered: {', '.join(settings.offered_models) or 'none'}"
        )
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        raise SettingsError("--tls-cert-file and --tls-key-file go together: give both or neither")
    if settings.tls_client_ca_file is not None and not settings.tls:
        raise SettingsError(
            "--tls-client-ca-file needs TLS: give --tls-cert-file and --tls-key-file too"
        )
    # The HTTP port carries the same tokens and memories as the gRPC port: the same rule.
    exposed = [
        address
        for address in (settings.listen, settings.http_listen)
        if address != "off" and not is_loopback(split_address(address)[0])
    ]
    if exposed and not settings.insecure:
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
                f"refusing to listen on {exposed[0]} {' and '.join(missing)}: anyone who "
                "can reach that address could read tokens and memories in transit or open "
                "every space. Give them, listen on a loopback address (127.0.0.1:PORT), or pass "
                "--insecure to accept the risk (e.g. behind a mesh that encrypts traffic)"
            )
    if not 0 <= settings.drain_notice_s < settings.drain_timeout_s:
        raise SettingsError(
            f"--drain-notice is {settings.drain_notice_s}; allowed 0 up to the drain timeout "
            f"({settings.drain_timeout_s})"
        )
