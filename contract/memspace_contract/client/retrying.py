"""When the client tries a call again, and after how long: the same rules for the sync and the
asyncio flavour.

- UNAVAILABLE (a space being mounted, a shard draining or restarting, a connection refused or
  dropped): again after an exponential backoff with jitter, while the policy's attempts and time
  last. Only idempotent calls are retried; the client makes every call it retries idempotent
  (Remember and RememberBatch carry client-made memory IDs, so a second attempt replaces the first).
- RESOURCE_EXHAUSTED with the trailer `memspace-retry-after-s` (a rate quota): again after the
  delay the server gave, when that still fits in the policy's time.
- Anything else is the caller's to handle: the error is raised as grpc gave it.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any

import grpc

from memspace_contract import wire


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How long the client keeps trying a call that failed for a reason that passes."""

    attempts: int = 12
    """Tries in all, the first one included (1: never retry)."""
    initial_backoff_s: float = 0.1
    """The wait before the second try; each next wait is `multiplier` times longer."""
    multiplier: float = 2.0
    max_backoff_s: float = 5.0
    """No single wait is longer: a shard restart takes seconds, not minutes."""
    total_s: float = 60.0
    """No retry starts this long after the first try: long enough for a shard to drain and
    restart (its pod rescheduled, its volumes mounted again)."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.total_s < 0:
            raise ValueError("RetryPolicy times must not be negative")

    def backoff(self, attempt: int) -> float:
        """The wait after failed try number `attempt` (1-based): full jitter under the
        exponential bound."""
        bound = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return random.uniform(bound / 2, bound)  # noqa: S311  # jitter, not a secret


NO_RETRY = RetryPolicy(attempts=1)


def _trailers(err: Any) -> dict[str, str]:
    try:
        pairs = err.trailing_metadata() or ()
    except (AttributeError, TypeError):
        return {}
    return {str(key): str(value) for key, value in pairs}


def retry_after(err: Any) -> float | None:
    """The seconds a rate-refused call says to wait (`memspace-retry-after-s`), if it says."""
    value = _trailers(err).get(wire.RETRY_AFTER_KEY)
    try:
        return None if value is None else max(0.0, float(value))
    except ValueError:
        return None


def resume_lsn(err: Any) -> wire.Lsn | None:
    """The LSN a Subscribe stream that ended early says to resume from
    (`memspace-resume-lsn`), if it says."""
    value = _trailers(err).get(wire.RESUME_LSN_KEY)
    try:
        return None if value is None else wire.Lsn(int(value))
    except ValueError:
        return None


def wait_before_retry(
    err: grpc.RpcError, policy: RetryPolicy, attempt: int, started: float
) -> float | None:
    """Seconds to wait before trying again after failed try number `attempt` that began its
    first try at `started` (time.monotonic); None: do not retry, raise."""
    if attempt >= policy.attempts:
        return None
    code = err.code() if hasattr(err, "code") else None
    if code == grpc.StatusCode.UNAVAILABLE:
        wait = policy.backoff(attempt)
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        after = retry_after(err)
        if after is None:
            return None
        wait = after
    else:
        return None
    if time.monotonic() + wait - started > policy.total_s:
        return None
    return wait
