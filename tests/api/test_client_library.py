"""The client library as a user meets it (docs/client.md): both flavours against real servers,
credentials from a mounted Secret, typed answers with numpy embeddings, retries while a server
is away, and watch() resuming after a drain and after a killed server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from memspace_contract import client, index
from memspace_contract.client import results, retrying
from memspace_contract.v1 import memspace_pb2 as pb
from tests.api.conftest import ADMIN_TOKEN, DIM, Start, failure, memspace_serve
from tests.conftest import QuotaClock

QUICK = client.RetryPolicy(attempts=400, initial_backoff_s=0.05, max_backoff_s=0.2, total_s=60)
"""Short waits, but long enough in all for a `memspace serve` to start on a busy machine."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_the_sync_client_stores_recalls_gets_and_forgets_with_numpy(tmp_path: Path) -> None:
    args = ["--data-root", str(tmp_path / "data"), "--listen", "127.0.0.1:0"]
    args += ["--default-embedding-dim", str(DIM), "--metrics-listen", "off"]
    with memspace_serve(args, tmp_path / "log") as server:
        environ = {"MEMSPACE_ENDPOINT": server.address}
        with client.MemspaceClient.from_env(environ) as memspace:
            sky = np.array([1.0, 0.1, 0.0, 0.0], dtype=np.float32)
            done = memspace.remember("the sky is blue", sky, tags={"source": "chat"})
            assert isinstance(done, client.Remembered)
            assert len(done.id) == 32  # made by the client, so a retry stores it once
            assert done.lsn >= 1
            memspace.remember("grass is green", [0.0, 1.0, 0.0, 0.0], memory_id="grass")
            hits = memspace.recall(sky, k=2, include_embeddings=True, exact=True)
            assert [hit.memory.id for hit in hits] == [done.id, "grass"]
            assert all(isinstance(hit, client.Hit) for hit in hits)
            # Its own vector: cosine 1 up to float32 rounding, never above.
            assert hits[0].score == pytest.approx(1.0, abs=1e-6)
            assert -1.0 <= hits[1].score <= hits[0].score <= 1.0
            assert hits[0].tier == "hot"
            first = hits[0].memory.embedding
            assert first is not None
            assert first.dtype == np.float32
            np.testing.assert_array_equal(first, sky)
            without = memspace.recall(sky, k=1)
            assert without[0].memory.embedding is None
            got = memspace.get(done.id)
            assert (got.content, dict(got.tags), got.recall_count) == (
                "the sky is blue",
                {"source": "chat"},
                2,
            )
            assert got.created_at is not None
            assert got.last_recalled_at is not None
            gone = memspace.forget(done.id)
            assert gone
            assert gone.lsn > done.lsn
            assert not memspace.forget(done.id)
            with pytest.raises(grpc.RpcError) as missing:
                memspace.get(done.id)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            batch = memspace.remember_batch(
                ["a", "b", "c"], np.eye(3, DIM, dtype=np.float32), tags={"kind": "batch"}
            )
            assert (batch.count, len(batch.ids)) == (3, 3)
            assert [h.memory.id for h in memspace.recall(np.eye(1, DIM)[0], k=1)] == [batch.ids[0]]
            health = memspace.health()
            assert health.status == "SERVING"
            assert [(s.space, s.memories) for s in health.spaces] == [("default", 4)]
            index = health.spaces[0].index
            assert index is not None
            assert (index.type, index.build_state) == ("exact", "none")
            with pytest.raises(ValueError, match="one-dimensional"):
                memspace.recall(np.ones((2, DIM)), k=1)


async def test_the_async_client_reads_a_mounted_secret_and_stays_in_its_space(
    start: Start, admin_token_file: Path, tmp_path: Path
) -> None:
    running = await start(admin_token_file=admin_token_file)
    for space, token in (("team-a", "token-a"), ("team-b", "token-b")):
        await running.spaces.CreateSpace(
            pb.CreateSpaceRequest(
                space=space, embedding_dim=DIM, token_sha256=index.token_sha256(token)
            ),
            metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
        )
    secret = tmp_path / "secret"
    secret.mkdir()
    for key, value in {"space": "team-a", "endpoint": running.address, "token": "token-a"}.items():
        (secret / key).write_text(value + "\n")
    async with client.AsyncMemspaceClient.from_secret_dir(secret) as memspace:
        assert memspace.credentials.space == "team-a"
        done = await memspace.remember("mine", np.array([0.0, 0.0, 1.0, 0.0]))
        hits = await memspace.recall([0.0, 0.0, 1.0, 0.0], k=5)
        assert [(h.memory.id, h.memory.content) for h in hits] == [(done.id, "mine")]
        health = await memspace.health()
        assert [s.space for s in health.spaces] == ["team-a"]
        assert health.spaces[0].tier_memories == {"hot": 1, "warm": 0, "cold": 0}
    other = client.Credentials(endpoint=running.address, space="team-b", token="token-b")
    async with client.AsyncMemspaceClient(other) as memspace:
        assert await memspace.recall([0.0, 0.0, 1.0, 0.0], k=5) == []
        err = await failure(memspace.get(done.id))
        assert err.code() is grpc.StatusCode.NOT_FOUND


async def test_calls_are_retried_while_the_server_is_away_and_not_without_a_policy(
    start: Start, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    credentials = client.Credentials(endpoint=address)
    async with client.AsyncMemspaceClient(credentials, retry=client.NO_RETRY) as memspace:
        err = await failure(memspace.recall([1.0, 0.0, 0.0, 0.0], k=1))
        assert err.code() is grpc.StatusCode.UNAVAILABLE

    async def start_later() -> None:
        await asyncio.sleep(0.5)
        await start(listen=address)

    later = asyncio.create_task(start_later())
    async with client.AsyncMemspaceClient(credentials, retry=QUICK) as memspace:
        done = await memspace.remember("after a wait", [1.0, 0.0, 0.0, 0.0])
        assert later.done()
        assert (await memspace.get(done.id)).content == "after a wait"
    await later


async def test_errors_that_a_retry_cannot_fix_are_raised_at_once(start: Start) -> None:
    running = await start()
    credentials = client.Credentials(endpoint=running.address)
    # A single retry would wait at least 10 s: far more than a call takes on a loaded machine.
    patient = client.RetryPolicy(attempts=5, initial_backoff_s=20, max_backoff_s=20, total_s=120)
    async with client.AsyncMemspaceClient(credentials, retry=patient) as memspace:
        loop = asyncio.get_running_loop()
        began = loop.time()
        err = await failure(memspace.recall([0.0, 0.0, 0.0, 0.0], k=1))  # a zero vector
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert loop.time() - began < patient.initial_backoff_s / 2


def test_retry_waits_grow_and_stay_within_the_policy() -> None:
    policy = client.RetryPolicy(initial_backoff_s=0.1, multiplier=2, max_backoff_s=0.5)
    for attempt, bound in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)):
        waits = [policy.backoff(attempt) for _ in range(50)]
        assert all(bound / 2 <= wait <= bound for wait in waits)
    with pytest.raises(ValueError, match="attempts"):
        client.RetryPolicy(attempts=0)


async def _watch_into(
    memspace: client.AsyncMemspaceClient, since: int, into: list[client.Event]
) -> None:
    async for event in memspace.watch(since_lsn=since):
        into.append(event)


async def _until(count: int, events: list[client.Event]) -> None:
    for _ in range(1000):
        if len(events) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{len(events)} events within 20 s; {count} expected")


async def test_watch_resumes_after_a_drain_without_losing_or_repeating_an_event(
    start: Start, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    root = tmp_path / "data"
    first_server = await start(data_root=root, listen=address)
    credentials = client.Credentials(endpoint=address)
    events: list[client.Event] = []
    async with client.AsyncMemspaceClient(credentials, retry=QUICK) as memspace:
        first = await memspace.remember("one", [1.0, 0.0, 0.0, 0.0])
        watcher = asyncio.create_task(_watch_into(memspace, first.lsn, events))
        ids = [first.id]
        for n in range(2):
            ids.append((await memspace.remember(f"before {n}", [1.0, 1.0, 0.0, 0.0])).id)
        await _until(3, events)
        await first_server.server.drain()
        await start(data_root=root, listen=address)
        for n in range(3):
            ids.append((await memspace.remember(f"after {n}", [0.0, 1.0, 0.0, 0.0])).id)
        gone = await memspace.forget(ids[1])
        await _until(7, events)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    assert [e.id for e in events] == [*ids, ids[1]]
    assert [e.kind for e in events] == ["remembered"] * 6 + ["forgotten"]
    lsns = [e.lsn for e in events]
    assert lsns == sorted(set(lsns))
    assert lsns[-1] == gone.lsn


def test_the_sync_watch_resumes_after_the_server_is_killed(tmp_path: Path) -> None:
    port = free_port()
    args = ["--data-root", str(tmp_path / "data"), "--listen", f"127.0.0.1:{port}"]
    args += ["--default-embedding-dim", str(DIM), "--metrics-listen", "off"]
    credentials = client.Credentials(endpoint=f"127.0.0.1:{port}")
    events: list[client.Event] = []
    with client.MemspaceClient(credentials, retry=QUICK) as memspace:
        with memspace_serve(args, tmp_path / "log1") as server:
            first = memspace.remember("one", [1.0, 0.0, 0.0, 0.0])

            failures: list[BaseException] = []

            def follow() -> None:
                try:
                    for event in memspace.watch(since_lsn=first.lsn):
                        events.append(event)
                        if len(events) == 4:
                            return
                except grpc.RpcError as err:
                    failures.append(err)

            reader = threading.Thread(target=follow, daemon=True)
            reader.start()
            second = memspace.remember("two", [1.0, 0.0, 0.0, 0.0])
            for _ in range(400):
                if len(events) == 2:
                    break
                threading.Event().wait(0.02)
            assert [e.id for e in events] == [first.id, second.id]
            server.popen.kill()  # the connection drops with no goodbye
            server.popen.wait()
        with memspace_serve(args, tmp_path / "log2"):
            third = memspace.remember("three", [1.0, 0.0, 0.0, 0.0])
            fourth = memspace.remember("four", [1.0, 0.0, 0.0, 0.0])
            reader.join(20)
    assert not reader.is_alive()
    assert failures == []
    assert [e.id for e in events] == [first.id, second.id, third.id, fourth.id]
    assert [e.lsn for e in events] == sorted({e.lsn for e in events})


def test_results_say_unknown_health_figures_as_none() -> None:
    message = pb.SpaceHealth(space="a-space", state="Active", memories=0, unknown=["memories"])
    found = results.SpaceHealth.from_message(message)
    assert found.memories is None
    assert found.pressure == 0.0
    assert retrying.resume_lsn(object()) is None


async def test_a_rate_refusal_is_retried_after_the_delay_the_server_gives(
    start: Start, quota_clock: QuotaClock
) -> None:
    running = await start()
    await running.spaces.CreateSpace(
        pb.CreateSpaceRequest(
            space="slow", embedding_dim=DIM, quota=pb.SpaceQuota(max_writes_per_second=5)
        )
    )
    credentials = client.Credentials(endpoint=running.address, space="slow")
    async with client.AsyncMemspaceClient(credentials, retry=client.NO_RETRY) as memspace:
        refusals = []
        for n in range(12):
            try:
                await memspace.remember(f"burst {n}", [1.0, 0.0, 0.0, 0.0])
            except grpc.aio.AioRpcError as err:
                refusals.append(err)
        assert refusals
        assert {err.code() for err in refusals} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all(retrying.retry_after(err) is not None for err in refusals)
    quota_clock.follow()  # the paced writes below wait for the real retry-after
    async with client.AsyncMemspaceClient(credentials, retry=QUICK) as memspace:
        done = [await memspace.remember(f"paced {n}", [0.0, 1.0, 0.0, 0.0]) for n in range(12)]
        hits = await memspace.recall([0.0, 1.0, 0.0, 0.0], k=20)
    assert {hit.memory.id for hit in hits} >= {d.id for d in done}
