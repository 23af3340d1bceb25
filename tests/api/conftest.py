"""Fixtures of the API tests: real grpc.aio servers on port 0, in this process (through the same
assembly as `memspace serve`) or as a `memspace serve` subprocess, and real generated stubs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from memspace_contract import index, spaces
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc
from memspace_server import settings
from memspace_server.api import serving

DIM = 4
ADMIN_TOKEN = "admin-secret-token"


def vec(*values: float) -> list[float]:
    """A DIM-long embedding starting with `values` (zero-padded)."""
    return [*values, *[0.0] * (DIM - len(values))]


def memory(content: str, *values: float, **tags: str) -> pb.Memory:
    return pb.Memory(content=content, embedding=vec(*values or (1.0,)), tags=tags)


def md(space: str | None = None, token: str | None = None) -> tuple[tuple[str, str], ...]:
    """Call metadata naming a space and/or carrying a bearer token."""
    pairs = []
    if space is not None:
        pairs.append(("x-memory-space", space))
    if token is not None:
        pairs.append(("authorization", f"Bearer {token}"))
    return tuple(pairs)


class Api:
    """Stubs over one channel to a server."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.memories = pb_grpc.MemoryServiceStub(channel)
        self.spaces = pb_grpc.SpaceServiceStub(channel)


class Running:
    """An in-process server and stubs to it."""

    def __init__(self, server: serving.Server, api: Api) -> None:
        self.server = server
        self.api = api
        self.memories = api.memories
        self.spaces = api.spaces

    @property
    def address(self) -> str:
        return self.server.address


def make_settings(data_root: Path, **overrides: Any) -> settings.ServerSettings:
    values: dict[str, Any] = {
        "data_root": data_root,
        "listen": "127.0.0.1:0",
        "metrics_listen": "off",
        "default_embedding_dim": DIM,
        "drain_timeout_s": 5.0,
        "index_refresh_s": 0.1,
        "maintain_interval_s": 0.2,
    }
    values.update(overrides)
    made = settings.ServerSettings(**values)
    settings.validate(made)
    return made


Start = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """Start in-process servers: `await start(**settings)`; all are drained at the end."""
    running: list[Running] = []

    async def _start(data_root: Path | None = None, **overrides: Any) -> Running:
        root = data_root or tmp_path / f"data{len(running)}"
        server = serving.Server(make_settings(root, **overrides))
        await server.start()
        channel = grpc.aio.insecure_channel(server.address)
        handle = Running(server, Api(channel))
        running.append(handle)
        return handle

    yield _start
    for handle in reversed(running):
        await handle.api.channel.close(None)
        await handle.server.drain()


@pytest.fixture
async def standalone(start: Start) -> Running:
    """A standalone server without tokens: `default` space of DIM dimensions."""
    return await start()


@pytest.fixture
def admin_token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin-token"
    path.write_text(ADMIN_TOKEN + "\n")
    return path


def write_entry(
    directory: Path,
    space: str,
    token: str | None = None,
    dim: int = DIM,
    volumes: Path | None = None,
    **fields: Any,
) -> index.IndexEntry:
    """Write an operator-style index entry (and, with `volumes`, mount an empty volume)."""
    entry = index.IndexEntry(
        space_id=spaces.SpaceId(space),
        embedding_dim=dim,
        token_sha256=index.token_sha256(token) if token else None,
        **fields,
    )
    index.write_entry(directory, entry)
    if volumes is not None:
        (volumes / space).mkdir(parents=True, exist_ok=True)
    return entry


@pytest.fixture
def managed_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(index directory, volumes directory) as the operator would lay them out."""
    index_dir = tmp_path / "index"
    volumes = tmp_path / "volumes"
    index_dir.mkdir()
    volumes.mkdir()
    return index_dir, volumes


async def status_of(call: Awaitable[Any]) -> grpc.StatusCode:
    """The status code a call ends with (OK when it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """The error a call must end with."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err
    raise AssertionError("the call succeeded; it should have failed")


async def collect(stream: Any, count: int, within_s: float = 30) -> list[Any]:
    """The first `count` messages of a server stream (within `within_s` seconds)."""
    found: list[Any] = []
    async with asyncio.timeout(within_s):
        async for message in stream:
            found.append(message)
            if len(found) == count:
                break
    return found


# -- a `memspace serve` subprocess ---------------------------------------------------------------

_SERVING = re.compile(r"serving \d+ spaces on (\S+)")


class Process:
    def __init__(self, popen: subprocess.Popen[str], address: str, log: Path) -> None:
        self.popen = popen
        self.address = address
        self.log = log

    def output(self) -> str:
        return self.log.read_text()


@contextlib.contextmanager
def memspace_serve(
    args: Sequence[str], log: Path, env: Mapping[str, str] | None = None, timeout: float = 90.0
) -> Iterator[Process]:
    """Run `memspace serve ARGS` until it logs its address (within `timeout`: a start imports
    the server and may make its default space, many seconds on a loaded machine); kill it at
    the end if still alive."""
    command = [sys.executable, "-m", "memspace_cli.main", "serve", *args]
    with log.open("w") as out:
        popen = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            found = _SERVING.search(log.read_text())
            if found:
                break
            if popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"memspace serve did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield Process(popen, found.group(1), log)
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGKILL)
        popen.wait()


def details(err: grpc.aio.AioRpcError) -> str:
    return err.details() or ""


Caller = Callable[[str, Sequence[tuple[str, str]]], Awaitable[Any]]
NO_TARGET = pb.BackupTarget(url="nowhere://backups")
"""A backup target the server refuses (INVALID_ARGUMENT) without contacting anything."""


def rpc_callers(api: Api) -> dict[str, Caller]:
    """A call of every memspace.v1 RPC naming a space in its `space` field (first argument) and
    with the given metadata; streams are read to their first message."""
    m, s = api.memories, api.spaces

    async def remember(space: str, meta: Sequence[tuple[str, str]]) -> Any:
        return await m.Remember(pb.RememberRequest(space=space, memory=memory("x")), metadata=meta)

    async def remember_batch(space: str, meta: Sequence[tuple[str, str]]) -> Any:
        async def requests() -> AsyncIterator[pb.RememberRequest]:
            yield pb.RememberRequest(space=space, memory=memory("x"))

        return await m.RememberBatch(requests(), metadata=meta)

    async def recall(space: str, meta: Sequence[tuple[str, str]]) -> Any:
        return await m.Recall(pb.RecallRequest(space=space, cue=vec(1), k=1), metadata=meta)

    async def get(space: str, meta: Sequence[tuple[str, str]]) -> Any:
        return await m.Get(pb.GetRequest(space=space, id="nothing"), metadata=meta)

    async def forget(space: str, meta: Sequence[tuple[str, str]]) -> Any:
        return await m.Forget(pb.ForgetRequest(space=space, id="nothing"), metadata=meta)

    async def subscribe(space: str, meta: Sequence[tuple[str, str]]) -> Any:
        stream = m.Subscribe(pb.SubscribeRequest(space=space, since_lsn=0), metadata=meta)
        # An accepted stream stays open, silent until an event; a refused one ends at once
        # (within a second or two on a loaded machine: the bound of the wait below).
        try:
            code = await asyncio.wait_for(asyncio.shield(stream.code()), 2.0)
        except TimeoutError:
            stream.cancel()
            return None
        if code is not grpc.StatusCode.OK:
            await stream.read()  # raises the stream's error
        return None

    async def consolidate(space: str, meta: Sequence[tuple[str, str]]) -> Any:
        return await m.Consolidate(pb.ConsolidateRequest(space=space), metadata=meta)

    async def create_space(space: str, meta: Sequence[tuple[str, str]]) -> Any:
        return await s.CreateSpace(
            pb.CreateSpaceRequest(space=space, embedding_dim=DIM), metadata=meta
        )

    async def delete_space(space: str, meta: Sequence[tuple[str, str]]) -> Any:
        return await s.DeleteSpace(pb.DeleteSpaceRequest(space=space), metadata=meta)

    async def list_spaces(space: str, meta: Sequence[tuple[str, str]]) -> Any:
        return await s.ListSpaces(pb.ListSpacesRequest(), metadata=meta)

    async def health(space: str, meta: Sequence[tuple[str, str]]) -> Any:
        return await s.Health(pb.HealthRequest(space=space), metadata=meta)

    async def apply_index_entry(space: str, meta: Sequence[tuple[str, str]]) -> Any:
        return await s.ApplyIndexEntry(
            pb.ApplyIndexEntryRequest(space=space, removed_generation=1), metadata=meta
        )

    # The backup calls reach no store: NO_TARGET's scheme is refused once routing and auth let
    # the call through (tests/backup takes real backups).
    async def backup_space(space: str, meta: Sequence[tuple[str, str]]) -> Any:
        return await s.BackupSpace(
            pb.BackupSpaceRequest(space=space, target=NO_TARGET, backup_id="b1"), metadata=meta
        )

    async def restore_space(space: str, meta: Sequence[tuple[str, str]]) -> Any:
        return await s.RestoreSpace(
            pb.RestoreSpaceRequest(space=space, target=NO_TARGET, backup_id="b1"), metadata=meta
        )

    async def delete_backup(space: str, meta: Sequence[tuple[str, str]]) -> Any:
        return await s.DeleteBackup(
            pb.DeleteBackupRequest(space=space, target=NO_TARGET, backup_id="b1"), metadata=meta
        )

    return {
        "Remember": remember,
        "RememberBatch": remember_batch,
        "Recall": recall,
        "Get": get,
        "Forget": forget,
        "Subscribe": subscribe,
        "Consolidate": consolidate,
        "CreateSpace": create_space,
        "DeleteSpace": delete_space,
        "ListSpaces": list_spaces,
        "Health": health,
        "ApplyIndexEntry": apply_index_entry,
        "BackupSpace": backup_space,
        "RestoreSpace": restore_space,
        "DeleteBackup": delete_backup,
    }


def trailers(err: grpc.aio.AioRpcError) -> dict[str, str]:
    # grpc.aio answers a grpc.aio.Metadata of (key, value) pairs; the stubs say otherwise.
    pairs = cast(Iterable[tuple[str, str]], err.trailing_metadata() or ())
    return {key: str(value) for key, value in pairs}


EVENTUALLY_S = 60.0
"""How long `eventually` waits: background work (index reloads, a housekeeping round, an
index build) that takes a moment on a quiet machine can take many seconds on a loaded one."""


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float = EVENTUALLY_S) -> None:
    """Wait until `check()` is true (index reloads, token rotation): at most `within_s`."""
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"the condition did not become true within {within_s:.0f} s")
        await asyncio.sleep(0.05)


async def until(predicate: Callable[[], bool], within_s: float = EVENTUALLY_S) -> bool:
    """Wait until `predicate()` is true, at most `within_s`; whether it is (the caller asserts
    what it waited for, with its own message)."""
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def subscribed(running: Running, space: str = spaces.DEFAULT_SPACE, count: int = 1) -> None:
    """Wait until `count` Subscribe streams (or HTTP event streams) of `space` follow its feed.
    A stream opens asynchronously: a write made before then is not "from now on" for it, so a
    test that writes after a fixed pause misses events when the machine is slow."""
    space_id = spaces.SpaceId(space)

    async def following() -> bool:
        loaded = running.server.registry.loaded().get(space_id)
        return loaded is not None and len(loaded.feed) >= count

    await eventually(following)
