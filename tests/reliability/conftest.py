"""Fixtures of the reliability suite: `memspace serve` processes that can be killed with SIGKILL
and started again on the same data root, stubs to them, size-limited volumes (tmpfs) and the
soak switch.

`MEMSPACE_SOAK=1` (what `make soak` sets) turns every test here into its long variant: more
crash trials, more fuzzed messages, more load. Without it the whole suite takes a few minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest

from memspace_contract import index
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc

T = TypeVar("T")

SOAK = os.environ.get("MEMSPACE_SOAK", "") not in ("", "0")
"""Long variants: set by `make soak`."""

DIM = 8
ADMIN_TOKEN = "reliability-admin-token"
START_TIMEOUT_S = 60.0
"""A server start (imports, index read) takes about a second; the machine may be busy."""
CALL_TIMEOUT_S = 20.0
"""Deadline of every call in this suite: a call that does not answer by then is a hang."""

_SERVING = re.compile(r"serving \d+ spaces on (\S+)")


def soak(default: T, long: T) -> T:
    """`long` under MEMSPACE_SOAK=1, else `default`."""
    return long if SOAK else default


def md(space: str | None = None, token: str | None = None) -> tuple[tuple[str, str], ...]:
    """Call metadata naming a space and/or carrying a bearer token."""
    pairs = []
    if space is not None:
        pairs.append(("x-memory-space", space))
    if token is not None:
        pairs.append(("authorization", f"Bearer {token}"))
    return tuple(pairs)


def unit(rng: np.random.Generator, dim: int = DIM) -> list[float]:
    """A random embedding (never zero)."""
    values = rng.normal(size=dim).astype(np.float32)
    values[0] += 0.01 if values[0] >= 0 else -0.01
    return [float(v) for v in values]


# -- `memspace serve` processes -------------------------------------------------------------------


class ServerProcess:
    """`memspace serve` on a data root that outlives the process: start, kill, start again. Each
    incarnation logs to its own file."""

    def __init__(self, data_root: Path, logs: Path, args: Sequence[str] = ()) -> None:
        self.data_root = data_root
        self.logs = logs
        self.args = list(args)
        self.popen: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.data_root.name}-{self.starts}.log"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "memspace_cli.main",
            "serve",
            "--data-root",
            str(self.data_root),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            "--default-embedding-dim",
            str(DIM),
            "--drain-timeout",
            "10",
            *self.args,
        ]

    def _launch(self) -> float:
        assert not self.alive, "the server is already running"
        self.starts += 1
        self.logs.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as out:
            self.popen = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return time.monotonic() + START_TIMEOUT_S

    def _serving(self, deadline: float) -> bool:
        assert self.popen is not None
        found = _SERVING.search(self.log())
        if found:
            self.address = found.group(1)
            return True
        if self.popen.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"memspace serve did not start (exit {self.popen.poll()}):\n{self.log()}"
            )
        return False

    async def start(self) -> str:
        """Start the server and wait until it serves; return its address."""
        deadline = self._launch()
        while not self._serving(deadline):  # noqa: ASYNC110  # polls the process's log file
            await asyncio.sleep(0.02)
        return self.address

    def start_blocking(self) -> str:
        """`start` for synchronous tests (hypothesis)."""
        deadline = self._launch()
        while not self._serving(deadline):
            time.sleep(0.02)
        return self.address

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def kill(self) -> None:
        """SIGKILL: no drain, no flush, nothing but what is already on disk survives."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait()

    async def stop(self, limit_s: float = 30.0) -> int:
        """SIGTERM (a drain) and the exit code."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + limit_s
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the server did not drain in {limit_s} s:\n{self.log()}")
            await asyncio.sleep(0.05)
        return self.popen.returncode

    def log(self) -> str:
        """The current incarnation's output."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def all_logs(self) -> str:
        return "\n".join(
            (self.logs / f"{self.data_root.name}-{n}.log").read_text(errors="replace")
            for n in range(1, self.starts + 1)
        )

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc status")


class Servers:
    """Every server process a test started; all are killed when it ends."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[ServerProcess] = []

    def __call__(self, data_root: Path | None = None, *args: str) -> ServerProcess:
        root = data_root or self.tmp_path / f"data{len(self.started)}"
        server = ServerProcess(root, self.tmp_path / "logs", args)
        self.started.append(server)
        return server

    def kill_all(self) -> None:
        for server in self.started:
            server.kill()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    """Make server processes: `servers(data_root, *flags)`; all are killed at the end."""
    made = Servers(tmp_path)
    yield made
    made.kill_all()


@pytest.fixture
def admin_token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin-token"
    path.write_text(ADMIN_TOKEN + "\n")
    return path


class Stubs:
    """Stubs over one channel (one HTTP/2 connection) to a server."""

    def __init__(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=list(options))
        self.memories = pb_grpc.MemoryServiceStub(self.channel)
        self.spaces = pb_grpc.SpaceServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close(None)


@contextlib.asynccontextmanager
async def connect(address: str, options: Sequence[tuple[str, Any]] = ()) -> Any:
    stubs = Stubs(address, options)
    try:
        yield stubs
    finally:
        await stubs.close()


async def create_space(
    stubs: Stubs,
    space: str,
    token: str | None = None,
    dim: int = DIM,
    admin: str | None = ADMIN_TOKEN,
    **fields: Any,
) -> pb.Space:
    """CreateSpace with the admin token, giving the space a token of its own when `token`."""
    return await stubs.spaces.CreateSpace(
        pb.CreateSpaceRequest(
            space=space,
            embedding_dim=dim,
            token_sha256=index.token_sha256(token) if token else "",
            **fields,
        ),
        metadata=md(token=admin),
        timeout=CALL_TIMEOUT_S,
    )


async def code_of(call: Any) -> grpc.StatusCode:
    """The status code a call ends with (OK when it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def error_of(call: Any) -> grpc.aio.AioRpcError:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err
    raise AssertionError("the call succeeded; it should have failed")


# -- size-limited volumes ------------------------------------------------------------------------


class Tmpfs:
    """Size-limited tmpfs mounts, unmounted at the end of the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.mounted: list[Path] = []

    def __call__(self, size: str, name: str = "volume") -> Path:
        target = self.tmp_path / name
        target.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(target)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            # Not a skip: the disk-full test is part of the suite, and CI runs as root.
            raise AssertionError(
                f"cannot mount a {size} tmpfs at {target} (needs root or CAP_SYS_ADMIN): "
                f"{done.stderr.strip() or done.stdout.strip()}"
            )
        self.mounted.append(target)
        return target

    def unmount_all(self) -> None:
        for target in reversed(self.mounted):
            done = subprocess.run(["umount", str(target)], capture_output=True, check=False)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
        self.mounted.clear()


@pytest.fixture
def tmpfs(servers: Servers, tmp_path: Path) -> Iterator[Tmpfs]:
    """`tmpfs("2m")`: a directory with that much room. The servers of the test are killed
    before it is unmounted."""
    mounts = Tmpfs(tmp_path)
    yield mounts
    servers.kill_all()
    mounts.unmount_all()
