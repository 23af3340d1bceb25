"""Helpers of the HTTP/JSON tests: a server with its HTTP port on, an httpx client to it, and one
call of every route (as `rpc_callers` does over gRPC)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from tests.api.conftest import DIM, Running, Start, vec


def headers(space: str | None = None, token: str | None = None) -> dict[str, str]:
    """Request headers naming a space and/or carrying a bearer token."""
    found = {}
    if space is not None:
        found["X-Memory-Space"] = space
    if token is not None:
        found["Authorization"] = f"Bearer {token}"
    return found


def memory_json(content: str, *values: float, **tags: str) -> dict[str, Any]:
    return {"content": content, "embedding": vec(*values or (1.0,)), "tags": tags}


class Web:
    """A running server and an HTTP client to its HTTP/JSON port."""

    def __init__(self, running: Running, client: httpx.AsyncClient) -> None:
        self.running = running
        self.client = client

    @property
    def base_url(self) -> str:
        return str(self.client.base_url)


@contextlib.asynccontextmanager
async def web(start: Start, **overrides: Any) -> AsyncIterator[Web]:
    running = await start(http_listen="127.0.0.1:0", **overrides)
    assert running.server.http is not None
    url = f"http://127.0.0.1:{running.server.http.port}"
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield Web(running, client)


HttpCaller = Callable[[str, dict[str, str]], Awaitable[int]]
NO_TARGET = {"url": "nowhere://backups"}
"""A backup target the server refuses (as conftest.NO_TARGET)."""


def http_callers(client: httpx.AsyncClient) -> dict[str, HttpCaller]:
    """One call of every memspace.v1 method over HTTP, naming `space` in its path; each answers
    the HTTP status (a Subscribe stream that is accepted answers 200 once it is open)."""

    async def send(verb: str, path: str, hdrs: dict[str, str], body: Any = None) -> int:
        content = None if body is None else json.dumps(body)
        response = await client.request(verb, path, headers=hdrs, content=content)
        return response.status_code

    async def subscribe(space: str, hdrs: dict[str, str]) -> int:
        async with client.stream("GET", f"/v1/spaces/{space}/events", headers=hdrs) as response:
            return response.status_code

    one = memory_json("x")
    return {
        "Remember": lambda s, h: send("POST", f"/v1/spaces/{s}/memories", h, one),
        "RememberBatch": lambda s, h: send(
            "POST", f"/v1/spaces/{s}/memories/batch", h, {"memories": [one]}
        ),
        "Recall": lambda s, h: send("POST", f"/v1/spaces/{s}/recall", h, {"cue": vec(1), "k": 1}),
        "Get": lambda s, h: send("GET", f"/v1/spaces/{s}/memories/nothing", h),
        "Forget": lambda s, h: send("DELETE", f"/v1/spaces/{s}/memories/nothing", h),
        "Subscribe": subscribe,
        "Consolidate": lambda s, h: send("POST", f"/v1/spaces/{s}/consolidate", h),
        "CreateSpace": lambda s, h: send("PUT", f"/v1/spaces/{s}", h, {"embedding_dim": DIM}),
        "DeleteSpace": lambda s, h: send("DELETE", f"/v1/spaces/{s}", h),
        "ListSpaces": lambda s, h: send("GET", "/v1/spaces", h),
        "Health": lambda s, h: send("GET", f"/v1/spaces/{s}/health", h),
        "ApplyIndexEntry": lambda s, h: send(
            "POST", f"/v1/spaces/{s}/index-entry", h, {"removed_generation": 1}
        ),
        "BackupSpace": lambda s, h: send(
            "POST", f"/v1/spaces/{s}/backups", h, {"target": NO_TARGET, "backup_id": "b1"}
        ),
        "RestoreSpace": lambda s, h: send(
            "POST", f"/v1/spaces/{s}/restore", h, {"target": NO_TARGET, "backup_id": "b1"}
        ),
        "DeleteBackup": lambda s, h: send(
            "DELETE", f"/v1/spaces/{s}/backups/b1", h, {"target": NO_TARGET}
        ),
    }


class Events:
    """A Server-Sent Events reader: (id, event, data) of each event; comments are skipped."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self) -> tuple[str | None, str, dict[str, Any]]:
        async with asyncio.timeout(10):
            fields: dict[str, str] = {}
            async for line in self._lines:
                if line == "":
                    if "data" in fields:
                        return (
                            fields.get("id"),
                            fields.get("event", "message"),
                            json.loads(fields["data"]),
                        )
                    fields = {}
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
        raise AssertionError("the event stream ended")

    async def take(self, count: int) -> list[tuple[str | None, str, dict[str, Any]]]:
        return [await self.next() for _ in range(count)]
