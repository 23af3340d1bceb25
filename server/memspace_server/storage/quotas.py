"""Per-space quotas: a token bucket for writes per second."""

from __future__ import annotations

import time

from memspace_server import errors


class TokenBucket:
    """Allows `rate` writes per second on average, bursts up to one second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self._tokens = self.capacity
        self._clock = time.monotonic
        self._last = self._clock()

    def take(self, count: int = 1) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if count > self._tokens:
            wait = (count - self._tokens) / self.rate
            raise errors.RateLimitedError(
                f"write rate above this space's quota of {self.rate:g} writes per second; "
                f"retry in {wait:.2f} s"
            )
        self._tokens -= count
