"""The one table from domain errors to gRPC status codes (design section 5), applied to every RPC
by `handling`. Every class of `memspace_server.errors` is listed, so adding an error without
choosing its code fails a test. Anything else is a bug: INTERNAL, with nothing of it sent."""

from __future__ import annotations

import grpc

from memspace_contract import wire
from memspace_server import errors

TABLE: dict[type[errors.MemspaceError], grpc.StatusCode] = {
    errors.MemspaceError: grpc.StatusCode.UNKNOWN,
    # A request that can never succeed as sent: bad ID, bad vector, k, content, tags.
    errors.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidSpaceIdError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidMemoryError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.SpaceNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.MemoryNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.BackupNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.QuotaExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # The message says when to retry (also in trailing metadata).
    errors.RateLimitedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.LimitReachedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DiskFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # The message names the LSN to resubscribe from (also in trailing metadata).
    errors.SubscriberTooSlowError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SpaceInactiveError: grpc.StatusCode.FAILED_PRECONDITION,
    # The message names the state (Offloaded, or being offloaded): set the space Active again.
    errors.SpaceOffloadedError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SpaceSealedError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ManagedIndexError: grpc.StatusCode.FAILED_PRECONDITION,
    # Not ALREADY_EXISTS: creating an existing space with the same settings succeeds; only a
    # different configuration is refused, and the system is not in the state it needs.
    errors.SpaceConflictError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.LsnNotRetainedError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SpaceRefusedError: grpc.StatusCode.FAILED_PRECONDITION,
    # A restore that would serve partial or corrupt data, or overwrite a space: nothing changed.
    errors.BackupRefusedError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.IdentityMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.CorruptWalError: grpc.StatusCode.FAILED_PRECONDITION,
    # Being mounted, reloaded or drained: clients retry.
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.SubscriptionEndedError: grpc.StatusCode.UNAVAILABLE,
    # The object store failed or is unreachable; a retried backup uploads only what is missing.
    errors.ObjectStoreError: grpc.StatusCode.UNAVAILABLE,
    errors.DataRootInUseError: grpc.StatusCode.UNAVAILABLE,
    # A restore fills the space's volume: it serves once the restore is done.
    errors.SpaceRestoringError: grpc.StatusCode.UNAVAILABLE,
    # Subscribe again from the LSN in the message and in trailing metadata.
    errors.ResumableError: grpc.StatusCode.UNAVAILABLE,
}

INTERNAL_MESSAGE = "internal error (request {request_id}); the server log has the details"
RETRY_AFTER_KEY = wire.RETRY_AFTER_KEY
"""Trailing metadata of a call refused by a rate quota: seconds until a retry can succeed."""
RESUME_LSN_KEY = wire.RESUME_LSN_KEY
"""Trailing metadata of a Subscribe stream that ended early: the since_lsn to resume from."""


def code_for(err: errors.MemspaceError) -> grpc.StatusCode:
    """The status code of a domain error: its class's entry, else its nearest base's."""
    for cls in type(err).__mro__:
        code = TABLE.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.UNKNOWN


def trailers_for(err: errors.MemspaceError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata a client can act on: when to retry, where to resume a stream."""
    found = []
    retry = getattr(err, "retry_after_s", None)
    if retry is not None:
        found.append((RETRY_AFTER_KEY, f"{retry:.3f}"))
    if isinstance(err, errors.ResumableError):
        found.append((RESUME_LSN_KEY, str(err.resume_lsn)))
    return tuple(found)


HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    # Quotas, rate limits, caps on calls and sizes: the body and Retry-After say what to do.
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    # The request is valid but the space or server is not in the state it needs (a space of
    # another configuration, an LSN no longer retained, a managed server's CreateSpace).
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
"""The one table from gRPC status codes to HTTP statuses, for the HTTP/JSON front: a call over
HTTP fails with the status its gRPC twin's code maps to here, and the same message."""


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS[code]
