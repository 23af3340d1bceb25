"""A small asyncio client of the memspace.v1 API.

It reads the credentials the operator writes into a tenant's Secret (keys `space`, `endpoint`,
`token`) from the environment or from files (the Secret mounted as a volume), and sets the
`x-memory-space` and `authorization` metadata on every call, so callers only pass requests:

    async with client.connect() as memspace:          # MEMSPACE_* environment, see Credentials
        await memspace.remember("the sky is blue", embedding)
        hits = await memspace.recall(cue, k=5)
        await memspace.memories.Get(pb.GetRequest(id=...))   # raw stubs get the metadata too

The connection is plaintext gRPC (in-cluster traffic; terminate TLS in a mesh or proxy).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from memspace_contract import spaces
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc

SECRET_KEYS = ("space", "endpoint", "token")
DEFAULT_ENDPOINT = "127.0.0.1:50051"
SPACE_METADATA = "x-memory-space"
AUTHORIZATION_METADATA = "authorization"

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class CredentialsError(ValueError):
    """Credentials that are missing or unreadable; the message says where they were looked for."""


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a client needs: the keys of the operator's credentials Secret."""

    endpoint: str = DEFAULT_ENDPOINT
    space: str | None = None
    """None: the server's default space (standalone servers only)."""
    token: str | None = None
    """None: no authorization metadata (a standalone server without tokens)."""

    def __post_init__(self) -> None:
        if self.space is not None:
            spaces.parse_space_id(self.space)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike[str]) -> Credentials:
        """Read the files `space`, `endpoint` and `token` of a mounted Secret (each optional)."""
        root = Path(directory)
        if not root.is_dir():
            raise CredentialsError(f"credentials directory {root} does not exist")
        found = {key: _read(root / key) for key in SECRET_KEYS if (root / key).exists()}
        return cls(
            endpoint=found.get("endpoint") or DEFAULT_ENDPOINT,
            space=found.get("space") or None,
            token=found.get("token") or None,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Credentials:
        """Credentials from the environment, in this order for each key:

        MEMSPACE_SPACE, MEMSPACE_ENDPOINT, MEMSPACE_TOKEN           the value itself
        MEMSPACE_SPACE_FILE, MEMSPACE_ENDPOINT_FILE, MEMSPACE_TOKEN_FILE   a file holding it
        MEMSPACE_CREDENTIALS_DIR                                    a mounted Secret directory
        """
        env = os.environ if environ is None else environ
        directory = env.get("MEMSPACE_CREDENTIALS_DIR")
        base = cls.from_directory(directory) if directory else cls()
        values: dict[str, str] = {}
        for key in SECRET_KEYS:
            name = f"MEMSPACE_{key.upper()}"
            if env.get(name):
                values[key] = env[name].strip()
            elif env.get(f"{name}_FILE"):
                values[key] = _read(Path(env[f"{name}_FILE"]))
        return cls(
            endpoint=values.get("endpoint", base.endpoint),
            space=values.get("space", base.space),
            token=values.get("token", base.token),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        pairs = []
        if self.space is not None:
            pairs.append((SPACE_METADATA, self.space))
        if self.token is not None:
            pairs.append((AUTHORIZATION_METADATA, f"Bearer {self.token}"))
        return tuple(pairs)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as err:
        raise CredentialsError(f"cannot read credentials file {path}: {err}") from err


def _with_metadata(
    details: grpc.aio.ClientCallDetails, extra: Sequence[tuple[str, str]]
) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata()
    given = {key for key, _ in extra}
    for key, value in details.metadata or ():
        if key not in given:
            metadata.add(key, value)
    for key, value in extra:
        metadata.add(key, value)
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        metadata,
        details.credentials,
        details.wait_for_ready,
    )


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_metadata(details, self._metadata), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_metadata(details, self._metadata), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_metadata(details, self._metadata), requests)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_metadata(details, self._metadata), requests)


def interceptors(metadata: Sequence[tuple[str, str]]) -> list[Any]:
    """Client interceptors adding `metadata` to every call, overriding the same keys given per
    call (grpc.aio files each interceptor under one call shape only: one per shape)."""
    return [
        _UnaryUnary(metadata),
        _UnaryStream(metadata),
        _StreamUnary(metadata),
        _StreamStream(metadata),
    ]


class Client:
    """An open connection to one space. Use `connect()`; close with `await client.close()` or
    `async with`."""

    def __init__(
        self,
        credentials: Credentials,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.credentials = credentials
        self.channel = grpc.aio.insecure_channel(
            credentials.endpoint,
            options=list(options),
            interceptors=interceptors(credentials.metadata()),
        )
        self.memories = pb_grpc.MemoryServiceStub(self.channel)
        self.spaces = pb_grpc.SpaceServiceStub(self.channel)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close(None)

    async def remember(
        self,
        content: str,
        embedding: Iterable[float],
        *,
        memory_id: str = "",
        tags: Mapping[str, str] | None = None,
        confidence: float | None = None,
    ) -> pb.RememberResponse:
        memory = pb.Memory(id=memory_id, content=content, embedding=embedding, tags=tags)
        if confidence is not None:
            memory.confidence = confidence
        return await self.memories.Remember(pb.RememberRequest(memory=memory))

    async def recall(
        self,
        cue: Iterable[float],
        k: int = 10,
        *,
        min_score: float | None = None,
        tags: Mapping[str, str] | None = None,
        include_embeddings: bool = False,
    ) -> list[pb.RecallHit]:
        request = pb.RecallRequest(cue=cue, k=k, tags=tags, include_embeddings=include_embeddings)
        if min_score is not None:
            request.min_score = min_score
        return list((await self.memories.Recall(request)).hits)

    async def get(self, memory_id: str) -> pb.Memory:
        return (await self.memories.Get(pb.GetRequest(id=memory_id))).memory

    async def forget(self, memory_id: str) -> bool:
        return (await self.memories.Forget(pb.ForgetRequest(id=memory_id))).forgotten

    async def subscribe(self, since_lsn: int = 0) -> AsyncGenerator[pb.MemoryEvent, None]:
        async for event in self.memories.Subscribe(pb.SubscribeRequest(since_lsn=since_lsn)):
            yield event

    async def health(self) -> pb.HealthResponse:
        """Health of this client's space (or of every space, with the admin token and no
        space)."""
        return await self.spaces.Health(pb.HealthRequest())


def connect(
    credentials: Credentials | None = None, options: Sequence[tuple[str, Any]] = ()
) -> Client:
    """A client for `credentials`, by default `Credentials.from_env()`."""
    return Client(credentials or Credentials.from_env(), options)
