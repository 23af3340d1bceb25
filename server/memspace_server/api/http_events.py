"""Subscribe over HTTP: the space's change feed as Server-Sent Events (text/event-stream).

Each event is `id: <LSN>`, `event: remembered|forgotten`, `data: <MemoryEvent as JSON>`. A
reader that reconnects with `Last-Event-ID: N` (browsers' EventSource does so by itself) resumes
at LSN N+1, exactly after the last event it saw; the header wins over `?since_lsn=`, which an
EventSource repeats on every reconnect.

The call is routed before the response starts (the router's refusals are plain HTTP errors, as
for every other call: 400, 401, 403, and 404 for a space not on the server), then runs through
the edge like any other call. A stream that ends later (a drain, an unloaded space, an LSN no
longer retained, a slow reader) sends one `event: error` whose data is the error body of the other
calls (`code`, `message`, `resume_lsn`) and whose id is the last LSN delivered, so that an
EventSource's reconnect resumes exactly there. A comment line every `KEEPALIVE_S` keeps proxies
from closing a quiet stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette import requests, responses

from memspace_contract import wire
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_server import errors
from memspace_server.api import http_calls, routing

KEEPALIVE_S = 15.0
"""Seconds of silence after which a comment line goes out."""
RETRY_MS = 1000
"""The reconnection delay suggested to EventSource readers after an error event."""
SUBSCRIBE = "/memspace.v1.MemoryService/Subscribe"

_NAMES = {
    pb.EVENT_TYPE_REMEMBERED: "remembered",
    pb.EVENT_TYPE_FORGOTTEN: "forgotten",
}


def resume_from(request: requests.Request, since_lsn: int) -> int:
    """The since_lsn of a (re)connecting reader: after its Last-Event-ID, else the query's."""
    last = request.headers.get("last-event-id", "").strip()
    if not last:
        return since_lsn
    return http_calls.uint64(last, "the Last-Event-ID header (an LSN)") + 1


async def stream(
    handler: Any,
    message: pb.SubscribeRequest,
    context: http_calls.CallContext,
    request: requests.Request,
    router: routing.Router,
) -> responses.Response:
    message.since_lsn = resume_from(request, message.since_lsn)
    pairs = context.invocation_metadata()
    route = router.route(
        routing.POLICIES[SUBSCRIBE],
        [value for key, value in pairs if key == wire.SPACE_KEY],
        message.space,
        [value for key, value in pairs if key == wire.AUTHORIZATION_KEY],
    )
    if route.entry is None:
        raise errors.SpaceNotFoundError(f"no space {route.space!r} on this server")
    events: AsyncIterator[pb.MemoryEvent] = handler.unary_stream(message, context.as_grpc())
    return responses.StreamingResponse(
        _sse(events, message.since_lsn),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def event_text(event: pb.MemoryEvent) -> str:
    data = json.dumps(http_calls.to_json(event), separators=(",", ":"))
    name = _NAMES.get(event.type, "event")
    return f"id: {event.lsn}\nevent: {name}\ndata: {data}\n\n"


def error_text(refused: http_calls.RefusedError, last_lsn: int | None) -> str:
    body = http_calls.error_body(refused)
    resume = body.get("resume_lsn")
    if resume is not None and int(resume) > 0:
        last_lsn = int(resume) - 1
    data = json.dumps(body, separators=(",", ":"))
    lines = "" if last_lsn is None else f"id: {last_lsn}\n"
    return f"{lines}event: error\nretry: {RETRY_MS}\ndata: {data}\n\n"


async def _pump(
    events: AsyncIterator[pb.MemoryEvent], out: asyncio.Queue[pb.MemoryEvent | BaseException | None]
) -> None:
    """Drive the edge's stream in one task (its call span and log context stay in that task's
    context) into `out`: each event, then None at its end or the error that ended it."""
    try:
        async for event in events:
            await out.put(event)
    except Exception as err:  # the edge answers every error as RefusedError; a bug too
        await out.put(err)
        return
    await out.put(None)


async def _sse(events: AsyncIterator[pb.MemoryEvent], since_lsn: int) -> AsyncIterator[str]:
    """The events as SSE text; keep-alive comments between; one error event at the end."""
    last: int | None = since_lsn - 1 if since_lsn > 0 else None
    # One event at a time: a slow reader slows the pump, and the feed notices as over gRPC.
    out: asyncio.Queue[pb.MemoryEvent | BaseException | None] = asyncio.Queue(maxsize=1)
    pump = asyncio.ensure_future(_pump(events, out))
    try:
        yield ": subscribed\n\n"
        while True:
            try:
                item = await asyncio.wait_for(out.get(), KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if item is None:
                return
            if isinstance(item, http_calls.RefusedError):
                yield error_text(item, last)
                return
            if isinstance(item, BaseException):
                raise item
            last = item.lsn
            yield event_text(item)
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
