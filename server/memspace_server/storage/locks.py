"""An asyncio readers-writer lock: many recalls scan at once; a write waits for them. Waiters are
served in arrival order, so writes are never starved by a stream of recalls. Uncontended
acquisitions never yield to the event loop."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class ReadWriteLock:
    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._waiting: collections.deque[tuple[bool, asyncio.Future[None]]] = collections.deque()

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[None]:
        if not self._writer and not self._waiting:
            self._readers += 1
        else:
            await self._wait(writer=False)
        try:
            yield
        finally:
            self._readers -= 1
            self._wake()

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        if not self._writer and self._readers == 0 and not self._waiting:
            self._writer = True
        else:
            await self._wait(writer=True)
        try:
            yield
        finally:
            self._writer = False
            self._wake()

    async def _wait(self, writer: bool) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((writer, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Granted just as we were cancelled: give it back.
                if writer:
                    self._writer = False
                else:
                    self._readers -= 1
            self._wake()
            raise

    def _wake(self) -> None:
        while self._waiting:
            writer, future = self._waiting[0]
            if future.done():
                self._waiting.popleft()
                continue
            if writer:
                if self._writer or self._readers:
                    return
                self._waiting.popleft()
                self._writer = True
                future.set_result(None)
                return
            if self._writer:
                return
            self._waiting.popleft()
            self._readers += 1
            future.set_result(None)
