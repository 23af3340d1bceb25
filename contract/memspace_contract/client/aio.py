"""The asyncio flavour of the client: `AsyncMemspaceClient`, on a grpc.aio channel."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Self, TypeVar

import grpc

from memspace_contract import wire
from memspace_contract.client import credentials as credentials_module
from memspace_contract.client import metadata, results, retrying
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc

_Answer = TypeVar("_Answer")


class AsyncMemspaceClient:
    """A connection to one space (or, with the admin token and no space, to a server's
    SpaceService), for asyncio code. Close it with `await client.close()` or `async with`.

    `retry`: how calls that fail for a passing reason (UNAVAILABLE, a rate quota) are tried
    again; `retrying.NO_RETRY` turns it off. `timeout`: seconds per try of every call (None: no
    deadline). Errors are `grpc.aio.AioRpcError` (`.code()`, `.details()`).
    """

    def __init__(
        self,
        credentials: credentials_module.Credentials | None = None,
        *,
        retry: retrying.RetryPolicy | None = None,
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.credentials = credentials or credentials_module.Credentials.from_env()
        self.retry = retry or retrying.RetryPolicy()
        self.timeout = timeout
        chosen = self.credentials
        every = [*chosen.channel_options(), *options]
        tls = chosen.channel_credentials()
        calls = metadata.interceptors(chosen.metadata())
        if tls is None:
            self.channel = grpc.aio.insecure_channel(
                chosen.endpoint, options=every, interceptors=calls
            )
        else:
            self.channel = grpc.aio.secure_channel(
                chosen.endpoint, tls, options=every, interceptors=calls
            )
        self.memories = pb_grpc.MemoryServiceStub(self.channel)
        """The raw MemoryService stub; its calls carry the space and token too."""
        self.spaces = pb_grpc.SpaceServiceStub(self.channel)
        """The raw SpaceService stub; its calls carry the space and token too."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> Self:
        """Credentials from MEMSPACE_* variables (`Credentials.from_env`)."""
        return cls(credentials_module.Credentials.from_env(environ), **kwargs)

    @classmethod
    def from_secret_dir(cls, directory: str | os.PathLike[str], **kwargs: Any) -> Self:
        """Credentials from a mounted credentials Secret (files space, endpoint, token, ca.crt)."""
        return cls(credentials_module.Credentials.from_directory(directory), **kwargs)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close(None)

    async def _retried(self, attempt_call: Callable[[], Awaitable[_Answer]]) -> _Answer:
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await attempt_call()
            except grpc.aio.AioRpcError as err:
                wait = retrying.wait_before_retry(err, self.retry, attempt, started)
                if wait is None:
                    raise
            await asyncio.sleep(wait)

    async def remember(
        self,
        content: str,
        embedding: results.EmbeddingLike | None = None,
        *,
        memory_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        confidence: float | None = None,
    ) -> results.Remembered:
        """Store one memory (replacing one of the same `memory_id`); answered once it is durable.
        Without `memory_id` the client makes one, so a retried call stores it once. Without
        `embedding`, a space with an embedding model embeds `content` on the server."""
        message = results.memory_message(
            content, embedding, memory_id or results.new_id(), tags, confidence
        )
        request = pb.RememberRequest(memory=message)
        answer = await self._retried(lambda: self.memories.Remember(request, timeout=self.timeout))
        return results.Remembered(answer.id, wire.Lsn(answer.lsn))

    async def remember_batch(
        self,
        contents: Sequence[str],
        embeddings: results.EmbeddingLike | None = None,
        *,
        ids: Sequence[str] | None = None,
        tags: Sequence[Mapping[str, str] | None] | Mapping[str, str] | None = None,
    ) -> results.Batch:
        """Store many memories in one stream, all or none: `embeddings` is a (len(contents), dim)
        matrix, or None on a space with an embedding model (the server embeds the contents);
        `tags` one mapping for all or one per memory."""
        requests = results.batch_messages(contents, embeddings, ids, tags)
        answer = await self._retried(
            lambda: self.memories.RememberBatch(iter(requests), timeout=self.timeout)
        )
        return results.Batch(answer.count, wire.Lsn(answer.last_lsn), tuple(answer.ids))

    async def recall(
        self,
        cue: results.EmbeddingLike | None = None,
        k: int = 10,
        *,
        min_score: float | None = None,
        tags: Mapping[str, str] | None = None,
        include_embeddings: bool = False,
        exact: bool = False,
        query: str | None = None,
        mode: str = "vector",
    ) -> list[results.Hit]:
        """The `k` best memories over every tier, best first, by `mode`: `"vector"` (cosine
        similarity to `cue`), `"keyword"` (BM25 of the text `query` over content and tags) or
        `"hybrid"` (both, fused by reciprocal rank; needs `cue` and `query`). On a space with an
        embedding model `query` alone is enough: the server embeds it as the cue. Only those with
        every tag of `tags` and, with `min_score`, at least that score (cosine for vector and
        hybrid, BM25 for keyword). `exact` scans every tier exactly even where the space keeps
        an approximate index."""
        request = results.recall_request(
            cue, k, min_score, tags, include_embeddings, exact=exact, query=query, mode=mode
        )
        answer = await self._retried(lambda: self.memories.Recall(request, timeout=self.timeout))
        return [results.Hit.from_message(hit) for hit in answer.hits]

    async def get(self, memory_id: str) -> results.Memory:
        """One memory with its embedding (NOT_FOUND when the space has no such ID)."""
        request = pb.GetRequest(id=memory_id)
        answer = await self._retried(lambda: self.memories.Get(request, timeout=self.timeout))
        return results.Memory.from_message(answer.memory)

    async def forget(self, memory_id: str) -> results.Forgotten:
        """Remove one memory; falsy when there was none of that ID."""
        request = pb.ForgetRequest(id=memory_id)
        answer = await self._retried(lambda: self.memories.Forget(request, timeout=self.timeout))
        return results.Forgotten(answer.forgotten, wire.Lsn(answer.lsn))

    async def consolidate(self) -> int:
        """Move WAL-backed state into the tiers now; the number of records consolidated."""
        request = pb.ConsolidateRequest()
        answer = await self._retried(
            lambda: self.memories.Consolidate(request, timeout=self.timeout)
        )
        return int(answer.consolidated)

    async def health(self, space: str | None = None) -> results.Health:
        """Health of this client's space (or of `space`, or of every space with the admin token
        and no space)."""
        request = pb.HealthRequest(space=space or "")
        answer = await self._retried(lambda: self.spaces.Health(request, timeout=self.timeout))
        return results.Health.from_message(answer)

    async def subscribe(self, since_lsn: int = 0) -> AsyncGenerator[results.Event, None]:
        """One Subscribe stream as it is: it ends with the server's error (see `watch`)."""
        call = self.memories.Subscribe(pb.SubscribeRequest(since_lsn=since_lsn))
        try:
            async for message in call:
                yield results.Event.from_message(message)
        finally:
            call.cancel()

    async def watch(self, since_lsn: int = 0) -> AsyncGenerator[results.Event, None]:
        """The space's events in LSN order, for as long as the caller reads: from `since_lsn`
        (0: from now on). When the stream ends early (a shard draining or restarting, a dropped
        connection, a reader that fell behind) it subscribes again from the LSN after the last
        event it gave, so no event is lost or given twice while the WAL holds it. Raises when
        the server stays away longer than the retry policy allows, and on other errors
        (FAILED_PRECONDITION: the WAL no longer holds the LSN to resume from)."""
        position = since_lsn
        attempt, started = 0, time.monotonic()
        while True:
            call = self.memories.Subscribe(pb.SubscribeRequest(since_lsn=position))
            failure: grpc.aio.AioRpcError | None = None
            try:
                async for message in call:
                    event = results.Event.from_message(message)
                    if position and event.lsn < position:
                        continue  # given before the stream ended
                    attempt, position = 0, event.lsn + 1
                    yield event
            except grpc.aio.AioRpcError as err:
                failure = err
            finally:
                call.cancel()
            if failure is None:
                continue  # ended without a status: subscribe again at once
            position = position or retrying.resume_lsn(failure) or 0
            if failure.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retrying.resume_lsn(
                failure
            ):
                continue  # fell behind: read on from where it stopped
            if attempt == 0:
                started = time.monotonic()
            attempt += 1
            if failure.code() != grpc.StatusCode.UNAVAILABLE:
                raise failure
            wait = retrying.wait_before_retry(failure, self.retry, attempt, started)
            if wait is None:
                raise failure
            await asyncio.sleep(wait)
