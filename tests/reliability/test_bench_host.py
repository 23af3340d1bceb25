"""`make bench` notes how much CPU time the host took from this machine during each suite (steal),
which its load average does not show."""

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
