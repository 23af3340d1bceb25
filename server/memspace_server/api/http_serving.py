"""The HTTP/JSON port of a server (`--http-listen`): uvicorn serving `http_app` on the server's own
event loop, over TLS with the gRPC port's certificate files when it has them. Started after the
gRPC server, stopped by the drain once the edge has no call in flight."""

from __future__ import annotations

import logging
import socket
import ssl

import uvicorn
from starlette import applications

from memspace_server.settings import ServerSettings, SettingsError, split_address

log = logging.getLogger(__name__)

STOP_GRACE_S = 1
"""Seconds open connections get to finish once the drain stops the port."""


class HttpPort:
    def __init__(self, app: applications.Starlette, settings: ServerSettings) -> None:
        self._settings = settings
        host, port = split_address(settings.http_listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so, and without
        # it a response's two writes (head, body) meet the client's delayed ACK (40 ms).
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as err:
            self._socket.close()
            raise SettingsError(
                f"cannot serve HTTP on {settings.http_listen}: {err}; choose another address "
                "with --http-listen, or 'off'"
            ) from err
        self._socket.set_inheritable(True)
        self.port: int = self._socket.getsockname()[1]
        tls: dict[str, object] = {}
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            tls = {
                "ssl_certfile": str(settings.tls_cert_file),
                "ssl_keyfile": str(settings.tls_key_file),
            }
            if settings.tls_client_ca_file is not None:
                tls["ssl_ca_certs"] = str(settings.tls_client_ca_file)
                tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=STOP_GRACE_S,
            **tls,  # type: ignore[arg-type]
        )
        config.load()
        self._server = uvicorn.Server(config)
        self._server.lifespan = config.lifespan_class(config)
        self.tls = bool(tls)

    async def start(self) -> None:
        await self._server.startup(sockets=[self._socket])

    async def stop(self) -> None:
        self._server.should_exit = True
        await self._server.shutdown(sockets=[self._socket])
