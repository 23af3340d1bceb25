"""The fair queue the edge's turns and the scan threads share: slots go round robin by space
under a flood, each space in its own arrival order, and a held slot is handed on once."""

from __future__ import annotations

import asyncio

import pytest

from memspace_server import queueing


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_slots_go_round_robin_by_space_however_many_each_space_queued() -> None:
    slots = queueing.FairQueue(per_space=2, total=1)
    order: list[str] = []
    release = asyncio.Event()

    async def work(label: str) -> None:
        space = label.split("-", maxsplit=1)[0]
        await slots.acquire(space)
        order.append(label)
        try:
            await release.wait()
        finally:
            slots.release(space)

    await slots.acquire("hold")  # the one slot is taken: everyone below queues
    tasks = [asyncio.ensure_future(work(f"a-{n}")) for n in range(6)]
    await settle()
    tasks += [asyncio.ensure_future(work(f"b-{n}")) for n in range(2)]
    tasks += [asyncio.ensure_future(work(f"c-{n}")) for n in range(2)]
    await settle()
    assert slots.waiting("a") == 6
    release.set()
    slots.release("hold")
    await asyncio.gather(*tasks)
    # a flooded first, yet b and c each had a turn after a's first slot, not after all six.
    assert order == ["a-0", "b-0", "c-0", "a-1", "b-1", "c-1", "a-2", "a-3", "a-4", "a-5"]
    assert slots.working == 0


async def test_a_space_never_holds_more_than_its_share() -> None:
    slots = queueing.FairQueue(per_space=2)
    for _ in range(2):
        await slots.acquire("a")
    third = asyncio.ensure_future(slots.acquire("a"))
    await slots.acquire("b")  # another space is not held back by a's queue
    await settle()
    assert not third.done()
    assert (slots.running("a"), slots.waiting("a")) == (2, 1)
    slots.release("a")
    await third
    assert (slots.running("a"), slots.waiting("a")) == (2, 0)


async def test_a_held_slot_is_handed_on_once() -> None:
    slots = queueing.FairQueue(per_space=1)
    await slots.acquire("a")
    released: list[str] = []

    def release() -> None:
        released.append("a")
        slots.release("a")

    async def call() -> None:
        queueing.hold(release)
        queueing.give_back()
        queueing.give_back()  # nothing held any more: no second release

    await asyncio.ensure_future(call())
    assert released == ["a"]
    assert slots.working == 0
    queueing.give_back()  # outside any call: nothing held


async def test_a_space_alone_holds_more_than_its_share_until_another_space_asks() -> None:
    activity = queueing.Activity(window_s=60.0)
    slots = queueing.FairQueue(per_space=1, total=3, alone=2, activity=activity)
    for _ in range(2):
        await slots.acquire("a")
    third = asyncio.ensure_future(slots.acquire("a"))
    await settle()
    assert not third.done()  # alone, a holds `alone` slots at most
    activity.note("b")  # another space asked for work (a call, a scan or a send)
    slots.release("a")
    await settle()
    assert not third.done()  # shared: a's share is one slot, and it holds one
    await slots.acquire("b")  # b finds a slot at once
    slots.release("a")
    await asyncio.wait_for(third, 10)
    assert (slots.running("a"), slots.running("b")) == (1, 1)


class Gated(queueing.FairQueue):
    """A queue that holds every space until the test opens its gate, and counts how often it
    was told that a space below its cap could not start."""

    def __init__(self) -> None:
        super().__init__(per_space=2)
        self.open = False
        self.held = 0

    def _ready(self, space: str, shared: bool) -> bool:
        return self.open

    def _held(self) -> None:
        self.held += 1


async def test_a_space_held_below_its_cap_waits_and_the_queue_hears_of_it() -> None:
    """A subclass that holds spaces (the edge's share of time) is told each time a space
    below its cap cannot start, on arrival and on another's release: none of the held space's
    own calls is at work, so only the subclass can see to it that `_admit` runs again."""
    slots = Gated()
    waiting = asyncio.ensure_future(slots.acquire("a"))
    await settle()
    assert not waiting.done()
    assert (slots.waiting("a"), slots.held) == (1, 1)  # on its arrival
    slots.open = True
    assert await slots.acquire("b") is False  # starts at once, and admits nobody else
    assert not waiting.done()
    slots.open = False
    slots.release("b")
    assert (slots.waiting("a"), slots.held) == (1, 2)  # on another's release
    slots.open = True
    await slots.acquire("b")
    slots.release("b")  # a release lets the queue look again
    assert await asyncio.wait_for(waiting, 10) is True  # it waited
    assert (slots.running("a"), slots.held) == (1, 2)
    assert await slots.acquire("a") is False
    await slots.acquire("b")
    third = asyncio.ensure_future(slots.acquire("a"))  # a holds two: at its cap
    await settle()
    slots.open = False
    slots.release("b")  # the one waiting space is at its cap, not held: nothing to hear of
    assert (slots.waiting("a"), slots.held) == (1, 2)
    slots.open = True
    slots.release("a")
    assert await asyncio.wait_for(third, 10) is True


async def test_activity_forgets_a_space_after_its_window() -> None:
    # A window longer than a stall of the test between the notes and the check.
    activity = queueing.Activity(window_s=1.0)
    activity.note("a")
    activity.note("b")
    assert activity.shared()
    await asyncio.sleep(1.1)
    activity.note("a")
    assert not activity.shared()


def test_a_fair_queue_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        queueing.FairQueue(per_space=0)
    with pytest.raises(ValueError, match="at least one slot"):
        queueing.FairQueue(per_space=1, total=0)
