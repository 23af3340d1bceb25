"""What an HTTP call is to the edge: its metadata in (`CallContext`, standing in for grpc.aio's
servicer context, whose methods the edge uses), its status out (`RefusedError`, answered as JSON
with the HTTP status of `errors_map.HTTP_STATUS`), and protobuf messages as proto3 JSON."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn, cast

import grpc
from google.protobuf import json_format
from google.protobuf import message as protobuf_message
from starlette import responses

from memspace_server import errors
from memspace_server.api import errors_map


class RefusedError(Exception):
    """A call the edge answered with a gRPC status other than OK."""

    def __init__(
        self, code: grpc.StatusCode, message: str, trailers: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = dict(trailers)

    @classmethod
    def of(cls, err: errors.MemspaceError) -> RefusedError:
        return cls(errors_map.code_for(err), str(err), errors_map.trailers_for(err))


class CallContext:
    """What the edge asks of a grpc.aio servicer context, for a call that came over HTTP: the
    call's metadata in, and its status out (`abort` raises `RefusedError`)."""

    transport = "http"
    """For the call's span (`tracing`)."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)
        self._trailers: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def set_trailing_metadata(self, trailers: Iterable[tuple[str, str]]) -> None:
        self._trailers = tuple(trailers)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise RefusedError(code, details, self._trailers)

    def code(self) -> grpc.StatusCode | None:
        return None

    def as_grpc(self) -> grpc.aio.ServicerContext[Any, Any]:
        # The edge uses only the methods above.
        return cast("grpc.aio.ServicerContext[Any, Any]", self)


def error_body(refused: RefusedError) -> dict[str, Any]:
    body: dict[str, Any] = {"code": refused.code.name, "message": refused.message}
    retry = refused.trailers.get(errors_map.RETRY_AFTER_KEY)
    if retry is not None:
        body["retry_after_s"] = float(retry)
    resume = refused.trailers.get(errors_map.RESUME_LSN_KEY)
    if resume is not None:
        body["resume_lsn"] = resume
    return body


def error_response(refused: RefusedError) -> responses.JSONResponse:
    body = error_body(refused)
    headers = {}
    if "retry_after_s" in body:
        headers["Retry-After"] = str(max(1, math.ceil(body["retry_after_s"])))
    return responses.JSONResponse(
        body, status_code=errors_map.http_status(refused.code), headers=headers
    )


def to_json(message: protobuf_message.Message) -> dict[str, Any]:
    """A message in the proto3 JSON mapping, with the .proto's field names (64-bit integers as
    strings, timestamps as RFC 3339, every field without presence shown)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def uint64(value: str, what: str) -> int:
    if not value.isdigit() or int(value) >= 2**64:
        raise errors.InvalidArgumentError(f"{what} must be a whole number 0..2^64-1, not {value!r}")
    return int(value)
