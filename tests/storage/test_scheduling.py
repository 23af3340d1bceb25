"""Fair shares between spaces: scans admitted round robin by space with a cap per space, WAL
appends on threads of their own, and the turns Subscribe streams take to send."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from memspace_server import queueing, spans
from memspace_server.storage import feeds, memories, registry, scheduling

from .conftest import draft, make_space


class Gate:
    """Blocking work that waits until the test opens it, recording the order it started in."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self._open = threading.Event()

    def work(self, label: str) -> str:
        self.started.append(label)
        self._open.wait(10)
        return label

    def open(self) -> None:
        self._open.set()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.01)


async def test_a_flooding_space_takes_turns_with_a_quiet_one() -> None:
    scans = scheduling.FairScans(workers=2, per_space=2)
    gate = Gate()
    try:
        flood = [
            asyncio.ensure_future(scans.run("noisy", gate.work, f"noisy-{n}")) for n in range(6)
        ]
        await settle()
        assert gate.started == ["noisy-0", "noisy-1"]
        quiet = asyncio.ensure_future(scans.run("quiet", gate.work, "quiet"))
        await settle()
        assert scans.waiting("noisy") == 4
        assert scans.waiting("quiet") == 1
        gate.open()
        assert await quiet == "quiet"
        await asyncio.gather(*flood)
        # Turns alternate between the spaces: at most one of the flood's four waiting scans
        # (the space that waited first) went ahead of the quiet space's.
        assert gate.started.index("quiet") <= 3
    finally:
        gate.open()
        scans.shutdown()


async def test_a_space_never_runs_more_scans_than_its_cap() -> None:
    scans = scheduling.FairScans(workers=3, per_space=2)
    gate = Gate()
    try:
        flood = [asyncio.ensure_future(scans.run("noisy", gate.work, str(n))) for n in range(5)]
        await settle()
        assert scans.running("noisy") == 2
        assert len(gate.started) == 2
        # The third thread stays free for another space, which starts at once.
        other = asyncio.ensure_future(scans.run("other", gate.work, "other"))
        await settle()
        assert gate.started[-1] == "other"
        gate.open()
        await asyncio.gather(*flood, other)
        assert scans.running("noisy") == 0
    finally:
        gate.open()
        scans.shutdown()


async def test_a_cancelled_waiting_scan_gives_up_its_place() -> None:
    scans = scheduling.FairScans(workers=1, per_space=1)
    gate = Gate()
    try:
        first = asyncio.ensure_future(scans.run("a", gate.work, "first"))
        await settle()
        waiting = asyncio.ensure_future(scans.run("b", gate.work, "cancelled"))
        after = asyncio.ensure_future(scans.run("c", gate.work, "after"))
        await settle()
        waiting.cancel()
        gate.open()
        assert await first == "first"
        assert await after == "after"
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert "cancelled" not in gate.started
        assert scans.running("a") == scans.running("c") == 0
    finally:
        gate.open()
        scans.shutdown()


async def test_recalls_of_a_large_space_run_on_the_scan_threads(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(5)
    space_id = await make_space(spaces_registry)
    names: set[str] = set()
    async with spaces_registry.lease(space_id) as space:
        await space.remember_many([draft(rng, f"m{i}") for i in range(9000)])
        search = space._search

        def spying(
            query: memories.Query, now: float, parent: spans.Context | None = None
        ) -> list[memories.Hit]:
            names.add(threading.current_thread().name)
            return search(query, now, parent)

        space._search = spying  # type: ignore[method-assign]
        await space.recall(memories.Query(cue=draft(rng).embedding, k=3))
    assert len(names) == 1
    assert names.pop().startswith("memspace-scan")


async def test_wal_appends_do_not_wait_behind_scans(spaces_registry: registry.Registry) -> None:
    pools = spaces_registry.pools
    gate = Gate()
    rng = np.random.default_rng(6)
    space_id = await make_space(spaces_registry)
    try:
        blockers = [
            asyncio.ensure_future(pools.scans.run(f"s{n}", gate.work, str(n)))
            for n in range(pools.scans.workers + 2)
        ]
        for n in range(8):
            pools.io.submit(gate.work, f"io{n}")
        await settle()
        async with spaces_registry.lease(space_id) as space:
            # Every scan thread and every general worker is busy: the write still commits.
            # Not a deadlock: a bound far above an fsync's time on a loaded machine.
            _, lsn = await asyncio.wait_for(space.remember(draft(rng)), 60)
        assert lsn == 1
    finally:
        gate.open()
    await asyncio.gather(*blockers)


async def test_the_pacer_lets_a_few_streams_send_at_once() -> None:
    pacer = feeds.Pacer(slots=2, hold_s=10)
    first, second = await pacer.acquire(), await pacer.acquire()
    third = asyncio.ensure_future(pacer.acquire())
    await settle()
    assert not third.done()
    assert pacer.held == 2
    pacer.release(first)
    token = await asyncio.wait_for(third, 10)
    pacer.release(second)
    pacer.release(token)
    pacer.release(token)  # a second release is a no-op
    assert pacer.held == 0


async def test_the_pacer_keeps_one_send_in_flight_while_other_spaces_ask_for_work() -> None:
    """A fan-out alone sends through every turn; beside another space's calls it keeps one send
    in flight, so each step of those calls waits behind one send at most."""
    activity = queueing.Activity(window_s=60.0)
    pacer = feeds.Pacer(slots=4, hold_s=10, shared_slots=1, activity=activity)
    pacer.note("busy")
    first, second = await pacer.acquire(), await pacer.acquire()
    activity.note("quiet")  # another space's call
    third = asyncio.ensure_future(pacer.acquire())
    await settle()
    assert not third.done()
    pacer.release(first)
    await settle()
    assert not third.done()  # one send is still in flight
    pacer.release(second)
    token = await asyncio.wait_for(third, 10)
    pacer.release(token)
    assert pacer.held == 0


async def test_the_pacer_takes_back_a_turn_held_too_long() -> None:
    pacer = feeds.Pacer(slots=1, hold_s=0.05)
    stuck = await pacer.acquire()
    waiting = asyncio.ensure_future(pacer.acquire())
    token = await asyncio.wait_for(waiting, 30)
    pacer.release(stuck)  # late: it was taken back already, and gives nothing away
    assert pacer.held == 1
    pacer.release(token)
    assert pacer.held == 0


async def test_one_batch_reaches_many_subscribers_in_order(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(7)
    space_id = await make_space(spaces_registry)
    async with spaces_registry.lease(space_id) as space:
        streams = [await space.subscribe() for _ in range(50)]
        _count, last, ids = await space.remember_many([draft(rng, f"m{i}") for i in range(20)])

        async def read(stream: object) -> list[tuple[str, int]]:
            found = []
            async for event in stream:  # type: ignore[attr-defined]
                found.append((event.id, event.lsn))
                if event.lsn == last:
                    break
            await stream.aclose()  # type: ignore[attr-defined]
            return found

        seen = await asyncio.wait_for(asyncio.gather(*(read(s) for s in streams)), 10)
    expected = list(zip(ids, range(last - 19, last + 1), strict=True))
    assert all(found == expected for found in seen)
    assert spaces_registry.pools.fanout.held == 0


async def test_a_batch_to_many_subscribers_wakes_only_as_many_streams_as_the_pacer_has_turns() -> (
    None
):
    """One write published to 1,000 idle subscribers queues a few steps on the event loop (the
    streams the pacer has turns for), not a step per subscriber: another space's call that
    becomes ready next waits behind those few. The rest are woken as turns free up, and every
    subscriber still gets every event in order."""
    pacer = feeds.Pacer(slots=8, hold_s=10)
    feed = feeds.Feed(pacer)
    streams = [feed.subscribe(buffer=100, skip_through=0) for _ in range(1000)]
    seen: list[list[int]] = [[] for _ in streams]

    async def read(n: int) -> None:
        async for event in streams[n].live():
            seen[n].append(event.lsn)

    readers = [asyncio.ensure_future(read(n)) for n in range(len(streams))]
    await settle()  # every reader waits for events
    loop = asyncio.get_running_loop()
    # The loop's queue of ready steps (asyncio's default loop keeps it in `_ready`).
    before = len(loop._ready)  # type: ignore[attr-defined]
    feed.publish([feeds.Run(feeds.EventType.REMEMBERED, ["a", "b", "c"], 1, time.time())])
    woken = len(loop._ready) - before  # type: ignore[attr-defined]
    assert woken <= pacer.slots
    for _ in range(1000):
        if all(len(found) == 3 for found in seen):
            break
        await asyncio.sleep(0.01)
    assert all(found == [1, 2, 3] for found in seen)
    assert pacer.held == 0
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
