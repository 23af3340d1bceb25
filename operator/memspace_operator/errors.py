"""The operator's errors, defined once. Each says whether a retry helps; the handlers map them
to kopf (TemporaryError with a delay, PermanentError) in one place.

    OperatorError
    ├── TemporaryError          a retry helps (API unavailable, conflict, not ready yet)
    │   └── ApiError            an answer of the Kubernetes API (status, reason, message)
    │       ├── NotFoundError           404
    │       ├── ConflictError           409 Conflict (stale resourceVersion)
    │       ├── AlreadyExistsError      409 AlreadyExists
    │       ├── ForbiddenError          403: RBAC is missing a rule; retried slowly
    │       ├── InvalidError            422: the object was refused (see PermanentError)
    │       └── GoneError               410: a watch's resourceVersion is too old
    ├── SecretNotOwnedError     a Secret of the credentials' name that memspace did not make
    └── PermanentError          no retry helps until the MemorySpace changes
        ├── InvalidSpecError    the spec cannot be used (the schema should have caught it)
        └── ClassLimitError     the spec asks for more than its MemorySpaceClass allows

`reason` is the CamelCase reason shown in conditions and Events.
"""

from __future__ import annotations


class OperatorError(Exception):
    reason: str = "ReconcileError"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class TemporaryError(OperatorError):
    """A retry helps; `delay` is the least time worth waiting (seconds)."""

    reason = "Retrying"

    def __init__(self, message: str, *, reason: str | None = None, delay: float = 5.0) -> None:
        super().__init__(message, reason=reason)
        self.delay = delay


class ApiError(TemporaryError):
    reason = "ApiError"

    def __init__(self, status: int, api_reason: str, message: str, *, delay: float = 5.0) -> None:
        super().__init__(f"{status} {api_reason}: {message}", delay=delay)
        self.status = status
        self.api_reason = api_reason
        self.api_message = message


class NotFoundError(ApiError):
    reason = "NotFound"


class ConflictError(ApiError):
    reason = "Conflict"


class AlreadyExistsError(ApiError):
    reason = "AlreadyExists"


class ForbiddenError(ApiError):
    reason = "Forbidden"


class InvalidError(ApiError):
    reason = "Invalid"


class GoneError(ApiError):
    reason = "Expired"


class SecretNotOwnedError(OperatorError):
    """The credentials Secret's name is taken by a Secret memspace cannot prove it made; it is
    left alone, and the space waits (re-checked at every resync) until it is gone."""

    reason = "SecretNotOwned"


class PermanentError(OperatorError):
    """No retry helps until the MemorySpace changes; reported in the Ready condition."""

    reason = "Failed"


class InvalidSpecError(PermanentError):
    reason = "InvalidSpec"


class ClassLimitError(PermanentError):
    """The spec asks for more than its MemorySpaceClass allows (or names a class that does not
    exist); re-checked at every resync, so a class raised by the platform admin takes effect."""

    reason = "ClassLimitExceeded"


def api_error(status: int, body: object) -> ApiError:
    """The error for an HTTP answer of the API server (a Status object, or anything else)."""
    reason, message = "", ""
    if isinstance(body, dict):
        reason = str(body.get("reason") or "")
        message = str(body.get("message") or "")
    elif body:
        message = str(body)[:500]
    if status == 409 and reason == "AlreadyExists":
        return AlreadyExistsError(status, reason, message)
    kind, default_reason, delay = _BY_STATUS.get(
        status, (ApiError, "Error", 5.0 if status >= 500 else 10.0)
    )
    return kind(status, reason or default_reason, message, delay=delay)


_BY_STATUS: dict[int, tuple[type[ApiError], str, float]] = {
    404: (NotFoundError, "NotFound", 5.0),
    409: (ConflictError, "Conflict", 1.0),
    403: (ForbiddenError, "Forbidden", 60.0),
    422: (InvalidError, "Invalid", 60.0),
    410: (GoneError, "Expired", 0.0),
}
