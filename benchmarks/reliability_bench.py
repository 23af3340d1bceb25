"""Reliability benchmarks, each figure beside its baseline in the same run:

- load: 20 spaces (each with its own token, two with a write quota) under a closed loop of
  Remember, Recall, RememberBatch and Subscribe calls at the highest rate the server takes,
  bounded by a number of calls and a number of seconds, with a live subscriber per space,
  slow subscribers that never read and large requests: `load_rps`, `load_p50_ms`,
  `load_p99_ms`, `load_errors` (every error but the quota's deliberate RESOURCE_EXHAUSTED),
  `load_quota_refusals`, `load_rss_growth_mib` (the server's anonymous memory);
- noisy neighbour: the p99 Recall latency of a quiet space alone (the baseline), then while
  another space floods writes and recalls at full speed from another process, with and
  without a write quota on the noisy space: `noisy_neighbour_p99_ratio` (quota on),
  `noisy_neighbour_p99_ratio_no_quota`, and the flood's refused writes. Its own floor is the
  same flood sent to a second server process on the same machine instead (as if the noisy
  space were on another shard): `noisy_neighbour_apart_p99_ratio` is what the machine's
  shared cores cost the quiet space, `noisy_neighbour_vs_apart` what sharing one server adds.

The load generator (`run_load`) is also what `tests/reliability/test_load.py` checks for
correctness; timing figures live only here. `python -m benchmarks.reliability_bench flood ...`
is the noisy neighbour's process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np

from benchmarks.grpc_bench import Process, beside_process, memspace_serve, p99_ms
from memspace_contract import index, spaces
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc

C = grpc.StatusCode
CALL_TIMEOUT_S = 30.0
RESUME_KEY = "memspace-resume-lsn"


# -- spaces -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tenant:
    space: str
    token: str
    quota: float | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-memory-space", self.space), ("authorization", f"Bearer {self.token}"))


def admin_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def create(
    stub: pb_grpc.SpaceServiceAsyncStub, admin_token: str, tenant: Tenant, dim: int
) -> None:
    await stub.CreateSpace(
        pb.CreateSpaceRequest(
            space=tenant.space,
            embedding_dim=dim,
            token_sha256=index.token_sha256(tenant.token),
            quota=pb.SpaceQuota(max_writes_per_second=tenant.quota or 0.0),
        ),
        metadata=admin_metadata(admin_token),
        timeout=CALL_TIMEOUT_S,
    )


async def seed(
    stub: pb_grpc.MemoryServiceAsyncStub, tenant: Tenant, count: int, dim: int, content: int = 40
) -> int:
    """`count` memories by RememberBatch streams of 500; returns the last LSN."""
    rng = np.random.default_rng(list(tenant.space.encode()))
    last = 0
    for start in range(0, count, 500):
        rows = rng.standard_normal((min(500, count - start), dim)).astype(np.float32)

        async def requests(
            rows: Any = rows, start: int = start
        ) -> AsyncIterator[pb.RememberRequest]:
            for n, row in enumerate(rows):
                yield pb.RememberRequest(
                    memory=pb.Memory(
                        id=f"seed-{start + n}",
                        content=f"{tenant.space} seed {start + n} ".ljust(content, "."),
                        embedding=row.tolist(),
                        tags={"kind": "seed"},
                    )
                )

        done = await stub.RememberBatch(
            requests(), metadata=tenant.metadata, timeout=CALL_TIMEOUT_S
        )
        last = done.last_lsn
    return last


# -- the load ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    calls: int = 4000
    """Calls in all (the load stops at this many, or at `seconds`)."""
    seconds: float = 60.0
    concurrency: int = 32
    dim: int = 64
    slow_subscribers: int = 10
    """Streams on the busiest space that never read until the end."""
    burst: int = 5000
    """Memories written into the busiest space in batches during the load: more than the
    transport buffers of its slow subscribers hold, so the server must cut them off."""
    large_every: int = 100
    """One call in this many is a large one: 64 KiB of content, or k=1000 with embeddings."""
    oversized_every: int = 700
    """One call in this many is over the message size limit (a deliberate refusal)."""
    channels: int = 4


@dataclasses.dataclass
class LoadResult:
    calls: int = 0
    elapsed_s: float = 0.0
    latencies: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list)
    )
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    """Every refusal the plan did not ask for: `method CODE: details`."""
    quota_refusals: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    oversized_refusals: int = 0
    feed_problems: list[str] = dataclasses.field(default_factory=list)
    slow_cut_off: int = 0
    events_seen: int = 0
    resubscribed: int = 0
    """Live subscribers cut off for falling behind that resumed from the LSN given."""
    acknowledged: dict[str, set[int]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(set)
    )

    @property
    def rps(self) -> float:
        return self.calls / self.elapsed_s if self.elapsed_s else 0.0

    def all_latencies(self) -> list[float]:
        return [v for values in self.latencies.values() for v in values]

    def p50_ms(self) -> float:
        ordered = sorted(self.all_latencies())
        return ordered[len(ordered) // 2] * 1000.0 if ordered else 0.0

    def p99_ms(self) -> float:
        found = self.all_latencies()
        return p99_ms(found) if found else 0.0

    def summary(self) -> dict[str, object]:
        return {
            "calls": self.calls,
            "seconds": round(self.elapsed_s, 2),
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50_ms(), 2),
            "p99_ms": round(self.p99_ms(), 2),
            "errors": sum(self.errors.values()),
            "quota_refusals": sum(self.quota_refusals.values()),
            "oversized_refusals": self.oversized_refusals,
            "slow_subscribers_cut_off": self.slow_cut_off,
            "events_seen": self.events_seen,
            "resubscribed": self.resubscribed,
            "by_method_p99_ms": {
                method: round(p99_ms(values), 2) for method, values in self.latencies.items()
            },
        }


class _Feed:
    """A live subscriber from `first` on: it must see every acknowledged write, in LSN order.
    Cut off for falling behind, it subscribes again from the LSN the server names, as the API
    says a client should."""

    def __init__(self, stubs: pb_grpc.MemoryServiceAsyncStub, tenant: Tenant, first: int) -> None:
        self.stubs = stubs
        self.tenant = tenant
        self.first = first
        self.lsns: list[int] = []
        self.resumed = 0
        self.stream: Any = None
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        since = self.first
        while True:
            self.stream = self.stubs.Subscribe(
                pb.SubscribeRequest(since_lsn=since), metadata=self.tenant.metadata
            )
            try:
                async for event in self.stream:
                    if event.space != self.tenant.space:
                        raise AssertionError(f"{self.tenant.space} got an event of {event.space}")
                    self.lsns.append(event.lsn)
            except grpc.aio.AioRpcError as err:
                trailers = _trailers(err)
                if err.code() is not C.RESOURCE_EXHAUSTED or RESUME_KEY not in trailers:
                    raise
                since = int(trailers[RESUME_KEY])
                self.resumed += 1
            else:
                return

    async def finish(self, acknowledged: set[int], result: LoadResult, limit_s: float) -> None:
        last = max(acknowledged, default=0)
        deadline = time.monotonic() + limit_s
        while (self.lsns[-1] if self.lsns else 0) < last and time.monotonic() < deadline:
            if self.task.done():
                break
            await asyncio.sleep(0.05)
        self.task.cancel()
        if self.stream is not None:
            self.stream.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self.task
        space = self.tenant.space
        result.events_seen += len(self.lsns)
        result.resubscribed += self.resumed
        if self.lsns != list(range(self.first, self.first + len(self.lsns))):
            result.feed_problems.append(f"{space}: events out of order, repeated or missing")
        missing = {lsn for lsn in acknowledged if lsn >= self.first} - set(self.lsns)
        if missing:
            result.feed_problems.append(f"{space}: {len(missing)} acknowledged writes not seen")


def _trailers(err: grpc.aio.AioRpcError) -> dict[str, str]:
    # grpc.aio answers a grpc.aio.Metadata of (key, value) pairs; the stubs say otherwise.
    pairs = cast(Iterable[tuple[str, str]], err.trailing_metadata() or ())
    return {key: str(value) for key, value in pairs}


async def _drain_slow(stream: Any) -> tuple[int, grpc.StatusCode, dict[str, str]]:
    """Read a slow subscriber at last: (events, how it ended, trailing metadata). A stream
    still open after two idle seconds was not cut off (and is cancelled)."""
    count = 0
    while True:
        try:
            event = await asyncio.wait_for(stream.read(), 2.0)
        except TimeoutError:
            return count, C.OK, {}
        except grpc.aio.AioRpcError as err:
            return count, err.code(), _trailers(err)
        if not isinstance(event, pb.MemoryEvent):  # the end of the stream
            return count, C.OK, {}
        count += 1


async def run_load(
    address: str,
    tenants: Sequence[Tenant],
    plan: LoadPlan,
    first_lsns: dict[str, int],
    seed: int = 1,
) -> LoadResult:
    """The load of `plan` on `tenants` (already created and seeded up to `first_lsns` - 1)."""
    result = LoadResult()
    rng = random.Random(seed)
    vectors = np.random.default_rng(seed).standard_normal((512, plan.dim)).astype(np.float32)
    channels = [
        grpc.aio.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        for _ in range(plan.channels)
    ]
    stubs = [pb_grpc.MemoryServiceStub(channel) for channel in channels]
    busiest = tenants[0]
    feeds = [_Feed(stubs[n % len(stubs)], t, first_lsns[t.space]) for n, t in enumerate(tenants)]
    slow = [
        stubs[n % len(stubs)].Subscribe(pb.SubscribeRequest(since_lsn=1), metadata=busiest.metadata)
        for n in range(plan.slow_subscribers)
    ]
    counter = iter(range(plan.calls))
    started = time.perf_counter()
    deadline = started + plan.seconds

    def vector() -> list[float]:
        return vectors[rng.randrange(len(vectors))].tolist()  # type: ignore[no-any-return]

    async def one(stub: pb_grpc.MemoryServiceAsyncStub, number: int) -> None:
        # The busiest space takes a third of the calls, the others share the rest.
        tenant = busiest if rng.random() < 0.33 else rng.choice(tenants)
        meta = tenant.metadata
        roll = rng.random()
        large = number % plan.large_every == plan.large_every - 1
        oversized = number % plan.oversized_every == plan.oversized_every - 1
        method = "Recall"
        begun = time.perf_counter()
        try:
            if oversized:
                method = "Oversized"
                await stub.Remember(
                    pb.RememberRequest(
                        memory=pb.Memory(content="o" * (5 * 1024 * 1024), embedding=vector())
                    ),
                    metadata=meta,
                    timeout=CALL_TIMEOUT_S,
                )
            elif roll < 0.40:
                method = "Remember"
                done = await stub.Remember(
                    pb.RememberRequest(
                        memory=pb.Memory(
                            content=("l" * 65536) if large else f"{tenant.space} {number}",
                            embedding=vector(),
                            tags={"kind": "load"},
                        )
                    ),
                    metadata=meta,
                    timeout=CALL_TIMEOUT_S,
                )
                result.acknowledged[tenant.space].add(done.lsn)
            elif roll < 0.80:
                await stub.Recall(
                    pb.RecallRequest(
                        cue=vector(), k=1000 if large else 10, include_embeddings=large
                    ),
                    metadata=meta,
                    timeout=CALL_TIMEOUT_S,
                )
            elif roll < 0.90:
                method = "RememberBatch"
                rows = [vector() for _ in range(10)]

                async def requests() -> AsyncIterator[pb.RememberRequest]:
                    for row in rows:
                        yield pb.RememberRequest(
                            memory=pb.Memory(content=f"{tenant.space} batch", embedding=row)
                        )

                batch = await stub.RememberBatch(requests(), metadata=meta, timeout=CALL_TIMEOUT_S)
                result.acknowledged[tenant.space].update(
                    range(batch.last_lsn - batch.count + 1, batch.last_lsn + 1)
                )
            else:
                method = "Subscribe"
                await _replay_a_few(stub, tenant, first_lsns[tenant.space])
        except grpc.aio.AioRpcError as err:
            details = err.details() or ""
            if err.code() is C.RESOURCE_EXHAUSTED and tenant.quota and "quota" in details:
                result.quota_refusals[tenant.space] += 1
            elif err.code() is C.RESOURCE_EXHAUSTED and oversized:
                result.oversized_refusals += 1
            else:
                result.errors[f"{method} {err.code().name}: {details[:120]}"] += 1
            return
        if oversized:
            result.errors["an oversized request was accepted"] += 1
            return
        result.latencies[method].append(time.perf_counter() - begun)

    async def worker(n: int) -> None:
        stub = stubs[n % len(stubs)]
        for number in counter:
            if time.perf_counter() > deadline:
                return
            await one(stub, number)
            result.calls += 1

    async def burst() -> None:
        rows = np.random.default_rng(seed + 1).standard_normal((250, plan.dim)).astype(np.float32)
        for _ in range(plan.burst // 250):

            async def requests() -> AsyncIterator[pb.RememberRequest]:
                for row in rows:
                    yield pb.RememberRequest(
                        memory=pb.Memory(content="burst", embedding=row.tolist())
                    )

            done = await stubs[0].RememberBatch(
                requests(), metadata=busiest.metadata, timeout=CALL_TIMEOUT_S
            )
            result.acknowledged[busiest.space].update(
                range(done.last_lsn - done.count + 1, done.last_lsn + 1)
            )

    try:
        await asyncio.gather(burst(), *(worker(n) for n in range(plan.concurrency)))
        result.elapsed_s = time.perf_counter() - started
        for feed in feeds:
            await feed.finish(result.acknowledged[feed.tenant.space], result, 30.0)
        for stream in slow:
            count, code, trailers = await _drain_slow(stream)
            if code is C.RESOURCE_EXHAUSTED and RESUME_KEY in trailers:
                result.slow_cut_off += 1
            elif code is not C.OK:
                result.errors[f"slow Subscribe {code.name}"] += 1
            del count
    finally:
        for channel in channels:
            await channel.close(None)
    return result


async def _replay_a_few(stub: pb_grpc.MemoryServiceAsyncStub, tenant: Tenant, first: int) -> None:
    """A short-lived subscriber: replay five events from the seeded part of the log."""
    stream = stub.Subscribe(
        pb.SubscribeRequest(since_lsn=max(1, first - 5)), metadata=tenant.metadata
    )
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            for _ in range(5):
                await stream.read()
    finally:
        stream.cancel()


# -- servers -------------------------------------------------------------------------------------


start_server: Callable[..., Process] = memspace_serve
"""Starts the `memspace serve` whose figures are taken (`benchmarks.reliability_ab` swaps in
another checkout's)."""


def rss_anon_kib(pid: int) -> int:
    """Anonymous resident memory: what the process allocated (not the page cache it maps)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise RuntimeError("no RssAnon")


@contextlib.contextmanager
def guarded_server(work: Path, name: str) -> Iterator[tuple[Process, str]]:
    """A `memspace serve` checking tokens: (process, admin token)."""
    token = secrets.token_urlsafe(24)
    token_file = work / f"{name}-admin-token"
    token_file.write_text(token)
    process = start_server(work / name, work / f"{name}.log", "--admin-token-file", str(token_file))
    try:
        process.wait_address()
        yield process, token
    finally:
        process.stop()


async def load_figures(
    results: dict[str, object], work: Path, quick: bool, plan: LoadPlan | None = None
) -> None:
    if plan is None:
        plan = LoadPlan(calls=3000 if quick else 20000, seconds=60.0 if quick else 120.0)
    tenants = [Tenant(f"load-{n:02d}", secrets.token_urlsafe(16)) for n in range(18)]
    tenants += [Tenant(f"load-{n:02d}", secrets.token_urlsafe(16), quota=20.0) for n in (18, 19)]
    with guarded_server(work, "load") as (process, admin):
        async with grpc.aio.insecure_channel(process.address) as channel:
            spaces = pb_grpc.SpaceServiceStub(channel)
            memories = pb_grpc.MemoryServiceStub(channel)
            first = {}
            for tenant in tenants:
                await create(spaces, admin, tenant, plan.dim)
                # A quota space takes no more than its one-second burst at once.
                count = 15 if tenant.quota else 500
                first[tenant.space] = await seed(memories, tenant, count, plan.dim) + 1
        before = rss_anon_kib(process.popen.pid)
        found = await run_load(process.address, tenants, plan, first)
        after = rss_anon_kib(process.popen.pid)
    summary = found.summary()
    print(f"   load: {json.dumps(summary)}", flush=True)
    if found.errors:
        print(f"   load errors: {dict(found.errors)}", flush=True)
    results["load_rps"] = round(found.rps, 1)
    results["load_p50_ms"] = round(found.p50_ms(), 2)
    results["load_p99_ms"] = round(found.p99_ms(), 2)
    results["load_errors"] = sum(found.errors.values()) + len(found.feed_problems)
    results["load_quota_refusals"] = sum(found.quota_refusals.values())
    results["load_rss_growth_mib"] = round((after - before) / 1024, 1)


# -- the noisy neighbour -------------------------------------------------------------------------


def flood_main(
    address: str, space: str, token: str, seconds: float, concurrency: int, mix: str = "both"
) -> None:
    """The noisy neighbour: Remember and Recall (`mix`: both, remember, recall) back to back at
    full speed, ignoring refusals; prints what it did as JSON."""

    async def flood() -> dict[str, int]:
        tenant = Tenant(space, token)
        counts: collections.Counter[str] = collections.Counter()
        rng = np.random.default_rng(3)
        cues = rng.standard_normal((64, 64)).astype(np.float32)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            stop_at = time.perf_counter() + seconds

            async def caller(n: int) -> None:
                i = n
                while time.perf_counter() < stop_at:
                    i += 1
                    cue = cues[i % len(cues)].tolist()
                    try:
                        if mix == "remember" or (mix == "both" and i % 2):
                            await stub.Remember(
                                pb.RememberRequest(
                                    memory=pb.Memory(content="noise", embedding=cue)
                                ),
                                metadata=tenant.metadata,
                            )
                            counts["remembered"] += 1
                        else:
                            await stub.Recall(
                                pb.RecallRequest(cue=cue, k=10), metadata=tenant.metadata
                            )
                            counts["recalled"] += 1
                    except grpc.aio.AioRpcError as err:
                        counts[err.code().name] += 1

            await asyncio.gather(*(caller(n) for n in range(concurrency)))
        return dict(counts)

    print(json.dumps(asyncio.run(flood())), flush=True)


async def quiet_p99(
    stub: pb_grpc.MemoryServiceAsyncStub, tenant: Tenant, samples: int, pace_s: float
) -> float:
    """p99 of sequential Recalls of the quiet space, one every `pace_s`."""
    cue = np.random.default_rng(9).standard_normal(64).astype(np.float32).tolist()
    request = pb.RecallRequest(cue=cue, k=10)
    for _ in range(20):
        await stub.Recall(request, metadata=tenant.metadata)
    found = []
    for _ in range(samples):
        begun = time.perf_counter()
        await stub.Recall(request, metadata=tenant.metadata)
        found.append(time.perf_counter() - begun)
        await asyncio.sleep(pace_s)
    return p99_ms(found)


async def with_flood(
    work: Path,
    address: str,
    noisy: Tenant,
    seconds: float,
    measure: Callable[[], Awaitable[float]],
    mix: str = "both",
) -> tuple[float, dict[str, int]]:
    """`measure()` while the noisy neighbour's process (`flood_main`) floods `address`; its
    figure and what the flood did."""
    command = ["flood", address, noisy.space, noisy.token, str(seconds), "16", mix]
    return await beside_process(
        [sys.executable, "-m", "benchmarks.reliability_bench", *command],
        work / f"flood-{noisy.space}.out",
        measure,
    )


@contextlib.contextmanager
def managed_server(work: Path, name: str) -> Iterator[tuple[Process, Path]]:
    """A `memspace serve` in managed mode, as under the operator: (process, index directory).
    Spaces, tokens and quotas come from index entries written here and reloaded live."""
    token_file = work / f"{name}-admin-token"
    token_file.write_text(secrets.token_urlsafe(24))
    index_dir = work / f"{name}-index"
    index_dir.mkdir()
    process = start_server(
        work / f"{name}-volumes",
        work / f"{name}.log",
        "--index-dir",
        str(index_dir),
        "--admin-token-file",
        str(token_file),
        "--index-refresh",
        "0.2",
    )
    try:
        process.wait_address()
        yield process, index_dir
    finally:
        process.stop()


def put_entry(index_dir: Path, volumes: Path, tenant: Tenant, dim: int) -> None:
    (volumes / tenant.space).mkdir(parents=True, exist_ok=True)
    index.write_entry(
        index_dir,
        index.IndexEntry(
            space_id=spaces.parse_space_id(tenant.space),
            embedding_dim=dim,
            token_sha256=index.token_sha256(tenant.token),
            quota=index.Quota(max_writes_per_second=tenant.quota),
        ),
    )


async def until_served(stub: pb_grpc.MemoryServiceAsyncStub, tenant: Tenant) -> None:
    """Wait until the server has read the space's index entry (NOT_FOUND for a missing
    memory, rather than PERMISSION_DENIED for an unknown space)."""
    for _ in range(100):
        try:
            await stub.Get(pb.GetRequest(id="none"), metadata=tenant.metadata)
        except grpc.aio.AioRpcError as err:
            if err.code() is C.NOT_FOUND:
                return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"space {tenant.space} was not served")


async def set_quota(
    stub: pb_grpc.MemoryServiceAsyncStub, index_dir: Path, volumes: Path, tenant: Tenant
) -> None:
    """Give `tenant` its quota (or none) through the index, as the operator would, and wait
    until the server applies it."""
    put_entry(index_dir, volumes, tenant, 64)
    probe = pb.RememberRequest(memory=pb.Memory(content="probe", embedding=[1.0] * 64))
    burst = int(tenant.quota or 100.0) * 2 + 2
    for _ in range(100):
        await asyncio.sleep(0.3)
        refused = False
        for _ in range(burst):
            try:
                await stub.Remember(probe, metadata=tenant.metadata)
            except grpc.aio.AioRpcError as err:
                if err.code() is not C.RESOURCE_EXHAUSTED:
                    raise
                refused = True
                break
        if refused == (tenant.quota is not None):
            await asyncio.sleep(1.1)  # a full bucket again
            return
    raise RuntimeError(f"the quota {tenant.quota} of {tenant.space} was not applied")


async def noisy_figures(results: dict[str, object], work: Path, quick: bool) -> None:
    """The quiet space's p99 Recall alone and beside a flood from the noisy space, without and
    with a write quota on it (set through the index, as the operator would), and beside the
    same flood sent to another server process (the machine's floor), in alternating rounds;
    each ratio is the median flood p99 over the median p99 alone."""
    samples = 300 if quick else 600
    rounds = 2 if quick else 3
    pace = 0.005
    measuring_s = samples * (pace + 0.002) + 3.0
    rate = 100.0
    quiet = Tenant("quiet", secrets.token_urlsafe(16))
    free = Tenant("noisy", secrets.token_urlsafe(16))
    capped = dataclasses.replace(free, quota=rate)
    alone: list[float] = []
    loud: dict[str, list[float]] = {
        "none": [],
        "quota": [],
        "apart": [],
        "writes": [],
        "writes-quota": [],
    }
    flood: dict[str, dict[str, int]] = {}
    with (
        managed_server(work, "noisy") as (process, index_dir),
        managed_server(work, "apart") as (apart, apart_index),
    ):
        volumes = work / "noisy-volumes"
        for tenant in (quiet, free):
            put_entry(index_dir, volumes, tenant, 64)
        put_entry(apart_index, work / "apart-volumes", free, 64)
        async with (
            grpc.aio.insecure_channel(process.address) as channel,
            grpc.aio.insecure_channel(apart.address) as apart_channel,
        ):
            memories = pb_grpc.MemoryServiceStub(channel)
            for tenant in (quiet, free):
                await until_served(memories, tenant)
                await seed(memories, tenant, 5000 if tenant is quiet else 20000, 64)
            elsewhere = pb_grpc.MemoryServiceStub(apart_channel)
            await until_served(elsewhere, free)
            await seed(elsewhere, free, 20000, 64)

            async def measure() -> float:
                return await quiet_p99(memories, quiet, samples, pace)

            plan = [(c, "both") for _ in range(rounds) for c in ("none", "quota", "apart")]
            plan += [("writes", "remember"), ("writes-quota", "remember")]
            for config, mix in plan:
                noisy = capped if config.endswith("quota") else free
                if config != "apart":
                    await set_quota(memories, index_dir, volumes, noisy)
                alone.append(await measure())
                target = apart.address if config == "apart" else process.address
                figure, flood[config] = await with_flood(
                    work, target, noisy, measuring_s, measure, mix
                )
                loud[config].append(figure)
    baseline = statistics.median(alone)
    ratios = {config: statistics.median(values) / baseline for config, values in loud.items()}
    print(
        f"   noisy neighbour: quiet p99 alone {[round(a, 2) for a in alone]} ms; beside a "
        f"flood of writes and recalls {loud['none']} ms ({flood['none']}), with a write "
        f"quota of {rate:g}/s {loud['quota']} ms ({flood['quota']}), sent to another server "
        f"{loud['apart']} ms ({flood['apart']}); beside a flood of writes {loud['writes']} ms, "
        f"with the quota {loud['writes-quota']} ms",
        flush=True,
    )
    results["noisy_neighbour_apart_p99_ratio"] = round(ratios["apart"], 2)
    results["noisy_neighbour_vs_apart"] = round(
        statistics.median(loud["none"]) / statistics.median(loud["apart"]), 2
    )
    results["noisy_neighbour_quiet_p99_ms"] = round(baseline, 2)
    results["noisy_neighbour_p99_ratio"] = round(ratios["quota"], 2)
    results["noisy_neighbour_p99_ratio_no_quota"] = round(ratios["none"], 2)
    results["noisy_neighbour_writes_p99_ratio"] = round(ratios["writes-quota"], 2)
    results["noisy_neighbour_writes_p99_ratio_no_quota"] = round(ratios["writes"], 2)
    results["noisy_neighbour_flood_refused_by_quota"] = flood["quota"].get("RESOURCE_EXHAUSTED", 0)


# -- entry points --------------------------------------------------------------------------------


PARTS = ("load", "noisy")


async def _run(
    results: dict[str, object], quick: bool, work: Path, parts: Sequence[str] = PARTS
) -> None:
    if "load" in parts:
        started = time.perf_counter()
        await load_figures(results, work, quick)
        print(f"   load: {time.perf_counter() - started:.0f} s", flush=True)
    if "noisy" in parts:
        started = time.perf_counter()
        await noisy_figures(results, work, quick)
        print(f"   noisy neighbour: {time.perf_counter() - started:.0f} s", flush=True)


def run(results: dict[str, object], quick: bool, parts: Sequence[str] = PARTS) -> None:
    with tempfile.TemporaryDirectory(prefix="memspace-reliability-bench-") as tmp:
        asyncio.run(_run(results, quick, Path(tmp), parts))


def main() -> None:
    """`python -m benchmarks.reliability_bench [--quick] [load] [noisy]`; `... flood ADDRESS
    SPACE TOKEN SECONDS CONCURRENCY` is the noisy neighbour."""
    args = sys.argv[1:]
    if args[:1] == ["flood"]:
        flood_main(args[1], args[2], args[3], float(args[4]), int(args[5]), *args[6:7])
        return
    figures: dict[str, object] = {}
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    run(figures, "--quick" in args, tuple(a for a in args if a in PARTS) or PARTS)
    print(json.dumps(figures, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
