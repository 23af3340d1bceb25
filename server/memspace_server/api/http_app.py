"""The HTTP/JSON front of memspace.v1: a Starlette app whose routes (`http_routes`) call the very
handlers the gRPC server runs (`handling.Edge.method_handlers`), so every HTTP call goes through
the same edge: the same space selection, auth, caps, metrics, logs and error table.

A request becomes the method's protobuf message (proto3 JSON mapping; path fields and query
fields filled in), its headers become the call's metadata (`X-Memory-Space`, `Authorization`,
`X-Request-Id`), and the edge's answer comes back as JSON. A refused call answers the HTTP status
its gRPC code maps to (`errors_map.HTTP_STATUS`) with `{"code", "message"}` and, where the gRPC
call would carry them in trailing metadata, `retry_after_s` (also `Retry-After`) and
`resume_lsn`. Subscribe is Server-Sent Events (`http_events`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, cast

import grpc
from google.protobuf import json_format
from google.protobuf import message as protobuf_message
from opentelemetry import trace
from starlette import applications, exceptions, requests, responses, routing
from starlette.types import ASGIApp, Receive, Scope, Send

from memspace_contract import wire
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_server import errors, spans
from memspace_server.api import http_calls, http_events, tracing
from memspace_server.api import routing as spaces_routing
from memspace_server.api.http_routes import ROUTES, Body, Operation

log = logging.getLogger(__name__)

HEADERS = (wire.SPACE_KEY, wire.AUTHORIZATION_KEY, wire.REQUEST_ID_KEY)
"""The request headers that become call metadata (header names are case-insensitive)."""

Handlers = Mapping[str, Mapping[str, "grpc.RpcMethodHandler[Any, Any]"]]
"""Per service name, per method name: the edge's handlers, as the gRPC server registers them."""


def metadata(request: requests.Request) -> list[tuple[str, str]]:
    return [(key, value) for key, value in request.headers.items() if key in HEADERS]


class App:
    """The routes of `http_routes`, each calling its method's edge handler."""

    def __init__(
        self,
        handlers: Handlers,
        router: spaces_routing.Router,
        document: Callable[[], Mapping[str, Any]],
        max_body_bytes: int,
        max_batch_body_bytes: int,
        *,
        mounts: Mapping[str, ASGIApp] | None = None,
    ) -> None:
        self._handlers = handlers
        self._router = router
        self._document = document
        self._max_body = max_body_bytes
        self._max_batch_body = max_batch_body_bytes
        self._mounts = dict(mounts or {})
        """Other ASGI apps by exact path (any verb): the MCP endpoint (`mcp_app`)."""

    def asgi(self) -> applications.Starlette:
        routes: list[routing.BaseRoute] = [
            routing.Route(
                op.starlette_path, self._endpoint(op), methods=[op.verb], name=op.operation_id
            )
            for op in ROUTES
        ]
        routes.append(routing.Route("/openapi.json", self._openapi, methods=["GET"]))
        routes.extend(routing.Route(path, _Asgi(app)) for path, app in self._mounts.items())
        return applications.Starlette(
            routes=routes,
            exception_handlers={exceptions.HTTPException: _http_exception},
        )

    async def _openapi(self, request: requests.Request) -> responses.Response:
        return responses.JSONResponse(self._document())

    def _endpoint(
        self, op: Operation
    ) -> Callable[[requests.Request], Awaitable[responses.Response]]:
        # grpc's method handlers hold grpc.aio coroutines here (the stubs describe sync ones).
        handler: Any = self._handlers[op.service][op.method]
        request_type = getattr(
            pb,
            pb.DESCRIPTOR.services_by_name[op.service].methods_by_name[op.method].input_type.name,
        )

        async def endpoint(request: requests.Request) -> responses.Response:
            if not spans.ENABLED:
                return await answer(request)
            with spans.tracer.start_as_current_span(
                f"HTTP {op.verb} {op.path}",
                context=tracing.parent_of(request.headers.items()),
                kind=trace.SpanKind.SERVER,
                attributes={"http.request.method": op.verb, "http.route": op.path},
            ) as span:
                response = await answer(request)
                span.set_attribute("http.response.status_code", response.status_code)
                if response.status_code >= 500:
                    span.set_status(trace.StatusCode.ERROR)
                return response

        async def answer(request: requests.Request) -> responses.Response:
            try:
                context = http_calls.CallContext(metadata(request))
                if op.events:
                    subscribe = cast(
                        "pb.SubscribeRequest", _message(op, request_type, request, None)
                    )
                    return await http_events.stream(
                        handler, subscribe, context, request, self._router
                    )
                body = await self._body(op, request)
                if op.body is Body.MEMORIES:
                    batch = _batch(op, request, body)
                    context = self._batch_context(op, request, context)
                    answer = await handler.stream_unary(_iterate(batch), context.as_grpc())
                else:
                    message = _message(op, request_type, request, body)
                    answer = await handler.unary_unary(message, context.as_grpc())
            except http_calls.RefusedError as refused:
                return http_calls.error_response(refused)
            except errors.MemspaceError as err:
                return http_calls.error_response(http_calls.RefusedError.of(err))
            return responses.JSONResponse(http_calls.to_json(answer))

        return endpoint

    def _batch_context(
        self, op: Operation, request: requests.Request, context: http_calls.CallContext
    ) -> http_calls.CallContext:
        """The batch's context with the space in its metadata: over gRPC a stream's metadata or
        its first message names the space, and an empty batch has no first message. A header
        that names another space than the path is the same refusal as over gRPC."""
        named = [value for key, value in context.invocation_metadata() if key == wire.SPACE_KEY]
        path = request.path_params["space"]
        space = self._router.select(spaces_routing.POLICIES[_full(op)].scope, named, path)
        if named:
            return context
        return http_calls.CallContext(
            [*context.invocation_metadata(), (wire.SPACE_KEY, space or path)]
        )

    async def _body(self, op: Operation, request: requests.Request) -> Any:
        if op.body is Body.NONE:
            return None
        limit = self._max_batch_body if op.body is Body.MEMORIES else self._max_body
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise errors.LimitReachedError(
                    f"the request body is over {limit} bytes, the most this server accepts "
                    "for this call"
                )
        if not data.strip():
            if op.body is Body.FIELDS:
                return {}
            raise errors.InvalidArgumentError("the request needs a JSON body")
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as err:
            raise errors.InvalidArgumentError(f"the request body is not JSON: {err}") from err


class _Asgi:
    """An ASGI app as a Route's endpoint (Starlette calls a plain function with a Request)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def _full(op: Operation) -> str:
    return f"/memspace.v1.{op.service}/{op.method}"


async def _iterate(messages: list[pb.RememberRequest]) -> AsyncIterator[pb.RememberRequest]:
    for message in messages:
        yield message


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise errors.InvalidArgumentError(f"{what} must be a JSON object")
    return value


def _parse(value: Any, message: protobuf_message.Message, what: str) -> None:
    try:
        json_format.ParseDict(_object(value, what), message)
    except json_format.ParseError as err:
        raise errors.InvalidArgumentError(f"{what}: {err}") from err
    except (ValueError, TypeError, OverflowError, RecursionError) as err:
        # ParseDict lets a few conversions through unwrapped (a huge number, say).
        raise errors.InvalidArgumentError(f"{what}: {err}") from err


def _message(
    op: Operation, request_type: Any, request: requests.Request, body: Any
) -> protobuf_message.Message:
    message = request_type()
    if op.body is Body.FIELDS:
        named = sorted(set(_object(body, "the request body")) & {*op.path_fields, "space"})
        if named:
            raise errors.InvalidArgumentError(
                f"the body names {', '.join(named)}: these come from the path (the space also "
                "from the X-Memory-Space header), never from the body"
            )
        _parse(body, message, "the request body")
    elif op.body is Body.MEMORY:
        _parse(body, message.memory, "the memory in the request body")
    for field in op.path_fields:
        setattr(message, field, request.path_params[field])
    for field in op.query:
        value = request.query_params.get(field)
        if value is not None:
            setattr(message, field, http_calls.uint64(value, f"query parameter {field}"))
    return cast("protobuf_message.Message", message)


def _batch(op: Operation, request: requests.Request, body: Any) -> list[pb.RememberRequest]:
    found = _object(body, "the request body")
    unknown = sorted(set(found) - {"memories"})
    if unknown:
        raise errors.InvalidArgumentError(
            f'the body has unknown fields {", ".join(unknown)}: give {{"memories": [...]}}'
        )
    memories = found.get("memories")
    if not isinstance(memories, list):
        raise errors.InvalidArgumentError('the body must be {"memories": [Memory, ...]}')
    space = request.path_params["space"]
    batch = []
    for i, item in enumerate(memories):
        message = pb.RememberRequest(space=space)
        _parse(item, message.memory, f"memories[{i}]")
        batch.append(message)
    return batch


async def _http_exception(request: requests.Request, exc: Exception) -> responses.Response:
    """No route for the path (404) or the verb (405): the JSON error body of every refusal."""
    status = getattr(exc, "status_code", 404)
    code = grpc.StatusCode.NOT_FOUND if status == 404 else grpc.StatusCode.UNIMPLEMENTED
    message = (
        f"no such path: {request.url.path[:200]!r} (see /openapi.json)"
        if status == 404
        else f"{request.method} is not allowed on {request.url.path[:200]!r} (see /openapi.json)"
    )
    headers = getattr(exc, "headers", None)
    return responses.JSONResponse(
        {"code": code.name, "message": message}, status_code=status, headers=headers
    )
