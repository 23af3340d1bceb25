"""`make bench` notes how much CPU time the host took from this machine during each suite (steal),
which its load average does not show, and lets the load the suite before left settle first."""

from __future__ import annotations

from benchmarks import run

STAT = """cpu  100 5 20 800 10 0 5 60 7 0
cpu0 50 2 10 400 5 0 2 30 3 0
intr 12345
"""


def test_ticks_are_read_from_the_first_line() -> None:
    # user nice system idle iowait irq softirq steal (guest time is counted in user already)
    assert run.cpu_ticks(STAT) == (100 + 5 + 20 + 800 + 10 + 0 + 5 + 60, 60)


def test_steal_is_the_share_of_every_tick_between_two_readings() -> None:
    assert run.steal_pct((1000, 100), (2000, 350)) == 25.0
    assert run.steal_pct((1000, 100), (1000, 100)) == 0.0


def test_an_unreadable_stat_gives_no_ticks() -> None:
    assert run.cpu_ticks("intr 1\n") == (0, 0)
    assert run.cpu_ticks("") == (0, 0)


def test_this_machine_counts_ticks() -> None:
    total, stolen = run.cpu_ticks()
    assert total > 0
    assert 0 <= stolen <= total


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_suite_waits_for_the_load_the_one_before_left_to_fall() -> None:
    clock = Clock()
    loads = iter([2.5, 2.0, 1.4, 9.0])
    assert run.settle(60.0, lambda: next(loads), clock.sleep, clock) == 1.4
    assert clock.now == 2 * run.SETTLE_POLL_S


def test_a_suite_waits_no_longer_than_its_limit_for_a_busy_machine() -> None:
    clock = Clock()
    assert run.settle(10.0, lambda: 3.0, clock.sleep, clock) == 3.0
    assert 10.0 <= clock.now < 10.0 + run.SETTLE_POLL_S * 2


def test_a_quiet_machine_starts_at_once() -> None:
    clock = Clock()
    assert run.settle(60.0, lambda: 0.3, clock.sleep, clock) == 0.3
    assert clock.now == 0.0
