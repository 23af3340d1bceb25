"""Crash consistency: a real `memspace serve` under concurrent Remember, RememberBatch, Forget and
Consolidate load from several clients across several spaces is killed with SIGKILL at a random
moment, started again on the same data root, and checked against a ledger of what the clients
were told:

- every acknowledged Remember is there, with its content and exact embedding;
- every acknowledged Forget stays forgotten (nothing comes back);
- a write that was in flight at the kill is either wholly there or wholly absent;
- the space holds nothing else (its memory count is exactly the ledger's).

The spaces have small tiers, so kills land in WAL appends, group commits, consolidations, Zarr
writes, checkpoints and the recovery replay of the previous kill. Each test runs several
kill/restart trials on one data root (state accumulates across them), then a graceful drain;
`MEMSPACE_SOAK=1` runs 12 seeds of 5 trials (60 kills), the default 1 seed of 3.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from memspace_contract.v1 import memspace_pb2 as pb
from tests.reliability.conftest import (
    CALL_TIMEOUT_S,
    DIM,
    ServerProcess,
    Servers,
    Stubs,
    create_space,
    md,
    soak,
)

SEEDS = soak(1, 12)
TRIALS = soak(3, 5)
CLIENTS = 5
KILL_AFTER_S = (0.02, 1.5)
"""The kill lands uniformly in this window after the load starts (the first requests also load
each space: an early kill interrupts a recovery)."""

SPACES = {
    # Everything in hot and the WAL, consolidated only when a client asks.
    "crash-hot": pb.CreateSpaceRequest(),
    # Small tiers: consolidations demote to warm (Zarr) and cold (zstd) all the time.
    "crash-tiered": pb.CreateSpaceRequest(
        tiers=pb.SpaceTiers(hot_capacity=30, warm_capacity=60, cold_compression="zstd")
    ),
    "crash-lz4": pb.CreateSpaceRequest(
        tiers=pb.SpaceTiers(hot_capacity=50, cold_compression="lz4", warm_capacity=40)
    ),
}


@dataclasses.dataclass(frozen=True)
class Expected:
    content: str
    embedding: tuple[float, ...]


@dataclasses.dataclass
class Ledger:
    """What the clients of one space were told, and what they cannot know."""

    space: str
    token: str
    live: dict[str, Expected] = dataclasses.field(default_factory=dict)
    forgotten: set[str] = dataclasses.field(default_factory=set)
    maybe_live: dict[str, Expected] = dataclasses.field(default_factory=dict)
    """Remembered, but the answer never came: there or not, never half there."""
    maybe_forgotten: dict[str, Expected] = dataclasses.field(default_factory=dict)
    """Forgotten, but the answer never came."""
    acknowledged: int = 0


@dataclasses.dataclass
class Trial:
    killed: bool = False
    failures: list[str] = dataclasses.field(default_factory=list)
    calls: int = 0


def expected(rng: np.random.Generator, memory_id: str) -> Expected:
    values = rng.normal(size=DIM).astype(np.float32)
    values[0] = 1.0
    return Expected(content=f"content of {memory_id}", embedding=tuple(float(v) for v in values))


def as_memory(memory_id: str, want: Expected) -> pb.Memory:
    return pb.Memory(id=memory_id, content=want.content, embedding=want.embedding)


async def client(
    stubs: Stubs,
    ledgers: list[Ledger],
    name: str,
    seed: int,
    trial: Trial,
    stop: asyncio.Event,
) -> None:
    """One client's load until the kill: each call's answer goes into the ledger."""
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    mine: dict[str, list[str]] = {ledger.space: [] for ledger in ledgers}
    count = 0
    while not stop.is_set():
        ledger = pick.choice(ledgers)
        meta = md(ledger.space, ledger.token)
        roll = pick.random()
        try:
            trial.calls += 1
            if roll < 0.55:
                count += 1
                memory_id = f"{ledger.space}-{name}-{count}"
                want = expected(rng, memory_id)
                ledger.maybe_live[memory_id] = want
                await stubs.memories.Remember(
                    pb.RememberRequest(memory=as_memory(memory_id, want)),
                    metadata=meta,
                    timeout=CALL_TIMEOUT_S,
                )
                ledger.live[memory_id] = ledger.maybe_live.pop(memory_id)
                ledger.acknowledged += 1
                mine[ledger.space].append(memory_id)
            elif roll < 0.67:
                batch = {}
                for _ in range(pick.randint(2, 6)):
                    count += 1
                    memory_id = f"{ledger.space}-{name}-{count}"
                    batch[memory_id] = expected(rng, memory_id)
                ledger.maybe_live.update(batch)

                async def requests(
                    batch: dict[str, Expected] = batch,
                ) -> AsyncIterator[pb.RememberRequest]:
                    for memory_id, want in batch.items():
                        yield pb.RememberRequest(memory=as_memory(memory_id, want))

                # grpc.aio's stream-unary call can outlive its deadline when the server dies
                # under it (grpc/grpc#29952): bound it here.
                done = await asyncio.wait_for(
                    stubs.memories.RememberBatch(requests(), metadata=meta, timeout=CALL_TIMEOUT_S),
                    CALL_TIMEOUT_S + 5,
                )
                assert list(done.ids) == list(batch), "the batch answered other ids"
                for memory_id in batch:
                    ledger.live[memory_id] = ledger.maybe_live.pop(memory_id)
                ledger.acknowledged += len(batch)
                mine[ledger.space].extend(batch)
            elif roll < 0.93 and mine[ledger.space]:
                memory_id = mine[ledger.space].pop(pick.randrange(len(mine[ledger.space])))
                ledger.maybe_forgotten[memory_id] = ledger.live.pop(memory_id)
                forgot = await stubs.memories.Forget(
                    pb.ForgetRequest(id=memory_id), metadata=meta, timeout=CALL_TIMEOUT_S
                )
                if not forgot.forgotten:
                    trial.failures.append(f"Forget of acknowledged {memory_id} found nothing")
                del ledger.maybe_forgotten[memory_id]
                ledger.forgotten.add(memory_id)
                ledger.acknowledged += 1
            elif roll < 0.97:
                await stubs.memories.Consolidate(
                    pb.ConsolidateRequest(), metadata=meta, timeout=CALL_TIMEOUT_S
                )
            else:
                await stubs.memories.Recall(
                    pb.RecallRequest(cue=[1.0] * DIM, k=5), metadata=meta, timeout=CALL_TIMEOUT_S
                )
        except (grpc.aio.AioRpcError, TimeoutError) as err:
            if not trial.killed:
                trial.failures.append(f"{name} in {ledger.space} before the kill: {err!r}")
            return


async def get(stubs: Stubs, ledger: Ledger, memory_id: str) -> pb.Memory | None:
    try:
        found = await stubs.memories.Get(
            pb.GetRequest(id=memory_id),
            metadata=md(ledger.space, ledger.token),
            timeout=CALL_TIMEOUT_S,
        )
    except grpc.aio.AioRpcError as err:
        if err.code() is grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return found.memory


def matches(found: pb.Memory, want: Expected) -> bool:
    embedding = tuple(float(np.float32(v)) for v in found.embedding)
    return found.content == want.content and embedding == want.embedding


async def check(stubs: Stubs, ledger: Ledger) -> list[str]:
    """Compare the restarted space with its ledger; settle the uncertain writes. Returns every
    discrepancy (empty: all is well)."""
    problems: list[str] = []
    ids = [*ledger.live, *ledger.forgotten, *ledger.maybe_live, *ledger.maybe_forgotten]
    found: dict[str, pb.Memory | None] = {}
    for start in range(0, len(ids), 64):
        chunk = ids[start : start + 64]
        answers = await asyncio.gather(*(get(stubs, ledger, i) for i in chunk))
        found.update(zip(chunk, answers, strict=True))
    for memory_id, want in ledger.live.items():
        memory = found[memory_id]
        if memory is None:
            problems.append(f"acknowledged memory {memory_id} is lost")
        elif not matches(memory, want):
            problems.append(f"acknowledged memory {memory_id} came back changed: {memory}")
    for memory_id in ledger.forgotten:
        if found[memory_id] is not None:
            problems.append(f"forgotten memory {memory_id} came back")
    for memory_id, want in ledger.maybe_live.items():
        memory = found[memory_id]
        if memory is not None:
            if not matches(memory, want):
                problems.append(f"in-flight memory {memory_id} is there but damaged: {memory}")
            ledger.live[memory_id] = want
    for memory_id, want in ledger.maybe_forgotten.items():
        if found[memory_id] is None:
            ledger.forgotten.add(memory_id)
        else:
            ledger.live[memory_id] = want
    ledger.maybe_live.clear()
    ledger.maybe_forgotten.clear()
    health = await stubs.spaces.Health(
        pb.HealthRequest(space=ledger.space),
        metadata=md(token=ledger.token),
        timeout=CALL_TIMEOUT_S,
    )
    (space,) = health.spaces
    if space.memories != len(ledger.live):
        problems.append(
            f"space {ledger.space} holds {space.memories} memories, the ledger {len(ledger.live)}"
        )
    return problems


async def run_trial(server: ServerProcess, ledgers: list[Ledger], seed: int) -> Trial:
    trial = Trial()
    stop = asyncio.Event()
    channels = [Stubs(server.address) for _ in range(CLIENTS)]
    try:
        tasks = [
            asyncio.create_task(client(stubs, ledgers, f"c{n}s{seed}", seed * 100 + n, trial, stop))
            for n, stubs in enumerate(channels)
        ]
        await asyncio.sleep(random.Random(seed).uniform(*KILL_AFTER_S))
        trial.killed = True
        server.kill()
        stop.set()
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks)
    finally:
        for stubs in channels:
            await stubs.close()
    return trial


@pytest.mark.parametrize("seed", range(SEEDS))
async def test_kill_9_under_load_loses_no_acknowledged_write_and_revives_no_forgotten_one(
    servers: Servers, admin_token_file: Path, tmp_path: Path, seed: int
) -> None:
    server = servers(tmp_path / "data", "--admin-token-file", str(admin_token_file))
    await server.start()
    ledgers = [Ledger(space, f"token-of-{space}") for space in SPACES]
    stubs = Stubs(server.address)
    for ledger in ledgers:
        settings = SPACES[ledger.space]
        await create_space(
            stubs, ledger.space, ledger.token, tiers=settings.tiers if settings.tiers else None
        )
    await stubs.close()
    summary = []
    for number in range(TRIALS):
        started = time.monotonic()
        trial = await run_trial(server, ledgers, seed * 1000 + number)
        assert not trial.failures, "\n".join(trial.failures[:20]) + "\n" + server.all_logs()
        await server.start()
        stubs = Stubs(server.address)
        try:
            for ledger in ledgers:
                problems = await check(stubs, ledger)
                assert not problems, "\n".join(problems[:30])
        except (AssertionError, grpc.aio.AioRpcError) as err:
            raise AssertionError(
                f"trial {number} (seed {seed}): {err}\n\nserver log:\n{server.all_logs()[-30000:]}"
            ) from err
        finally:
            await stubs.close()
        summary.append(
            f"trial {number}: {trial.calls} calls, "
            f"{sum(len(ledger.live) for ledger in ledgers)} live, "
            f"{sum(len(ledger.forgotten) for ledger in ledgers)} forgotten, "
            f"{time.monotonic() - started:.1f} s"
        )
    # Finally a graceful drain (consolidates every space) and one more check.
    assert await server.stop() == 0, server.log()
    await server.start()
    stubs = Stubs(server.address)
    try:
        for ledger in ledgers:
            problems = await check(stubs, ledger)
            assert not problems, "after a drain:\n" + "\n".join(problems[:30])
    finally:
        await stubs.close()
    acknowledged = sum(ledger.acknowledged for ledger in ledgers)
    assert acknowledged > 0, "no write was acknowledged: the trials tested nothing"
    print(f"seed {seed}: {acknowledged} acknowledged writes; " + "; ".join(summary))
