"""The edge every RPC goes through: one wrapper per call shape, applied to every method of every
memspace.v1 service when the handlers are built (see `method_handlers`).

One call scope (`Edge._scope`; inline in `_unary`, the shape of most calls) does for every call
what the shapes share: it binds the log context, counts the call in flight, maps any error
through the one table (`errors_map`) and observes the call in the metrics. Inside it each shape
routes the call (space selection and auth, `routing`, with one index lookup), which also admits
it under the caps on calls and streams (`limits`), and runs the servicer with the resulting
`Call`. Servicers never do any of this themselves.

A handler wrapper, not grpc.aio server interceptors: an interceptor is one more awaitable layer
per call, and every unary call's steps here are plain calls but for its turn (`sharing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf import descriptor
from google.protobuf import message as protobuf_message

from memspace_contract import index, spaces, wire
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_server import errors, queueing, spans
from memspace_server.api import errors_map, limits, logs, routing, sharing, tracing
from memspace_server.api.metrics import Metrics

log = logging.getLogger(__name__)

_QUIET_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


@dataclasses.dataclass(frozen=True)
class Call:
    """What a servicer learns about its call: the route decided at the edge (the space, its
    index entry as the router found it, whether the admin token opened it). Servicers never
    see the grpc context: what they tell the client travels on their answer or their error."""

    route: routing.Route

    @property
    def space(self) -> spaces.SpaceId:
        return self.route.require_space()

    @property
    def entry(self) -> index.IndexEntry | None:
        return self.route.entry


Unary = Callable[[Any, Call], Awaitable[Any]]
StreamIn = Callable[[AsyncIterator[Any], Call], Awaitable[Any]]
StreamOut = Callable[[Any, Call], AsyncGenerator[Any, None]]


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def services() -> list[descriptor.ServiceDescriptor]:
    return list(pb.DESCRIPTOR.services_by_name.values())


def full_method(service: descriptor.ServiceDescriptor, method: descriptor.MethodDescriptor) -> str:
    return f"/{service.full_name}/{method.name}"


class Edge:
    def __init__(
        self,
        router: routing.Router,
        metrics: Metrics,
        caps: limits.Limits,
        turns: sharing.Turns | None = None,
    ) -> None:
        self.router = router
        self.metrics = metrics
        self.limits = caps
        self.turns = turns
        self._ids = itertools.count(1)
        self._prefix = os.urandom(3).hex()
        self.in_flight = 0
        self.refusing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_call = time.monotonic()

    # -- draining ------------------------------------------------------------------------------

    def refuse_new_calls(self) -> None:
        """From now on answer every new call UNAVAILABLE (clients retry); in-flight calls go on.
        Refusing here rather than in grpc's shutdown gives clients a retryable status instead
        of CANCELLED for calls that arrive while the server drains."""
        self.refusing = True

    async def quiesce(self, grace_s: float) -> bool:
        """Wait until no call is in flight; False if some still are after `grace_s` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            return False
        return True

    def quiet_for(self) -> float:
        """Seconds since the last call arrived, if none is in flight now; else 0."""
        return 0.0 if self.in_flight else time.monotonic() - self._last_call

    def _enter(self) -> None:
        if self.refusing:
            raise errors.UnavailableError("the server is draining; retry shortly")
        self.in_flight += 1
        self._last_call = time.monotonic()
        self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    # -- building handlers ---------------------------------------------------------------------

    def method_handlers(
        self, service: descriptor.ServiceDescriptor, servicer: object
    ) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        """One handler per method of `service`, each wrapped by this edge. A method without a
        routing policy or without a servicer method is a startup error, never a silent gap."""
        handlers = {}
        for method in service.methods:
            full = full_method(service, method)
            policy = routing.POLICIES[full]
            behavior = getattr(servicer, snake_case(method.name))
            request_type = getattr(pb, method.input_type.name)
            response_type = getattr(pb, method.output_type.name)
            names_space = "space" in method.input_type.fields_by_name
            short = f"{service.name}/{method.name}"
            kwargs: dict[str, Any] = {
                "request_deserializer": _deserializer(request_type),
                "response_serializer": response_type.SerializeToString,
            }
            if method.client_streaming and method.server_streaming:
                raise NotImplementedError(f"{full}: bidirectional streams have no wrapper yet")
            if method.client_streaming:
                handler = grpc.stream_unary_rpc_method_handler(
                    self._stream_in(short, policy, behavior), **kwargs
                )
            elif method.server_streaming:
                handler = grpc.unary_stream_rpc_method_handler(
                    self._stream_out(short, policy, behavior, names_space), **kwargs
                )
            else:
                handler = grpc.unary_unary_rpc_method_handler(
                    self._unary(short, policy, behavior, names_space), **kwargs
                )
            handlers[method.name] = handler
        return handlers

    # -- per call ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _scope(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], shape: limits.Shape
    ) -> AsyncIterator[_Scope]:
        """One streaming call from arrival to answer (`_begin`, then `_settle` on an error and
        `_end`). Unary calls, the many short ones, do the same steps inline (`_unary`): a
        context manager costs each of them two more awaitables."""
        scope = self._begin(method, context, shape)
        try:
            scope.read_metadata(method, context, self._request_id)
            self._enter()
            scope.entered = True
            yield scope
        except BaseException as err:
            # Counted before the refusal is sent: a client that sees it finds it counted.
            self._end(scope, method, _outcome(err, context))
            await self._settle(err, method, context)
            raise
        self._end(scope, method, "OK")

    def _begin(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], shape: limits.Shape
    ) -> _Scope:
        """A call arrives: its scope, timed from now, its span started (tracing on)."""
        scope = _Scope(self.router, self.limits, shape)
        if spans.ENABLED:
            scope.traced = tracing.start_call(method, context)
        return scope

    async def _settle(
        self, err: BaseException, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Answer a call that raised `err` through the one table (`_fail`, which raises);
        nothing for an abort already sent or a cancelled call (the caller re-raises those)."""
        if isinstance(err, Exception) and not isinstance(err, grpc.aio.AbortError):
            await self._fail(err, method, context)

    def _end(self, scope: _Scope, method: str, code: str) -> None:
        """The call is over: release its turn and caps, count it out, observe it in the
        metrics (streams are not timed) and end its span."""
        scope.release()
        if scope.entered:
            self._leave()
        timed = scope.shape is not limits.Shape.SERVER_STREAM
        elapsed = time.perf_counter() - scope.started if timed else None
        label = scope.label()
        self.metrics.observe(label, method, code, elapsed)
        if scope.waited:
            self.metrics.waited(label, scope.waited)
        if scope.traced is not None:
            scope.traced.end(label, code)

    def _request_id(self) -> str:
        return f"{self._prefix}-{next(self._ids):x}"

    async def _fail(
        self, err: Exception, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> NoReturn:
        """Answer the call with the status of `err`; never returns."""
        if isinstance(err, errors.MemspaceError):
            code = errors_map.code_for(err)
            trailers = errors_map.trailers_for(err)
            if trailers:
                context.set_trailing_metadata(trailers)
            level = logging.DEBUG if code in _QUIET_CODES else logging.INFO
            log.log(level, "%s: %s", code.name, err)
            await context.abort(code, str(err))
        log.error("unexpected error in %s", method, exc_info=err)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            errors_map.INTERNAL_MESSAGE.format(request_id=logs.request_id()),
        )

    def _unary(
        self, method: str, policy: routing.Policy, behavior: Unary, names_space: bool
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        turns = self.turns

        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            # `_scope` inline (see there): the steps of every call, without its two awaitables.
            scope = self._begin(method, context, limits.Shape.UNARY)
            try:
                scope.read_metadata(method, context, self._request_id)
                self._enter()
                scope.entered = True
                _check_parsed(request)
                call = scope.route(policy, request.space if names_space else "")
                space = call.route.space
                if turns is not None and space is not None:
                    await scope.take_turn(turns, space)
                answer = await behavior(request, call)
            except BaseException as err:
                # Counted before the refusal is sent: a client that sees it finds it counted.
                self._end(scope, method, _outcome(err, context))
                await self._settle(err, method, context)
                raise
            self._end(scope, method, "OK")
            return answer

        return handle

    def _stream_in(
        self, method: str, policy: routing.Policy, behavior: StreamIn
    ) -> Callable[[AsyncIterator[Any], grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        async def handle(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            async with self._scope(method, context, limits.Shape.CLIENT_STREAM) as scope:
                first = None
                if not scope.named:
                    # Without metadata the first message names the space: read it first.
                    first = _check_parsed(await anext(aiter(requests), None))
                call = scope.route(policy, first.space if first is not None else "")
                stream = _same_space(first, requests, call.route.space or "")
                return await behavior(stream, call)

        return handle

    def _stream_out(
        self, method: str, policy: routing.Policy, behavior: StreamOut, names_space: bool
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
        async def handle(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async with self._scope(method, context, limits.Shape.SERVER_STREAM) as scope:
                _check_parsed(request)
                named = request.space if names_space else ""
                call = scope.route(policy, named)
                async with contextlib.aclosing(behavior(request, call)) as out:
                    async for item in out:
                        yield item

        return handle


class _Scope:
    """What the edge learns of one call: the spaces and tokens its metadata names, then its
    route. The route's index entry, looked up once by the router, also picks the call's metric
    label (only spaces in the index become label values)."""

    __slots__ = (
        "_limits",
        "_refused_space",
        "_route",
        "_router",
        "_ticket",
        "_turns",
        "authorization",
        "entered",
        "named",
        "shape",
        "started",
        "traced",
        "waited",
    )

    def __init__(self, router: routing.Router, caps: limits.Limits, shape: limits.Shape) -> None:
        self.started = time.perf_counter()
        self._router = router
        self._limits = caps
        self.shape = shape
        self.entered = False
        """The call counts in flight (`Edge._enter`)."""
        self.traced: tracing.CallSpan | None = None
        self.named: list[str] = []
        self.authorization: list[str] = []
        self._route: routing.Route | None = None
        self._ticket: limits.Ticket | None = None
        self._turns: sharing.Turns | None = None
        self._refused_space: str | None = None
        self.waited = 0.0
        """Seconds the call waited for its turn (0: it started at once)."""

    def read_metadata(
        self,
        method: str,
        context: grpc.aio.ServicerContext[Any, Any],
        new_request_id: Callable[[], str],
    ) -> None:
        """Note the spaces and tokens the call's metadata names; bind its log context."""
        request_id = ""
        for key, value in context.invocation_metadata() or ():
            if key == wire.SPACE_KEY:
                self.named.append(str(value))
            elif key == wire.AUTHORIZATION_KEY:
                self.authorization.append(str(value))
            elif key == wire.REQUEST_ID_KEY:
                request_id = str(value)[:64]
        logs.bind("", method, request_id or new_request_id())

    def route(self, policy: routing.Policy, named_in_request: str) -> Call:
        """Route the call, then admit it under the caps on calls and streams (the per-space
        caps need its space; a refused route takes no slot)."""
        try:
            self._route = self._router.route(
                policy, self.named, named_in_request, self.authorization
            )
        except errors.MemspaceError:
            # A refused call (a wrong token, say) still counts under the space it names when
            # that space is in the index: its refusals belong to its series, not to "".
            self._refused_space = self._router.known_space(policy, self.named, named_in_request)
            raise
        logs.bind_space(self._route.space or "")
        self._ticket = self._limits.admit(self.shape, self._route.space)
        return Call(self._route)

    async def take_turn(self, turns: sharing.Turns, space: str) -> None:
        """Wait for the call's turn among the unary calls at work (`sharing`). The storage
        engine hands the turn on before it waits for an fsync (`queueing.give_back`)."""
        begun = time.perf_counter()
        if await turns.enter(space):
            self.waited = time.perf_counter() - begun
        self._turns = turns
        queueing.hold(self._leave_turn)

    def _leave_turn(self) -> None:
        if self._turns is not None and self._route is not None and self._route.space:
            self._turns.leave(self._route.space)
        self._turns = None

    def release(self) -> None:
        self._leave_turn()
        if self._ticket is not None:
            self._ticket.release()

    def label(self) -> str:
        route = self._route
        if route is None:
            return self._refused_space or ""
        if route.space is None or route.entry is None:
            return ""
        return route.space


async def _same_space(first: Any, rest: AsyncIterator[Any], space: str) -> AsyncIterator[Any]:
    """The messages of a client stream, each checked to name the stream's space or none."""
    if first is not None:
        yield first
    async for message in rest:
        _check_parsed(message)
        if message.space and message.space != space:
            raise errors.InvalidArgumentError(
                f"a message of this stream names space {message.space[:80]!r}, the stream "
                f"{space[:80]!r}: every message of a stream names the same space, or none"
            )
        yield message


class _Unparsed:
    """The bytes of a request that do not parse as its message type. The deserializer hands it
    to the edge, which answers INVALID_ARGUMENT like any bad request (grpc itself would answer
    UNKNOWN, naming the exception, and log a traceback for every such message)."""

    def __init__(self, type_name: str, reason: str) -> None:
        self.type_name = type_name
        self.reason = reason


def _deserializer(request_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return request_type.FromString(data)
        except protobuf_message.DecodeError as err:
            return _Unparsed(request_type.DESCRIPTOR.full_name, str(err))

    return parse


def _check_parsed(request: Any) -> Any:
    if isinstance(request, _Unparsed):
        raise errors.InvalidArgumentError(
            f"the request is not a valid {request.type_name} message ({request.reason[:200]}); "
            "send a message serialized from memspace.v1"
        )
    return request


def _outcome(err: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The status code name a call that raised `err` ends with (for the metrics and spans)."""
    if isinstance(err, grpc.aio.AbortError):
        return _code_name(context)
    if isinstance(err, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    if isinstance(err, Exception):
        return _error_code_name(err)
    return "OK"


def _error_code_name(err: Exception) -> str:
    if isinstance(err, errors.MemspaceError):
        return errors_map.code_for(err).name
    return grpc.StatusCode.INTERNAL.name


def _code_name(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
