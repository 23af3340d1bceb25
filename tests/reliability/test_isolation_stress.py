"""Isolation under stress: 50 spaces on one real `memspace serve`, each with its own token, with
concurrent writers (Remember, RememberBatch, Forget) and subscribers in every space, while every
writer keeps trying to reach its neighbours (another space's token, its own token on another
space, a space field differing from the metadata, forged IDs in Get and Forget, a batch that
switches space midway, the admin token, no token).

Afterwards every space holds exactly its own memories, every subscriber saw exactly its space's
events in LSN order (one from the first LSN before the writes began, one that joined midway and
replayed), and every cross-space attempt was refused with the code section 5 gives it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import numpy as np

from memspace_contract.v1 import memspace_pb2 as pb
from tests.reliability.conftest import (
    ADMIN_TOKEN,
    CALL_TIMEOUT_S,
    DIM,
    Servers,
    Stubs,
    code_of,
    create_space,
    md,
    soak,
    unit,
)

SPACES = 50
WRITERS = 2
OPS = soak(20, 60)
"""Writes per writer (and about a third as many cross-space attempts)."""
CHANNELS = 8

C = grpc.StatusCode


@dataclasses.dataclass
class Tenant:
    space: str
    token: str
    events: dict[int, tuple[int, str]] = dataclasses.field(default_factory=dict)
    """Every acknowledged write: LSN -> (event type, memory ID)."""
    live: dict[str, str] = dataclasses.field(default_factory=dict)
    """Memory ID -> content of what the space must hold."""
    seen: list[list[pb.MemoryEvent]] = dataclasses.field(default_factory=list)

    @property
    def last_lsn(self) -> int:
        return max(self.events, default=0)


@dataclasses.dataclass
class Attempts:
    refused: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    let_through: list[str] = dataclasses.field(default_factory=list)

    async def expect(self, kind: str, call: Awaitable[object], *codes: C) -> None:
        code = await code_of(call)
        if code in codes:
            self.refused[kind] += 1
        else:
            self.let_through.append(f"{kind}: {code} (expected {codes})")


def memory(tenant: Tenant, rng: random.Random, number: str) -> pb.Memory:
    content = f"{tenant.space} {number}"
    return pb.Memory(
        id=f"{tenant.space}-{number}",
        content=content,
        embedding=unit(np.random.default_rng(rng.randrange(2**32))),
    )


async def cross_space(
    stubs: Stubs, tenant: Tenant, other: Tenant, attempts: Attempts, turn: int
) -> None:
    """One attempt of a tenant on its neighbour's data; each must be refused."""
    mine = md(tenant.space, tenant.token)
    forged = next(iter(other.live), f"{other.space}-0-0")
    m = stubs.memories
    kind = turn % 9
    if kind == 0:
        await attempts.expect(
            "another space's token",
            m.Recall(
                pb.RecallRequest(cue=[1.0] * DIM, k=10),
                metadata=md(tenant.space, other.token),
                timeout=CALL_TIMEOUT_S,
            ),
            C.PERMISSION_DENIED,
        )
    elif kind == 1:
        await attempts.expect(
            "its token on another space",
            m.Get(
                pb.GetRequest(id=forged),
                metadata=md(other.space, tenant.token),
                timeout=CALL_TIMEOUT_S,
            ),
            C.PERMISSION_DENIED,
        )
    elif kind == 2:
        await attempts.expect(
            "a space field differing from the metadata",
            m.Remember(
                pb.RememberRequest(
                    space=other.space, memory=pb.Memory(content="x", embedding=[1.0] * DIM)
                ),
                metadata=mine,
                timeout=CALL_TIMEOUT_S,
            ),
            C.INVALID_ARGUMENT,
        )
    elif kind == 3:
        await attempts.expect(
            "a forged ID in Get",
            m.Get(pb.GetRequest(id=forged), metadata=mine, timeout=CALL_TIMEOUT_S),
            C.NOT_FOUND,
        )
    elif kind == 4:
        done = await m.Forget(pb.ForgetRequest(id=forged), metadata=mine, timeout=CALL_TIMEOUT_S)
        if done.forgotten:
            attempts.let_through.append(f"a forged ID in Forget removed {forged}")
        else:
            attempts.refused["a forged ID in Forget"] += 1
    elif kind == 5:
        stream = m.Subscribe(
            pb.SubscribeRequest(since_lsn=1), metadata=md(other.space, tenant.token)
        )
        await attempts.expect("Subscribe with its token", stream.read(), C.PERMISSION_DENIED)
        stream.cancel()
    elif kind == 6:

        async def switching() -> AsyncIterator[pb.RememberRequest]:
            yield pb.RememberRequest(memory=pb.Memory(content="a", embedding=[1.0] * DIM))
            yield pb.RememberRequest(
                space=other.space, memory=pb.Memory(content="b", embedding=[1.0] * DIM)
            )

        await attempts.expect(
            "a batch switching space",
            m.RememberBatch(switching(), metadata=mine, timeout=CALL_TIMEOUT_S),
            C.INVALID_ARGUMENT,
        )
    elif kind == 7:
        await attempts.expect(
            "the admin token on a tenant's data",
            m.Recall(
                pb.RecallRequest(cue=[1.0] * DIM, k=10),
                metadata=md(other.space, ADMIN_TOKEN),
                timeout=CALL_TIMEOUT_S,
            ),
            C.PERMISSION_DENIED,
        )
    else:
        await attempts.expect(
            "no token",
            m.Get(pb.GetRequest(id=forged), metadata=md(other.space), timeout=CALL_TIMEOUT_S),
            C.UNAUTHENTICATED,
        )


async def writer(
    stubs: Stubs,
    tenant: Tenant,
    neighbours: list[Tenant],
    name: str,
    attempts: Attempts,
) -> None:
    rng = random.Random(f"{tenant.space}-{name}")
    mine: list[str] = []
    meta = md(tenant.space, tenant.token)
    m = stubs.memories
    for n in range(OPS):
        roll = rng.random()
        if roll < 0.65 or not mine:
            new = memory(tenant, rng, f"{name}-{n}")
            done = await m.Remember(
                pb.RememberRequest(memory=new), metadata=meta, timeout=CALL_TIMEOUT_S
            )
            tenant.events[done.lsn] = (pb.EVENT_TYPE_REMEMBERED, done.id)
            tenant.live[done.id] = new.content
            mine.append(done.id)
        elif roll < 0.8:
            batch = [memory(tenant, rng, f"{name}-{n}-{i}") for i in range(3)]

            async def requests(
                batch: list[pb.Memory] = batch,
            ) -> AsyncIterator[pb.RememberRequest]:
                for item in batch:
                    yield pb.RememberRequest(space=tenant.space, memory=item)

            done_batch = await m.RememberBatch(requests(), metadata=meta, timeout=CALL_TIMEOUT_S)
            first = done_batch.last_lsn - len(batch) + 1
            for offset, item in enumerate(batch):
                tenant.events[first + offset] = (pb.EVENT_TYPE_REMEMBERED, item.id)
                tenant.live[item.id] = item.content
            mine.extend(item.id for item in batch)
        else:
            gone = mine.pop(rng.randrange(len(mine)))
            forgot = await m.Forget(
                pb.ForgetRequest(id=gone), metadata=meta, timeout=CALL_TIMEOUT_S
            )
            assert forgot.forgotten, gone
            tenant.events[forgot.lsn] = (pb.EVENT_TYPE_FORGOTTEN, gone)
            del tenant.live[gone]
        if n % 3 == 0:
            await cross_space(stubs, tenant, rng.choice(neighbours), attempts, rng.randrange(9))


async def subscriber(
    stubs: Stubs, tenant: Tenant, done: asyncio.Event, ready: asyncio.Event | None
) -> list[pb.MemoryEvent]:
    """Every event of the space from LSN 1 until the writers are done and the last acknowledged
    LSN has arrived."""
    seen: list[pb.MemoryEvent] = []
    stream = stubs.memories.Subscribe(
        pb.SubscribeRequest(since_lsn=1), metadata=md(tenant.space, tenant.token)
    )
    if ready is not None:
        ready.set()

    async def read() -> None:
        async for event in stream:
            seen.append(event)

    reader = asyncio.create_task(read())
    try:
        await done.wait()
        while (seen[-1].lsn if seen else 0) < tenant.last_lsn:
            if reader.done():
                reader.result()  # the stream's error, if it failed
                raise AssertionError(f"the stream of {tenant.space} ended early")
            await asyncio.sleep(0.05)
    finally:
        stream.cancel()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return seen


async def test_fifty_spaces_under_concurrent_load_stay_isolated(
    servers: Servers, admin_token_file: Path
) -> None:
    server = servers(None, "--admin-token-file", str(admin_token_file))
    await server.start()
    channels = [Stubs(server.address) for _ in range(CHANNELS)]
    tenants = [Tenant(f"tenant-{n:02d}", f"token-of-tenant-{n:02d}") for n in range(SPACES)]
    attempts = Attempts()
    try:
        await asyncio.gather(*(create_space(channels[0], t.space, t.token) for t in tenants))
        done = asyncio.Event()
        early: list[asyncio.Task[list[pb.MemoryEvent]]] = []
        for n, tenant in enumerate(tenants):
            ready = asyncio.Event()
            early.append(
                asyncio.create_task(subscriber(channels[n % CHANNELS], tenant, done, ready))
            )
            await ready.wait()
        writers = [
            asyncio.create_task(
                writer(
                    channels[(n * WRITERS + w) % CHANNELS],
                    tenant,
                    [t for t in tenants if t is not tenant],
                    f"w{w}",
                    attempts,
                )
            )
            for n, tenant in enumerate(tenants)
            for w in range(WRITERS)
        ]
        # Late subscribers join while the writers run: they replay, then follow live.
        await asyncio.sleep(0.5)
        late = [
            asyncio.create_task(subscriber(channels[(n + 3) % CHANNELS], tenant, done, None))
            for n, tenant in enumerate(tenants)
        ]
        async with asyncio.timeout(240):
            await asyncio.gather(*writers)
            done.set()
            for tenant, seen in zip(
                tenants + tenants, await asyncio.gather(*early, *late), strict=True
            ):
                tenant.seen.append(seen)
        await check(channels[0], tenants)
    finally:
        for stubs in channels:
            await stubs.close()
    assert not attempts.let_through, attempts.let_through
    assert sum(attempts.refused.values()) >= SPACES * WRITERS * OPS // 3 // 2
    assert len(attempts.refused) == 9, attempts.refused
    print(f"refused cross-space attempts: {dict(attempts.refused)}")


async def check(stubs: Stubs, tenants: list[Tenant]) -> None:
    own_prefixes = {t.space: f"{t.space} " for t in tenants}
    for tenant in tenants:
        meta = md(tenant.space, tenant.token)
        found = await stubs.memories.Recall(
            pb.RecallRequest(cue=[1.0] * DIM, k=1000), metadata=meta, timeout=CALL_TIMEOUT_S
        )
        holds = {hit.memory.id: hit.memory.content for hit in found.hits}
        assert holds == tenant.live, f"{tenant.space} does not hold exactly its own memories"
        assert all(c.startswith(own_prefixes[tenant.space]) for c in holds.values())
        health = await stubs.spaces.Health(
            pb.HealthRequest(space=tenant.space), metadata=meta, timeout=CALL_TIMEOUT_S
        )
        assert health.spaces[0].memories == len(tenant.live)
        wanted = [(lsn, *tenant.events[lsn]) for lsn in sorted(tenant.events)]
        assert [lsn for lsn, _, _ in wanted] == list(range(1, tenant.last_lsn + 1))
        for seen in tenant.seen:
            assert all(e.space == tenant.space for e in seen), tenant.space
            assert [(e.lsn, e.type, e.id) for e in seen] == wanted, tenant.space
