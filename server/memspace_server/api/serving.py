"""Assembly of one server: the registry (standalone or managed), the edge and servicers on a
grpc.aio server, grpc.health.v1, reflection, metrics, housekeeping, and the drain on SIGTERM.

Drain: health turns NOT_SERVING, live Subscribe streams end with UNAVAILABLE (and the LSN to
resume from), the server stops accepting calls and lets in-flight ones finish, then every
loaded space is flushed (WAL closed, tiers consolidated) and the process exits 0, all within
the drain timeout. An acknowledged write is already fsynced before its answer is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memspace_contract import spaces
from memspace_server import embedding
from memspace_server.api import (
    certificates,
    handling,
    http_app,
    http_serving,
    limits,
    loops,
    mcp_deferring,
    metrics,
    openapi,
    probing,
    routing,
    servicers,
    sharing,
    tokens,
    tracing,
)
from memspace_server.settings import ServerSettings, SettingsError, is_loopback, split_address
from memspace_server.storage import backing_up, catalogs
from memspace_server.storage import registry as registries
from memspace_server.storage.spaces import Health, Space

log = logging.getLogger(__name__)

CLOSE_SHARE = 0.4
"""Share of the drain timeout kept for flushing spaces after in-flight calls."""
OTHER_CALLS = 64
"""Calls besides memspace's own (health checks and watches, reflection) a server takes at once,
on top of --max-calls."""
STOP_GRACE_S = 0.5
"""Grace of grpc's own stop, once no memspace call is in flight."""
NOTICE_QUIET_S = 0.2
"""A drain notice ends early once no call has arrived for this long (clients that still reach
the server keep it busy; an idle one goes at once)."""


class Server:
    def __init__(
        self, settings: ServerSettings, health_port: probing.HealthPort | None = None
    ) -> None:
        """`health_port`: the health-only port, already serving (opened before this module
        was imported, see `probing`); without it, `start` opens `settings.health_listen`."""
        self.settings = settings
        self._early_health = health_port
        # A scan or fsync thread hands its result to the event loop only once it holds the
        # interpreter: at Python's default switch interval a busy loop (another space's flood)
        # keeps it waiting 5 ms for every such hop of a quiet space's call.
        sys.setswitchinterval(settings.thread_switch_ms / 1000)
        self.registry = self._open_registry()
        self.metrics = metrics.Metrics()
        self.router = routing.Router(
            self.registry.catalog.get,
            allow_default=not settings.managed,
            check_tokens=settings.managed or settings.admin_token_file is not None,
        )
        self.limits = limits.Limits(
            limits.Caps(
                calls=settings.max_calls,
                streams=settings.max_streams,
                calls_per_space=settings.max_calls_per_space,
                subscribers_per_space=settings.max_subscribers_per_space,
            )
        )
        per_space = settings.working_calls_per_space
        activity = self.registry.pools.activity
        turns = (
            sharing.Turns(per_space, activity=activity, share=settings.working_time_share)
            if per_space
            else None
        )
        self.edge = handling.Edge(self.router, self.metrics, self.limits, turns)
        offered = settings.offered_models
        self.embedder = (
            embedding.Embedder(offered, settings.embedding_threads, settings.embedding_batch)
            if offered
            else None
        )
        self.health = _Health()
        self.port = 0
        self.draining = False
        self._grpc: grpc.aio.Server | None = None
        self._health_grpc: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self.http: http_serving.HttpPort | None = None
        self.mcp: mcp_deferring.Deferred | None = None
        self.tls: certificates.Reloading | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._admin_token_stamp: tuple[int, int] | None = None
        self._admin_token_warned: str | None = None
        self._drained: asyncio.Future[bool] | None = None
        self._stopping = asyncio.Event()
        self.backups = backing_up.Backups(self.registry)

    def _open_registry(self) -> registries.Registry:
        s = self.settings
        if s.index_dir is None:
            return registries.standalone(s.data_root, s.engine(), idle_unload_s=s.idle_unload_s)
        catalog = catalogs.Catalog(s.index_dir, writable=False)
        return registries.Registry(catalog, s.data_root, s.engine(), idle_unload_s=s.idle_unload_s)

    @property
    def address(self) -> str:
        host, _ = split_address(self.settings.listen)
        shown = f"[{host}]" if ":" in host else host
        return f"{shown}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port

    # -- start ---------------------------------------------------------------------------------

    async def _create_default_space(self) -> None:
        """Standalone: the space that answers calls naming none, with the configured model."""
        dim, model = self.settings.default_embedding
        await self.registry.create(spaces.DEFAULT_SPACE, dim, embedding=model)
        log.info(
            "created the default space (embedding_dim %d, embedding model %s)",
            dim,
            model.model if model is not None else "none",
        )

    async def start(self) -> None:
        s = self.settings
        await self.registry.refresh()
        if not s.managed and self.registry.catalog.get(spaces.DEFAULT_SPACE) is None:
            await self._create_default_space()
        # Under the operator the token comes from an optional Secret volume: a shard started
        # while that Secret is missing (before an install, after an uninstall) serves its spaces
        # and opens SpaceService once the file appears. Standalone, a missing file is a mistake.
        self._reload_admin_token(required=not s.managed)
        self._grpc = server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", s.max_receive_message_bytes),
                ("grpc.max_send_message_length", s.max_send_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
            # A backstop for the calls the edge does not see (grpc.health.v1 Watch streams,
            # reflection): memspace's own calls are capped, with a clearer message, by the edge.
            maximum_concurrent_rpcs=s.max_calls + OTHER_CALLS,
        )
        memory = servicers.MemoryServicer(
            self.registry,
            lambda: self.draining,
            max_batch=s.max_batch,
            max_batch_bytes=s.max_batch_bytes,
            max_recall_response_bytes=s.max_recall_response_bytes,
            embedder=self.embedder,
        )
        space = servicers.SpaceServicer(
            self.registry,
            lambda: self.draining,
            self.backups,
            store_timeout_s=s.backup_store_timeout_s,
            embedder=self.embedder,
        )
        by_name = {"MemoryService": memory, "SpaceService": space}
        names = []
        every_handler = {}
        for service in handling.services():
            handlers = self.edge.method_handlers(service, by_name[service.name])
            every_handler[service.name] = handlers
            # Generic handlers only: grpc.aio's server loop awaits a pending request per
            # registered method (asyncio.wait over all of them for every call that arrives),
            # which cost more per call than the dict lookup of a generic handler.
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service.full_name, handlers),)
            )
            names.append(service.full_name)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names += [health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server)
        self.port = self._add_port(server)
        self._add_health_port()
        if s.metrics_listen != "off":
            host, port = split_address(s.metrics_listen)
            try:
                # Under the operator the file comes from an optional Secret volume (as the
                # admin token's): missing, the port admits nobody until it appears.
                token = (
                    tokens.TokenFile(s.metrics_token_file, required=not s.managed)
                    if s.metrics_token_file
                    else None
                )
            except tokens.TokenFileError as err:
                raise SettingsError(f"--metrics-token-file: {err}") from err
            try:
                self.metrics.start(host, port, token)
            except OSError as err:
                raise SettingsError(
                    f"cannot serve metrics on {s.metrics_listen}: {err}; choose another address "
                    "with --metrics-listen, or 'off'"
                ) from err
        if s.http_listen != "off":
            # The same edge handlers as the gRPC server's: one routing core for both.
            # The MCP endpoint (/mcp on the same port) calls the same edge handlers too; it is
            # made in the background (its SDK is slow to import), so a start does not wait.
            self.mcp = mcp_deferring.Deferred(every_handler)
            self.http = http_serving.HttpPort(
                http_app.App(
                    every_handler,
                    self.router,
                    openapi.document,
                    max_body_bytes=s.max_receive_message_bytes,
                    max_batch_body_bytes=max(s.max_receive_message_bytes, s.max_batch_bytes),
                    mounts={mcp_deferring.PATH: self.mcp.asgi},
                ).asgi(),
                s,
            )
        await server.start()
        if self.http is not None:
            await self._start_http()
        if self._health_grpc is not None:
            await self._health_grpc.start()
        for name in ["", *names[:2]]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self._early_health is not None:
            self._early_health.attach(self.health)  # held probes pass now
        self._housekeeping = asyncio.get_running_loop().create_task(self._keep_house())
        self._warn_if_open()
        log.info(
            "serving %d spaces on %s (%s mode, %s, tokens %s, %s event loop)%s%s%s",
            len(self.registry.entries()),
            self.address,
            "managed" if s.managed else "standalone",
            "TLS" + (" with client certificates" if s.tls_client_ca_file else "")
            if s.tls
            else "plaintext",
            "checked" if self.router.check_tokens else "not checked",
            loops.running(),
            f", metrics on :{self.metrics.port}" if self.metrics.port else "",
            f", plaintext health on :{self.health_port}" if self.health_port else "",
            f", HTTP/JSON on :{self.http.port}" if self.http is not None else "",
        )

    async def _start_http(self) -> None:
        if self.mcp is not None:
            self.mcp.start()
        if self.http is not None:
            await self.http.start()

    def _add_health_port(self) -> None:
        """The health-only port: the one opened before the start, else its own server."""
        s = self.settings
        if self._early_health is not None:
            self.health_port = self._early_health.port
        elif s.health_listen != "off":
            self._health_grpc = prober = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, prober)
            try:
                self.health_port = prober.add_insecure_port(s.health_listen)
            except RuntimeError as err:
                raise SettingsError(f"cannot serve health on {s.health_listen}: {err}") from err

    def _add_port(self, server: grpc.aio.Server) -> int:
        s = self.settings
        try:
            if s.tls_cert_file is None or s.tls_key_file is None:
                return server.add_insecure_port(s.listen)
            files = certificates.Files(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file)
            self.tls = certificates.Reloading(files)
            return server.add_secure_port(s.listen, self.tls.credentials())
        except certificates.CertificateError as err:
            raise SettingsError(f"TLS: {err}") from err
        except RuntimeError as err:
            raise SettingsError(f"cannot listen on {s.listen}: {err}") from err

    def _warn_if_open(self) -> None:
        """Only an --insecure server gets here listening off loopback without TLS or tokens."""
        host, _ = split_address(self.settings.listen)
        if is_loopback(host):
            return
        if not self.settings.tls:
            log.warning(
                "listening on %s without TLS (--insecure): tokens and memories cross the "
                "network in clear text",
                self.settings.listen,
            )
        if not self.router.check_tokens:
            log.warning(
                "listening on %s without token checks (--insecure): anyone who can reach this "
                "address can read and write every space",
                self.settings.listen,
            )

    def _reload_admin_token(self, required: bool = False) -> None:
        path = self.settings.admin_token_file
        if path is None:
            return
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._admin_token_stamp:
                return
            token = path.read_text().strip()
        except OSError as err:
            if required:
                raise SettingsError(f"cannot read the admin token file {path}: {err}") from err
            self._admin_token_problem(f"cannot read the admin token file {path}: {err}")
            return
        if not token:
            if required:
                raise SettingsError(f"the admin token file {path} is empty")
            self._admin_token_problem(f"the admin token file {path} is empty")
            return
        if self._admin_token_stamp is not None or self._admin_token_warned is not None:
            log.info("admin token loaded from %s", path)
        self._admin_token_warned = None
        self._admin_token_stamp = stamp
        self.router.set_admin_token(token)

    def _admin_token_problem(self, problem: str) -> None:
        """Warn once per problem (the file is re-read every index refresh)."""
        if problem == self._admin_token_warned:
            return
        self._admin_token_warned = problem
        kept = (
            "keeping the previous token"
            if self._admin_token_stamp is not None
            else ("SpaceService (admin calls) refuses every call until it is there")
        )
        log.warning("%s; %s, re-read every %.0f s", problem, kept, self.settings.index_refresh_s)

    # -- housekeeping --------------------------------------------------------------------------

    async def _keep_house(self) -> None:
        s = self.settings
        tick = min(s.index_refresh_s, s.maintain_interval_s)
        next_maintain = time.monotonic() + s.maintain_interval_s
        next_refresh = time.monotonic() + s.index_refresh_s
        next_metrics = time.monotonic()
        while not self._stopping.is_set():
            now = time.monotonic()
            try:
                if now >= next_refresh:
                    next_refresh = now + s.index_refresh_s
                    self._reload_admin_token()
                    # Standalone, the server writes its own index: nobody else changes it.
                    if s.managed and await self.registry.refresh():
                        log.info("spaces index reloaded: %d spaces", len(self.registry.entries()))
                if now >= next_maintain:
                    next_maintain = now + s.maintain_interval_s
                    await self.registry.maintain()
                if self.metrics.port is not None and now >= next_metrics:
                    next_metrics = now + s.metrics_interval_s
                    await self._snapshot()
            except Exception:
                log.exception("housekeeping round failed; retrying next round")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), tick)

    async def _snapshot(self) -> None:
        """Refresh the per-space gauges. Space health walks each volume for its size, so it runs
        in a worker thread, not on the event loop (it only reads counters of the spaces)."""
        entries = self.registry.entries()
        loaded = [space for space in self.registry.loaded().values() if not space.closed]
        found = await asyncio.get_running_loop().run_in_executor(
            self.registry.executor, _healths, loaded
        )
        healths = {k: v for k, v in self.metrics.snapshot.health.items() if k in entries}
        healths.update(found)
        self.metrics.forget_spaces_except(set(entries))
        self.metrics.snapshot = metrics.Snapshot(
            spaces=len(entries), loaded=len(loaded), draining=self.draining, health=healths
        )

    # -- drain ---------------------------------------------------------------------------------

    async def drain(self) -> bool:
        """Stop serving and flush; True when every space was flushed in time. Idempotent."""
        if self._drained is not None:
            return await self._drained
        self._drained = asyncio.get_running_loop().create_future()
        ok = await self._drain()
        self._drained.set_result(ok)
        return ok

    async def _drain(self) -> bool:
        s = self.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.drain_timeout_s
        started = time.monotonic()
        self.draining = True
        log.info("draining: no new calls, in-flight calls finish, then spaces are flushed")
        await self.health.drain()
        self.metrics.snapshot = dataclasses.replace(self.metrics.snapshot, draining=True)
        if s.drain_notice_s:
            await self._notice(s.drain_notice_s)
        self.edge.refuse_new_calls()
        # Live Subscribe streams would hold the drain until its timeout: end them now (their
        # clients get UNAVAILABLE with the LSN to resume from, on another server).
        self.registry.close_feeds()
        grace = (s.drain_timeout_s - s.drain_notice_s) * (1 - CLOSE_SHARE)
        if not await self.edge.quiesce(grace):
            log.warning(
                "%d calls still in flight after %.1f s: cancelling them", self.edge.in_flight, grace
            )
        # The ports stop together (uvicorn alone takes 0.1 s, however idle): a restarting
        # shard's successor starts only once this process is gone.
        await asyncio.gather(self._stop_grpc(), self._stop_http())
        if self._housekeeping is not None:
            # Let its current round finish: cancelling a consolidation midway would leave its
            # worker thread writing while the flush below consolidates the same space.
            self._stopping.set()
            await self._housekeeping
        ok = True
        try:
            await asyncio.wait_for(self.registry.close(), max(0.1, deadline - loop.time()))
        except TimeoutError:
            ok = False
            log.error(
                "drain timeout: some spaces were not consolidated; every acknowledged write is "
                "in their WAL and is replayed at the next start"
            )
        except Exception:
            ok = False
            log.exception("flushing the spaces failed")
        self.backups.close()
        self.metrics.stop()
        if self.embedder is not None:
            self.embedder.close()
        log.info("drained in %.2f s", time.monotonic() - started)
        return ok

    async def _stop_grpc(self) -> None:
        if self._grpc is not None:
            # Health Watch and reflection streams end here (cancelled past a short grace).
            await self._grpc.stop(STOP_GRACE_S)
        if self._health_grpc is not None:
            await self._health_grpc.stop(STOP_GRACE_S)
        if self._early_health is not None:
            await self._early_health.stop(STOP_GRACE_S)

    async def _stop_http(self) -> None:
        if self.http is not None:
            await self.http.stop()
        if self.mcp is not None:
            await self.mcp.stop()

    async def _notice(self, notice_s: float) -> None:
        """Serve on while grpc.health.v1 says NOT_SERVING, for `notice_s` seconds, or less once
        no call has arrived for NOTICE_QUIET_S: an idle shard has nobody to give notice to, and
        its pod's successor (a StatefulSet pod keeps its name) starts only once it is gone."""
        loop = asyncio.get_running_loop()
        end = loop.time() + notice_s
        while (left := end - loop.time()) > 0:
            quiet = self.edge.quiet_for()
            if quiet >= NOTICE_QUIET_S:
                log.info("drain notice ended early: no call for %.2f s", quiet)
                return
            await asyncio.sleep(min(left, NOTICE_QUIET_S - quiet))


def _healths(loaded: list[Space]) -> dict[str, Health]:
    found: dict[str, Health] = {}
    for space in loaded:
        try:
            found[space.id] = space.health()
        except Exception:  # a space closing under us: skip it this round
            log.debug("no health for space %s this round", space.id, exc_info=True)
    return found


class _Health(health.aio.HealthServicer):  # type: ignore[misc, name-defined]
    """grpc.health.v1 that ends its Watch streams once they have seen NOT_SERVING at a drain,
    so they do not hold the drain until its timeout. (grpc_health-stubs describe only the
    threaded servicer, hence the ignores.)"""

    WATCH_GRACE_S = 0.1

    def __init__(self) -> None:
        super().__init__()
        self._draining = asyncio.Event()

    async def drain(self) -> None:
        await self.enter_graceful_shutdown()
        self._draining.set()

    async def Watch(  # noqa: N802  # the name of the gRPC method
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> None:
        watching = asyncio.ensure_future(super().Watch(request, context))
        draining = asyncio.ensure_future(self._draining.wait())
        try:
            await asyncio.wait({watching, draining}, return_when=asyncio.FIRST_COMPLETED)
            if not watching.done():
                await asyncio.sleep(self.WATCH_GRACE_S)  # NOT_SERVING goes out first
        finally:
            for task in (watching, draining):
                task.cancel()
            await asyncio.gather(watching, draining, return_exceptions=True)


async def serve(
    settings: ServerSettings,
    on_started: Callable[[Server], None] | None = None,
    health_port: probing.HealthPort | None = None,
) -> int:
    """Run until SIGTERM or SIGINT, then drain. Returns the process exit code. Standalone, the
    process holds its data root until it exits (a second server or a backup is refused).
    `health_port`: the health-only port, opened already (see `Server`)."""
    if settings.index_dir is None:
        registries.lock_data_root(settings.data_root)  # released when the process ends
    traced = tracing.configure(os.environ)
    try:
        return await _serve(settings, on_started, health_port)
    finally:
        if traced is not None:
            traced.shutdown()


async def _serve(
    settings: ServerSettings,
    on_started: Callable[[Server], None] | None,
    health_port: probing.HealthPort | None,
) -> int:
    server = Server(settings, health_port)
    await server.start()
    if on_started is not None:
        on_started(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)
    ok = await server.drain()
    return 0 if ok else 1
