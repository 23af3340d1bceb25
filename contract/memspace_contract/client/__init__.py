"""The memspace client library (docs/client.md): a synchronous `MemspaceClient` and an asyncio
`AsyncMemspaceClient` over the memspace.v1 gRPC API. It must not import the server or the
operator: it ships alone in the light `memspace-client` distribution.

    with MemspaceClient.from_env() as memspace:                # MEMSPACE_* variables
        done = memspace.remember("the sky is blue", embedding)  # numpy array or list
        hits = memspace.recall(cue, k=5)                         # [Hit(memory, score, tier)]
        for event in memspace.watch(since_lsn=done.lsn):         # resumes after a drain
            ...

Credentials come from the operator's credentials Secret (keys `space`, `endpoint`, `token`,
`ca.crt` where the shards serve TLS), mounted (`from_secret_dir(path)`, or
MEMSPACE_CREDENTIALS_DIR) or in MEMSPACE_* variables (`from_env()`); every call carries the
`x-memory-space` and `authorization` metadata, raw stubs (`client.memories`, `client.spaces`)
included. Answers are typed values (`results`), embeddings float32 numpy arrays. Calls that fail
for a passing reason are retried (`retrying`).

`connect(credentials)` is the older entry point: an `AsyncMemspaceClient` that does not retry
unless given `retry=`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from memspace_contract.client.aio import AsyncMemspaceClient
from memspace_contract.client.credentials import (
    AUTHORIZATION_METADATA,
    CA_KEY,
    CERT_KEY,
    DEFAULT_CREDENTIALS_DIR,
    DEFAULT_ENDPOINT,
    KEY_KEY,
    SECRET_KEYS,
    SPACE_METADATA,
    TLS_ENV,
    Credentials,
    CredentialsError,
)
from memspace_contract.client.metadata import interceptors
from memspace_contract.client.results import (
    Batch,
    Event,
    Forgotten,
    Health,
    Hit,
    Memory,
    Remembered,
    SearchIndex,
    SpaceHealth,
)
from memspace_contract.client.retrying import NO_RETRY, RetryPolicy
from memspace_contract.client.sync import MemspaceClient

Client = AsyncMemspaceClient
"""The asyncio client under its older name."""

__all__ = [
    "AUTHORIZATION_METADATA",
    "CA_KEY",
    "CERT_KEY",
    "DEFAULT_CREDENTIALS_DIR",
    "DEFAULT_ENDPOINT",
    "KEY_KEY",
    "NO_RETRY",
    "SECRET_KEYS",
    "SPACE_METADATA",
    "TLS_ENV",
    "AsyncMemspaceClient",
    "Batch",
    "Client",
    "Credentials",
    "CredentialsError",
    "Event",
    "Forgotten",
    "Health",
    "Hit",
    "Memory",
    "MemspaceClient",
    "Remembered",
    "RetryPolicy",
    "SearchIndex",
    "SpaceHealth",
    "connect",
    "interceptors",
]


def connect(
    credentials: Credentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
    *,
    retry: RetryPolicy = NO_RETRY,
    timeout: float | None = None,
    **tls: Any,
) -> AsyncMemspaceClient:
    """An asyncio client for `credentials`, by default `Credentials.from_env()`, that does not
    retry unless `retry` says so. Other keyword arguments replace fields of the credentials:
    `connect(secure=True, ca_file=Path("ca.crt"))`."""
    chosen = credentials or Credentials.from_env()
    if tls:
        chosen = dataclasses.replace(chosen, **tls)
    return AsyncMemspaceClient(chosen, retry=retry, timeout=timeout, options=options)
