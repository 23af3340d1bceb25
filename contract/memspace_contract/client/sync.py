"""The synchronous flavour of the client: `MemspaceClient`, on a blocking grpc channel (for
scripts, notebooks and threads; never call it from a running event loop)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, Self, TypeVar

import grpc

from memspace_contract import wire
from memspace_contract.client import credentials as credentials_module
from memspace_contract.client import metadata, results, retrying
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc

_Answer = TypeVar("_Answer")


class MemspaceClient:
    """A connection to one space, for blocking code: the same methods as
    `AsyncMemspaceClient`, without `await`. Close it with `client.close()` or `with`.
    Errors are `grpc.RpcError` (`.code()`, `.details()`)."""

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
        if tls is None:
            self._channel = grpc.insecure_channel(chosen.endpoint, options=every)
        else:
            self._channel = grpc.secure_channel(chosen.endpoint, tls, options=every)
        self.channel = grpc.intercept_channel(
            self._channel, metadata.SyncInterceptor(chosen.metadata())
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _retried(self, attempt_call: Callable[[], _Answer]) -> _Answer:
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return attempt_call()
            except grpc.RpcError as err:
                wait = retrying.wait_before_retry(err, self.retry, attempt, started)
                if wait is None:
                    raise
            time.sleep(wait)

    def remember(
        self,
        content: str,
        embedding: results.EmbeddingLike | None = None,
        *,
        memory_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        confidence: float | None = None,
    ) -> results.Remembered:
        """See `AsyncMemspaceClient.remember`."""
        message = results.memory_message(
            content, embedding, memory_id or results.new_id(), tags, confidence
        )
        request = pb.RememberRequest(memory=message)
        answer = self._retried(lambda: self.memories.Remember(request, timeout=self.timeout))
        return results.Remembered(answer.id, wire.Lsn(answer.lsn))

    def remember_batch(
        self,
        contents: Sequence[str],
        embeddings: results.EmbeddingLike | None = None,
        *,
        ids: Sequence[str] | None = None,
        tags: Sequence[Mapping[str, str] | None] | Mapping[str, str] | None = None,
    ) -> results.Batch:
        """See `AsyncMemspaceClient.remember_batch`."""
        requests = results.batch_messages(contents, embeddings, ids, tags)
        answer = self._retried(
            lambda: self.memories.RememberBatch(iter(requests), timeout=self.timeout)
        )
        return results.Batch(answer.count, wire.Lsn(answer.last_lsn), tuple(answer.ids))

    def recall(
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
        """See `AsyncMemspaceClient.recall`."""
        request = results.recall_request(
            cue, k, min_score, tags, include_embeddings, exact=exact, query=query, mode=mode
        )
        answer = self._retried(lambda: self.memories.Recall(request, timeout=self.timeout))
        return [results.Hit.from_message(hit) for hit in answer.hits]

    def get(self, memory_id: str) -> results.Memory:
        """See `AsyncMemspaceClient.get`."""
        request = pb.GetRequest(id=memory_id)
        answer = self._retried(lambda: self.memories.Get(request, timeout=self.timeout))
        return results.Memory.from_message(answer.memory)

    def forget(self, memory_id: str) -> results.Forgotten:
        """See `AsyncMemspaceClient.forget`."""
        request = pb.ForgetRequest(id=memory_id)
        answer = self._retried(lambda: self.memories.Forget(request, timeout=self.timeout))
        return results.Forgotten(answer.forgotten, wire.Lsn(answer.lsn))

    def consolidate(self) -> int:
        """See `AsyncMemspaceClient.consolidate`."""
        request = pb.ConsolidateRequest()
        answer = self._retried(lambda: self.memories.Consolidate(request, timeout=self.timeout))
        return int(answer.consolidated)

    def health(self, space: str | None = None) -> results.Health:
        """See `AsyncMemspaceClient.health`."""
        request = pb.HealthRequest(space=space or "")
        answer = self._retried(lambda: self.spaces.Health(request, timeout=self.timeout))
        return results.Health.from_message(answer)

    def watch(self, since_lsn: int = 0) -> Generator[results.Event, None, None]:
        """See `AsyncMemspaceClient.watch`: events in LSN order, resumed after a drain or a
        dropped connection from the LSN after the last one given."""
        position = since_lsn
        attempt, started = 0, time.monotonic()
        while True:
            # A grpc.Call and an iterator of events (the stubs type it as the iterator only).
            call: Any = self.memories.Subscribe(pb.SubscribeRequest(since_lsn=position))
            failure: grpc.RpcError | None = None
            try:
                for message in call:
                    event = results.Event.from_message(message)
                    if position and event.lsn < position:
                        continue
                    attempt, position = 0, event.lsn + 1
                    yield event
            except grpc.RpcError as err:
                failure = err
            finally:
                call.cancel()
            if failure is None:
                continue
            code = failure.code()
            resume = retrying.resume_lsn(failure)
            position = position or resume or 0
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and resume:
                continue
            if attempt == 0:
                started = time.monotonic()
            attempt += 1
            if code != grpc.StatusCode.UNAVAILABLE:
                raise failure
            wait = retrying.wait_before_retry(failure, self.retry, attempt, started)
            if wait is None:
                raise failure
            time.sleep(wait)
