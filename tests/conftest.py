"""Fixtures shared by every test package; the Kubernetes control plane comes as a plugin."""

from __future__ import annotations

import functools
import time

import pytest

pytest_plugins = ["tests.support.cluster"]


class QuotaClock:
    """The clock of the rate quotas' token buckets in a test: it stands still (calls count, not
    the time they take) until the test moves it on, or lets it follow the real clock."""

    def __init__(self) -> None:
        self._now = time.monotonic()
        self._following = False

    def __call__(self) -> float:
        if self._following:
            self._now = max(self._now, time.monotonic())
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def follow(self) -> None:
        """From now on, the real clock (never going back)."""
        self._following = True


@pytest.fixture
def quota_clock(monkeypatch: pytest.MonkeyPatch) -> QuotaClock:
    """Every token bucket made during the test (in this process) reads this clock. A rate test
    on the real clock depends on the machine's speed: five writes, an fsync each, can take more
    than the fifth of a second that refills a token of a 5-per-second quota on a loaded machine,
    and the sixth is then admitted."""
    from memspace_server.storage import quotas  # noqa: PLC0415  # only the tests that use it

    clock = QuotaClock()
    monkeypatch.setattr(quotas, "TokenBucket", functools.partial(quotas.TokenBucket, clock=clock))
    return clock
