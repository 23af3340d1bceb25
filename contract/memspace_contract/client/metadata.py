"""Client interceptors that put a client's `x-memory-space` and `authorization` metadata on every
call of a channel, so that raw stubs over it (`client.memories`, `client.spaces`) carry them too.
The client's values win over the same keys given per call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

Pairs = tuple[tuple[str, str], ...]


def _merged(given: Any, extra: Pairs) -> list[tuple[str, str]]:
    keys = {key for key, _ in extra}
    kept = [(key, value) for key, value in given or () if key not in keys]
    return [*kept, *extra]


def _aio_details(details: grpc.aio.ClientCallDetails, extra: Pairs) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*_merged(details.metadata, extra))
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        metadata,
        details.credentials,
        details.wait_for_ready,
    )


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, metadata: Pairs) -> None:
        self._metadata = metadata

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._metadata), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, metadata: Pairs) -> None:
        self._metadata = metadata

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._metadata), request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, metadata: Pairs) -> None:
        self._metadata = metadata

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_aio_details(details, self._metadata), requests)


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, metadata: Pairs) -> None:
        self._metadata = metadata

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_aio_details(details, self._metadata), requests)


def interceptors(metadata: Sequence[tuple[str, str]]) -> list[Any]:
    """grpc.aio interceptors adding `metadata` to every call (grpc.aio files each interceptor
    under one call shape only: one per shape)."""
    pairs = tuple(metadata)
    return [
        _AioUnaryUnary(pairs),
        _AioUnaryStream(pairs),
        _AioStreamUnary(pairs),
        _AioStreamStream(pairs),
    ]


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = tuple(metadata)
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class SyncInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """The same for a synchronous channel (`grpc.intercept_channel`): one object, every shape."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _SyncDetails(details, _merged(details.metadata, self._metadata))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)
