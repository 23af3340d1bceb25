"""The journey's client: runs inside a tenant's pod (the memspace image, the tenant's credentials
Secret mounted at $MEMSPACE_CREDENTIALS_DIR), calls its shard through the Service's DNS name, and
prints what it saw as JSON lines for the test to check. Only the image's own packages are used.

    python agent.py tour                        Remember, Recall, Get, Forget and Subscribe
    python agent.py trespass SPACE < TOKEN      another tenant's space and token, refused?
    python agent.py write PREFIX STOP_FILE      Remember until STOP_FILE exists: one line per
                                                acknowledged write (the ledger), retrying through
                                                shard restarts
    python agent.py verify < IDS                Get every ID of a JSON list; the missing ones
    python agent.py probe                       one Recall, no retry: its status code
    python agent.py admin < TOKEN               the shard's Health with an admin token: its code

The test reads the Secret's keys only through this pod: it never dials a shard itself.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from memspace_contract import client
from memspace_contract.v1 import memspace_pb2 as pb

DIM = 8
RETRY_S = 180.0
"""How long a call is retried while the shard answers UNAVAILABLE (mounting, restarting)."""
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
T = TypeVar("T")


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def vector(seed: int) -> list[float]:
    """A distinct, non-zero embedding per seed."""
    return [1.0 if i == seed % DIM else 0.1 * ((seed + i) % 3) for i in range(DIM)]


async def retrying(call: Callable[[], Awaitable[T]], within_s: float = RETRY_S) -> T:
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            if err.code() not in RETRIED or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.5)


async def tour(credentials: client.Credentials) -> None:
    """Every call of a tenant's day, with a Subscribe opened first that must see exactly this
    space's own events (another tenant writes to the same shard meanwhile)."""
    async with client.connect(credentials) as memspace:
        # Wait until the space serves (its volume may still be mounting).
        await retrying(lambda: memspace.recall(vector(0), k=1))
        texts = ("the sky is blue", "grass is green", "snow is white")
        ids: list[str] = []

        async def remember(seed: int) -> int:
            answer = await memspace.remember(
                texts[seed],
                vector(seed),
                memory_id=f"{credentials.space}-{seed}",
                tags={"seed": str(seed)},
            )
            ids.append(answer.id)
            return int(answer.lsn)

        events: list[dict[str, Any]] = []

        async def follow(since_lsn: int) -> None:
            request = pb.SubscribeRequest(since_lsn=since_lsn)
            async for event in memspace.memories.Subscribe(request):
                events.append(
                    {
                        "space": event.space,
                        "type": pb.EventType.Name(event.type),
                        "id": event.id,
                        "lsn": event.lsn,
                    }
                )
                if len(events) == 4:
                    return

        # Subscribed from the first write's LSN: that event comes from the WAL, the rest live
        # (a stream from "now" could miss writes made before the server registered it).
        first = await remember(0)
        follower = asyncio.create_task(follow(first))
        await remember(1)
        await remember(2)
        hits = await memspace.recall(vector(0), k=3)
        got = await memspace.get(ids[1])
        forgotten = await memspace.forget(ids[2])
        try:
            await memspace.get(ids[2])
            after_forget = "OK"
        except grpc.aio.AioRpcError as err:
            after_forget = err.code().name
        await asyncio.wait_for(follower, 30)
        say(
            space=credentials.space,
            endpoint=credentials.endpoint,
            secure=credentials.secure,
            remembered=ids,
            recalled=[hit.memory.content for hit in hits],
            got=got.content,
            forgotten=forgotten.forgotten,
            after_forget=after_forget,
            events=events,
        )


async def trespass(credentials: client.Credentials, other_space: str, other_token: str) -> None:
    """This tenant's token on the other's space, and the other's token on this space (over
    the same connection settings: TLS with the Secret's ca.crt when it has one)."""
    attempts = {
        "own_token_other_space": dataclasses.replace(credentials, space=other_space),
        "other_token_own_space": dataclasses.replace(credentials, token=other_token),
    }
    codes = {}
    for name, attempt in attempts.items():
        async with client.connect(attempt) as memspace:
            try:
                await retrying(lambda m=memspace: m.recall(vector(0), k=1), 60)  # type: ignore[misc]
                codes[name] = "OK"
            except grpc.aio.AioRpcError as err:
                codes[name] = err.code().name
    say(**codes)


async def write(credentials: client.Credentials, prefix: str, stop: Path) -> None:
    """Remember until `stop` exists; print {"ack": id} only once the server acknowledged it (so
    the lines are the client's ledger), {"error": code} for every failed attempt, and retry the
    same memory until it is acknowledged."""
    n = 0
    async with client.connect(credentials) as memspace:
        while not await asyncio.to_thread(stop.exists):
            memory_id = f"{prefix}-{n}"
            try:
                answer = await memspace.memories.Remember(
                    pb.RememberRequest(
                        memory=pb.Memory(id=memory_id, content=memory_id, embedding=vector(n))
                    ),
                    timeout=10,
                )
            except grpc.aio.AioRpcError as err:
                say(error=err.code().name, id=memory_id, at=time.time())
                await asyncio.sleep(0.2)
                continue
            say(ack=answer.id, lsn=answer.lsn, at=time.time())
            n += 1
            await asyncio.sleep(0.02)
    say(done=n)


async def verify(credentials: client.Credentials, ids: list[str]) -> None:
    missing = []
    async with client.connect(credentials) as memspace:
        for memory_id in ids:
            try:
                got = await retrying(lambda i=memory_id: memspace.get(i))  # type: ignore[misc]
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                missing.append(memory_id)
                continue
            if got.content != memory_id:
                missing.append(memory_id)
    say(checked=len(ids), missing=missing)


async def probe(credentials: client.Credentials) -> None:
    async with client.connect(credentials) as memspace:
        try:
            await memspace.recall(vector(0), k=1)
            say(code="OK")
        except grpc.aio.AioRpcError as err:
            say(code=err.code().name, details=err.details())


async def admin(credentials: client.Credentials, token: str) -> None:
    shard = dataclasses.replace(credentials, space=None, token=token)
    async with client.connect(shard) as memspace:
        try:
            answer = await memspace.health()
            say(code="OK", spaces=len(answer.spaces))
        except grpc.aio.AioRpcError as err:
            say(code=err.code().name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("tour")
    trespassing = commands.add_parser("trespass")
    trespassing.add_argument("space")
    writing = commands.add_parser("write")
    writing.add_argument("prefix")
    writing.add_argument("stop", type=Path)
    commands.add_parser("verify")
    commands.add_parser("probe")
    commands.add_parser("admin")
    args = parser.parse_args(argv)
    credentials = client.Credentials.from_env()
    if args.command == "tour":
        asyncio.run(tour(credentials))
    elif args.command == "trespass":
        asyncio.run(trespass(credentials, args.space, sys.stdin.read().strip()))
    elif args.command == "write":
        asyncio.run(write(credentials, args.prefix, args.stop))
    elif args.command == "verify":
        asyncio.run(verify(credentials, json.load(sys.stdin)))
    elif args.command == "probe":
        asyncio.run(probe(credentials))
    else:
        asyncio.run(admin(credentials, sys.stdin.read().strip()))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    sys.exit(main())
