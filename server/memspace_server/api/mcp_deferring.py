"""The MCP endpoint made once the server serves: importing the MCP SDK takes about 1.5 s, which
the clients of a restarting shard need not wait for (gRPC, HTTP/JSON and health serve first).
A `/mcp` request that comes before it is made waits for it. Nothing here imports the SDK."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from typing import TYPE_CHECKING

from starlette.types import Receive, Scope, Send

from memspace_server.api.http_app import Handlers

if TYPE_CHECKING:
    from memspace_server.api import mcp_app

log = logging.getLogger(__name__)

PATH = "/mcp"
"""Where the endpoint is served on the HTTP/JSON port (`mcp_app.PATH`)."""


class Deferred:
    """`mcp_app.Endpoint`, imported and started in the background by `start`; `asgi` serves
    `/mcp` through it (waiting for it if need be), `stop` stops it."""

    def __init__(self, handlers: Handlers) -> None:
        self._handlers = handlers
        self._made: asyncio.Task[mcp_app.Endpoint] | None = None
        self._imported = False

    def start(self) -> None:
        self._made = asyncio.get_running_loop().create_task(self._make())

    async def _make(self) -> mcp_app.Endpoint:
        # Imported in a worker thread: the event loop serves meanwhile.
        module = await asyncio.to_thread(importlib.import_module, "memspace_server.api.mcp_app")
        self._imported = True
        endpoint: mcp_app.Endpoint = module.Endpoint(self._handlers)
        await endpoint.start()
        log.debug("MCP endpoint ready at %s", PATH)
        return endpoint

    async def endpoint(self) -> mcp_app.Endpoint:
        """The endpoint, once made."""
        if self._made is None:
            raise RuntimeError("the MCP endpoint was not started")
        return await asyncio.shield(self._made)

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        await (await self.endpoint()).asgi(scope, receive, send)

    async def stop(self) -> None:
        if self._made is None:
            return
        if not self._imported and not self._made.done():
            # Still importing the SDK (a server drained soon after its start, on a busy
            # machine): nothing was started, and the drain does not wait for the import (it
            # took seconds there, which a restarting shard's successor waited for).
            self._made.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._made
            return
        try:
            endpoint = await self._made
        except Exception:
            log.exception("the MCP endpoint could not be made")
            return
        await endpoint.stop()
