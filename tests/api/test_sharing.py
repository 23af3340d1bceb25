"""Turns of unary calls on the event loop while spaces share it: a flooding space's calls beyond
its share wait in their own queue, a quiet space's call starts at once, and a space alone is not
held back. The tests of turns alone turn the share of time off (`share=1`); those of the share
move its clock by hand. The last tests run a real server whose flooding space sends far more
calls than the edge works on."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from memspace_contract import index
from memspace_contract import spaces as spaces_ids
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_server import queueing
from memspace_server.api import metrics, sharing
from tests.api.conftest import Running, Start, md, until, write_entry
from tests.conftest import QuotaClock


class Caller:
    """Calls of one space that take their turn, then wait until the test ends them."""

    def __init__(self, turns: sharing.Turns, space: str, log: list[str]) -> None:
        self.turns = turns
        self.space = space
        self.log = log
        self.ends: list[asyncio.Event] = []

    def call(self) -> asyncio.Task[None]:
        end = asyncio.Event()
        self.ends.append(end)
        label = f"{self.space}-{len(self.ends) - 1}"

        async def run() -> None:
            await self.turns.enter(self.space)
            try:
                self.log.append(label)
                await end.wait()
            finally:
                self.turns.leave(self.space)

        return asyncio.ensure_future(run())

    def end(self, n: int) -> None:
        self.ends[n].set()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def called(turns: sharing.Turns, space: str) -> None:
    """A call of `space` that came and went: the loop is shared with it for a while."""
    await turns.enter(space)
    turns.leave(space)


SHARED_S = 60.0
"""A window in which spaces that called at all share the loop, however slow the machine: a
space that called moments ago must not count as gone when the test's process was descheduled
for longer than the server's own window (half a second) between two of its steps."""


async def test_a_floods_calls_beyond_its_share_wait_but_a_quiet_space_starts_at_once() -> None:
    turns = sharing.Turns(per_space=2, window_s=SHARED_S, share=1)
    started: list[str] = []
    noisy = Caller(turns, "noisy", started)
    quiet = Caller(turns, "quiet", started)
    await called(turns, "quiet")
    flood = [noisy.call() for _ in range(5)]
    await settle()
    assert started == ["noisy-0", "noisy-1"]
    assert turns.waiting("noisy") == 3
    calm = quiet.call()
    await settle()
    # The flood has its share at work and more waiting, yet the quiet space's call starts.
    assert started[-1] == "quiet-0"
    assert turns.working == 3
    quiet.end(0)
    await calm
    # Its end starts none of the flood's: those wait for the flood's own calls to end.
    await settle()
    assert turns.working_on("noisy") == 2
    noisy.end(0)
    await settle()
    assert started[-1] == "noisy-2"
    assert turns.working_on("noisy") == 2
    for n in range(1, 5):
        noisy.end(n)
    await asyncio.gather(*flood)
    assert turns.working == 0
    assert started == ["noisy-0", "noisy-1", "quiet-0", "noisy-2", "noisy-3", "noisy-4"]


async def test_each_space_waits_only_for_its_own_calls() -> None:
    turns = sharing.Turns(per_space=1, window_s=SHARED_S, share=1)
    started: list[str] = []
    a, b = Caller(turns, "a", started), Caller(turns, "b", started)
    await called(turns, "b")
    tasks = [a.call() for _ in range(3)] + [b.call() for _ in range(3)]
    await settle()
    assert started == ["a-0", "b-0"]
    # b's end starts b's next call, however many of a's wait.
    b.end(0)
    await settle()
    assert started == ["a-0", "b-0", "b-1"]
    assert turns.waiting("a") == 2
    for n in range(3):
        a.end(n)
        b.end(n)
    await asyncio.gather(*tasks)
    assert turns.working == 0
    assert sorted(started) == ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2"]


async def test_a_cancelled_waiting_call_leaves_its_queue_and_takes_no_slot() -> None:
    turns = sharing.Turns(per_space=1, window_s=SHARED_S, share=1)
    started: list[str] = []
    a = Caller(turns, "a", started)
    await called(turns, "b")
    first = a.call()
    await settle()
    waiting = a.call()
    await settle()
    assert turns.waiting("a") == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert turns.waiting("a") == 0
    a.end(0)
    await first
    assert turns.working == 0
    third = a.call()
    await settle()
    assert started == ["a-0", "a-2"]
    a.end(2)
    await third
    assert turns.working == 0


async def test_a_space_alone_on_the_loop_is_not_held_back() -> None:
    # The window outlasts a stall of the test between b's call and the checks below.
    turns = sharing.Turns(per_space=1, window_s=1.0, share=1)
    started: list[str] = []
    a = Caller(turns, "a", started)
    alone = [a.call() for _ in range(3)]
    await settle()
    assert turns.working_on("a") == 3
    # Another space calls: from now on a's calls take turns.
    await called(turns, "b")
    queued = [a.call() for _ in range(2)]
    await settle()
    assert turns.waiting("a") == 2
    # b has not called for longer than the window: a is alone again, and its next end starts
    # all of its waiting calls.
    await asyncio.sleep(1.1)
    a.end(0)
    await settle()
    assert turns.waiting("a") == 0
    assert turns.working_on("a") == 4
    for n in range(1, 5):
        a.end(n)
    await asyncio.gather(*alone, *queued)
    assert turns.working == 0


async def test_a_call_refused_for_its_rate_keeps_its_turn_while_spaces_share_the_loop() -> None:
    """A client that ignores RESOURCE_EXHAUSTED and calls again at once waits in its own
    space's queue for the retry-after (at least REFUSED_HOLD_S); alone, its turn goes at once."""
    turns = sharing.Turns(per_space=1, window_s=SHARED_S, share=1)
    await called(turns, "b")

    async def refused_call(space: str) -> None:
        await turns.enter(space)
        queueing.refused(0.01)  # as a space's token bucket does before it refuses
        turns.leave(space)

    await asyncio.ensure_future(refused_call("a"))
    assert turns.working_on("a") == 1  # kept after the call ended
    started = time.monotonic()
    await turns.enter("a")
    assert time.monotonic() - started >= sharing.REFUSED_HOLD_S * 0.9
    turns.leave("a")
    assert turns.working == 0
    # A call that was not refused hands its turn on at once.
    await asyncio.ensure_future(turns.enter("a"))
    turns.leave("a")
    assert turns.working == 0


async def test_a_space_alone_is_not_held_back_after_a_refusal() -> None:
    turns = sharing.Turns(per_space=1, window_s=0.05)

    async def refused_call() -> None:
        await turns.enter("a")
        queueing.refused(1.0)
        turns.leave("a")

    await asyncio.ensure_future(refused_call())
    assert turns.working == 0


def test_turns_need_a_call_at_work_per_space() -> None:
    with pytest.raises(ValueError, match="at least one call at work"):
        sharing.Turns(0)
    with pytest.raises(ValueError, match="share of time"):
        sharing.Turns(1, share=0)
    with pytest.raises(ValueError, match="share of time"):
        sharing.Turns(1, share=1.5)


async def test_a_space_with_calls_waiting_is_held_to_its_share_of_the_time() -> None:
    """Half the time by default: a call of a flooding space that worked 0.2 s beside another
    space spent its burst and 0.05 s more (0.05 + 0.2 * (0.5 - 1)), so its next call waits
    until the credit is back to zero (0.1 s more at 0.5 s a second), however many it sends;
    the quiet space's calls start at once all along."""
    clock = QuotaClock()
    turns = sharing.Turns(per_space=1, window_s=SHARED_S, clock=clock)
    started: list[str] = []
    noisy, quiet = Caller(turns, "noisy", started), Caller(turns, "quiet", started)
    await called(turns, "quiet")
    flood = [noisy.call() for _ in range(3)]
    await settle()
    assert started == ["noisy-0"]
    clock.advance(0.2)
    noisy.end(0)
    await settle()
    assert started == ["noisy-0"]
    assert turns.waiting("noisy") == 2
    assert turns.credit("noisy") == pytest.approx(-0.05)
    clock.advance(0.09)
    calm = quiet.call()
    await settle()
    assert started[-1] == "quiet-0"  # not held: its calls do not wait for a turn
    quiet.end(0)
    await calm
    await settle()
    assert started == ["noisy-0", "quiet-0"]  # still 0.005 s short
    clock.advance(0.011)
    calm = quiet.call()
    quiet.end(1)
    await calm
    await settle()
    assert started == ["noisy-0", "quiet-0", "quiet-1", "noisy-1"]
    noisy.end(1)
    await settle()
    assert started[-1] == "noisy-2"  # it took no time: the credit is still there
    noisy.end(2)
    await asyncio.gather(*flood)
    assert turns.working == 0


async def test_a_client_calling_one_at_a_time_is_not_held_by_the_share() -> None:
    """A space whose calls never wait for a turn starts each at once, however long its calls
    keep it at work beside another space."""
    clock = QuotaClock()
    turns = sharing.Turns(per_space=1, window_s=SHARED_S, clock=clock)
    started: list[str] = []
    steady = Caller(turns, "steady", started)
    await called(turns, "quiet")
    for n in range(3):
        call = steady.call()
        await settle()
        assert started[-1] == f"steady-{n}"
        clock.advance(1.0)
        steady.end(n)
        await call
    assert turns.credit("steady") < 0
    assert turns.working == 0


async def test_a_space_owes_nothing_for_its_time_alone() -> None:
    clock = QuotaClock()
    turns = sharing.Turns(per_space=1, window_s=0.2, clock=clock)
    started: list[str] = []
    a = Caller(turns, "a", started)
    alone = a.call()
    await settle()
    clock.advance(5.0)
    a.end(0)
    await alone
    await called(turns, "b")
    assert turns.credit("a") == turns.burst_s
    calls = [a.call() for _ in range(2)]
    await settle()
    a.end(1)
    await settle()
    assert started == ["a-0", "a-1", "a-2"]
    a.end(2)
    await asyncio.gather(*calls)


async def test_a_held_space_starts_its_next_call_once_its_share_has_room() -> None:
    """With no call of its own at work (none whose end would admit the next), a held space's
    next call is started by a timer once its credit is back above zero."""
    turns = sharing.Turns(per_space=1, window_s=SHARED_S, burst_s=0.0)
    started: list[str] = []
    noisy = Caller(turns, "noisy", started)
    await called(turns, "quiet")
    flood = [noisy.call() for _ in range(2)]
    await settle()
    worked = time.monotonic()
    await asyncio.sleep(0.03)
    noisy.end(0)
    ended = time.monotonic()
    await settle()
    assert started == ["noisy-0"]
    owed = (ended - worked) * (1 - turns.share)
    await until(lambda: len(started) == 2)
    assert time.monotonic() - ended >= owed / turns.share * 0.9
    noisy.end(1)
    await asyncio.gather(*flood)
    assert turns.working == 0


class TickingClock:
    """A clock that moves on by `step` seconds each time it is read (set `step` once the test
    wants time to pass between two reads in one step of the queue)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.step = 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


async def test_a_held_space_whose_credit_came_back_while_the_queue_looked_is_still_started() -> (
    None
):
    """Time passes between the queue finding a held space short of credit and its arranging
    the wake-up (a busy loop, a slow machine): the space has its credit back by then, with no
    call at work whose end would start its next; it is started all the same."""
    clock = TickingClock()
    turns = sharing.Turns(per_space=1, window_s=SHARED_S, burst_s=0.0, clock=clock)
    started: list[str] = []
    noisy = Caller(turns, "noisy", started)
    await called(turns, "quiet")
    flood = [noisy.call() for _ in range(2)]
    await settle()
    assert started == ["noisy-0"]
    clock.now += 0.1  # noisy-0 works 0.1 s: it owes 0.05 s of credit when it ends
    clock.step = 0.12  # then every read of the clock is 0.06 s of credit back
    noisy.end(0)
    await asyncio.wait_for(until(lambda: len(started) == 2), 10)
    clock.step = 0.0
    noisy.end(1)
    await asyncio.gather(*flood)
    assert turns.working == 0


REMEMBER = pb.RememberRequest(memory=pb.Memory(content="m", embedding=[1.0, 0.0, 0.0, 0.0]))


async def noisy_and_quiet(
    start: Start, managed_dirs: tuple[Path, Path]
) -> tuple[Running, sharing.Turns]:
    """A real server working on one call of each space at a time, spaces "noisy" (token "tn")
    and "quiet" ("tq") loaded and sharing the loop throughout, however slow the machine."""
    index_dir, volumes = managed_dirs
    write_entry(index_dir, "noisy", token="tn", volumes=volumes, dim=4)
    write_entry(index_dir, "quiet", token="tq", volumes=volumes, dim=4)
    running = await start(data_root=volumes, index_dir=index_dir, working_calls_per_space=1)
    turns = running.server.edge.turns
    assert turns is not None
    turns.window_s = 60.0
    for space, token in (("noisy", "tn"), ("quiet", "tq")):
        await running.memories.Remember(REMEMBER, metadata=md(space, token))  # loaded
    return running, turns


async def test_a_quiet_spaces_call_starts_while_a_floods_calls_wait_their_turn(
    start: Start, managed_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real server working on one call of each space at a time: 60 Recalls of a flooding
    space (each scanned on a worker thread, holding its turn meanwhile; the test holds the
    first scan until the end) are sent at once, then one Remember of a quiet space. The flood's
    calls wait in their queue (none refused, none lost), and the quiet call starts while they
    still wait: it did not queue behind them."""
    running, turns = await noisy_and_quiet(start, managed_dirs)
    request = REMEMBER
    noisy = running.server.registry.loaded()[spaces_ids.SpaceId("noisy")]
    gate = threading.Event()
    search = noisy._search

    def held(*args: Any) -> Any:
        gate.wait(120.0)
        return search(*args)

    # Every recall of the flood scans on a worker thread, the first held there.
    monkeypatch.setattr(noisy, "_scan_is_small", lambda: False)
    monkeypatch.setattr(noisy, "_search", held)
    recall = pb.RecallRequest(cue=[1.0, 0.0, 0.0, 0.0], k=1)
    flood = [
        asyncio.ensure_future(running.memories.Recall(recall, metadata=md("noisy", "tn")))
        for _ in range(60)
    ]
    try:
        await until(lambda: turns.waiting("noisy") >= 59)
        assert (turns.working_on("noisy"), turns.waiting("noisy")) == (1, 59)
        beside: list[int] = []
        enter = turns.enter

        async def noting(space: str) -> None:
            await enter(space)
            if space == "quiet":
                beside.append(turns.waiting("noisy"))

        monkeypatch.setattr(turns, "enter", noting)
        await running.memories.Remember(request, metadata=md("quiet", "tq"))
        assert beside == [59]
    finally:
        gate.set()
    answers = await asyncio.gather(*flood)
    assert all(len(answer.hits) == 1 for answer in answers)
    assert turns.working == 0
    # The flood's waits are counted under its space; the quiet space never waited.
    registry = running.server.metrics.registry
    waits = "memspace_turn_wait_seconds_total"
    assert (registry.get_sample_value(waits, {"space": "noisy"}) or 0) > 0
    assert registry.get_sample_value(waits, {"space": "quiet"}) is None


async def test_a_remember_hands_its_turn_on_before_its_fsync(
    start: Start, managed_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Turns bound work on the event loop, not waits on the disk: with one call of each space
    at work at a time, three Remembers of a space all get past their turns while the first
    group commit's fsync is held back, and none is left waiting for a turn. A turn held through
    the fsync would keep two of them queued until it ended."""
    running, turns = await noisy_and_quiet(start, managed_dirs)
    request = REMEMBER
    noisy = running.server.registry.loaded()[spaces_ids.SpaceId("noisy")]
    gate = threading.Event()
    write = noisy._wal._write

    def held(*args: Any) -> Any:
        gate.wait(120.0)
        return write(*args)

    monkeypatch.setattr(noisy._wal, "_write", held)
    first = noisy.next_lsn
    calls = [
        asyncio.ensure_future(running.memories.Remember(request, metadata=md("noisy", "tn")))
        for _ in range(3)
    ]
    try:
        await until(lambda: noisy.next_lsn >= first + 3)
        assert noisy.next_lsn == first + 3  # all three wrote their record while none is durable
        assert turns.working_on("noisy") == 0
        assert turns.waiting("noisy") == 0
        assert not any(call.done() for call in calls)
    finally:
        gate.set()
    answers = await asyncio.gather(*calls)
    assert sorted(answer.lsn for answer in answers) == [first, first + 1, first + 2]
    assert turns.working == 0


async def test_the_server_sets_the_threads_switch_interval(
    start: Start, managed_dirs: tuple[Path, Path]
) -> None:
    """A worker thread's result reaches a busy event loop within the configured switch interval
    (Python's default of 5 ms was a 5 ms wait per hop of a quiet space's call)."""
    index_dir, volumes = managed_dirs
    before = sys.getswitchinterval()
    try:
        await start(data_root=volumes, index_dir=index_dir, thread_switch_ms=0.25)
        assert sys.getswitchinterval() == pytest.approx(0.00025)
    finally:
        sys.setswitchinterval(before)


async def test_a_call_refused_for_its_quota_is_answered_at_once_and_keeps_its_turn(
    start: Start, managed_dirs: tuple[Path, Path], quota_clock: QuotaClock
) -> None:
    """Through a real server: a Remember over the space's write quota is refused at once, its
    turn stays taken while spaces share the loop (the flood's next call waits in its own
    queue), and another space's call is not held back by it."""
    index_dir, volumes = managed_dirs
    write_entry(
        index_dir,
        "noisy",
        token="tn",
        volumes=volumes,
        dim=4,
        quota=index.Quota(max_writes_per_second=1.0),
    )
    write_entry(index_dir, "quiet", token="tq", volumes=volumes, dim=4)
    running = await start(data_root=volumes, index_dir=index_dir, working_calls_per_space=1)
    turns = running.server.edge.turns
    assert turns is not None
    turns.window_s = 60.0
    await running.memories.Remember(REMEMBER, metadata=md("quiet", "tq"))
    await running.memories.Remember(REMEMBER, metadata=md("noisy", "tn"))  # the one token
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running.memories.Remember(REMEMBER, metadata=md("noisy", "tn"))
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert turns.working_on("noisy") == 1  # kept after the refusal was answered
    await asyncio.wait_for(running.memories.Remember(REMEMBER, metadata=md("quiet", "tq")), 30)
    await until(lambda: turns.working == 0)
    assert turns.working == 0  # given back after the retry-after


async def test_the_server_holds_spaces_to_the_configured_share_of_time(
    start: Start, managed_dirs: tuple[Path, Path]
) -> None:
    index_dir, volumes = managed_dirs
    running = await start(data_root=volumes, index_dir=index_dir, working_time_share=0.25)
    turns = running.server.edge.turns
    assert turns is not None
    assert turns.share == 0.25


def test_the_wait_series_of_a_space_that_left_the_index_is_dropped() -> None:
    found = metrics.Metrics()
    found.waited("gone", 0.5)
    found.waited("kept", 0.25)
    found.forget_spaces_except({"kept"})
    waits = "memspace_turn_wait_seconds_total"
    assert found.registry.get_sample_value(waits, {"space": "gone"}) is None
    assert found.registry.get_sample_value(waits, {"space": "kept"}) == 0.25
