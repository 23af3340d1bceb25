"""The plaintext health-only port (`--health-listen`) for the kubelet's gRPC probes, opened
first at a start, before the server's own modules are imported.

Until the server serves, a Check waits for it (up to the call's deadline, less a margin, or
HOLD_S without one) and then answers what the server's health says; past that it answers
NOT_SERVING. So a probe sent while the server starts passes the moment the server serves,
instead of failing and leaving the pod out of its Service for up to a probe period more; and
it never passes before: the answer is the server's own health (NOT_SERVING again from its drain
on). Once attached, every call goes to the server's grpc.health.v1 servicer.

Imports grpc and grpc_health only: a start opens this port within a few hundred milliseconds.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HOLD_S = 10.0
"""Longest a Check without a deadline waits for the server to serve."""
MARGIN_S = 0.2
"""A held Check answers this long before its deadline (the caller then gets an answer, not
DEADLINE_EXCEEDED, even when a busy loop sends it late: 50 ms was seen missed at load 9)."""


class _Starting(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # untyped stubs
    """grpc.health.v1 of a server that may not serve yet: calls wait for `attach`, then go to
    the server's servicer."""

    def __init__(self) -> None:
        self._servicer: Any = None
        self._attached = asyncio.Event()

    def attach(self, servicer: Any) -> None:
        self._servicer = servicer
        self._attached.set()

    async def _wait(self, context: Any) -> bool:
        """Whether the server serves (attached), waiting for it within the call's deadline."""
        if self._servicer is not None:
            return True
        remaining = context.time_remaining()
        hold = HOLD_S if remaining is None else max(0.0, remaining - MARGIN_S)
        try:
            await asyncio.wait_for(self._attached.wait(), hold)
        except TimeoutError:
            return False
        return True

    async def Check(  # noqa: N802  # the name of the gRPC method
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        if not await self._wait(context):
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        response: health_pb2.HealthCheckResponse = await self._servicer.Check(request, context)
        return response

    async def Watch(  # noqa: N802  # the name of the gRPC method
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> None:
        if self._servicer is None:
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            await context.write(health_pb2.HealthCheckResponse(status=not_serving))
            await self._attached.wait()
        await self._servicer.Watch(request, context)


class HealthPort:
    """The health-only port, serving from `start` on; `attach` hands it the server's health."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.port = 0
        self._servicer = _Starting()
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, self._server)

    async def start(self) -> None:
        """Bind and serve; RuntimeError when the address cannot be bound."""
        self.port = self._server.add_insecure_port(self.address)
        await self._server.start()

    def attach(self, servicer: Any) -> None:
        """From now on the server's own grpc.health.v1 servicer answers (call it once the
        server serves: held calls get their answer at once)."""
        self._servicer.attach(servicer)

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)
