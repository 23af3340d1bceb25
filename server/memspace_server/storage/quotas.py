"""Per-space quotas: token buckets for writes and for recalls per second."""

from __future__ import annotations

import time
from collections.abc import Callable

from memspace_server import errors, queueing


class TokenBucket:
    """Allows `rate` operations per second on average, bursts up to one second's worth.

    A request larger than the burst (a RememberBatch of more memories than one second's quota)
    is admitted by debt: it waits until the bucket is full, takes every token it needs and leaves
    the bucket below zero, so the requests after it wait until the debt is paid. Over any long
    window the rate stays at `rate`, and no request is refused forever."""

    def __init__(self, rate: float, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.what = what
        """What is counted, as the refusal names it ("writes", "recalls")."""
        self.capacity = max(1.0, rate)
        self._clock = clock
        self._tokens = self.capacity
        self._last = self._clock()

    def take(self, count: int = 1) -> None:
        """Take `count` tokens or raise RateLimitedError saying when to retry."""
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        needed = min(float(count), self.capacity)
        if needed > self._tokens:
            wait = (needed - self._tokens) / self.rate
            # The edge's turns keep this call's turn meanwhile (`queueing`).
            queueing.refused(wait)
            raise errors.RateLimitedError(
                f"{self.what} above this space's quota of {self.rate:g} {self.what} per second; "
                f"retry in {wait:.2f} s",
                retry_after_s=wait,
            )
        self._tokens -= count
