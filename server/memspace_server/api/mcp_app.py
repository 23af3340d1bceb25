"""The MCP endpoint of memspace: the Model Context Protocol over streamable HTTP at `/mcp` on the
HTTP/JSON port, with the tools `remember`, `recall`, `forget` and `get`.

Each tool call is one call of the edge's own handler (`handling.Edge.method_handlers`, the ones
the gRPC server and the HTTP/JSON front run), with the MCP request's `X-Memory-Space` and
`Authorization` headers as its metadata: the same space selection, auth, caps, metrics, logs and
error table as every other call, so an MCP client reaches only the space its token opens. A
refused call is a tool error (`isError`) whose text starts with the gRPC status name.

The server is stateless (no MCP session is kept between requests) and answers JSON, so any
replica of a space's server answers any request. On a space with an embedding model
(spec.embedding) the tools take text only: `remember` embeds the memory's content and `recall`
its query on the server. On a space without one, the client sends the float arrays itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from google.protobuf import message as protobuf_message
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import Field
from starlette.types import Receive, Scope, Send

from memspace_contract.v1 import memspace_pb2 as pb
from memspace_server import errors
from memspace_server.api import http_calls
from memspace_server.api.http_app import HEADERS, Handlers

PATH = "/mcp"
"""Where the endpoint is served on the HTTP/JSON port."""

INSTRUCTIONS = (
    "Long-term memory of one memspace space. The space is the one the X-Memory-Space header "
    "names, opened by the bearer token in the Authorization header. Remember text and recall by "
    "a text query: a space with an embedding model embeds them on the server. Only on a space "
    "without a model does the client send embeddings (float arrays of the space's dimension)."
)

Embedding = Annotated[
    list[float] | None,
    Field(
        description="Only for a space without an embedding model: the embedding as a float "
        "array of the space's dimension, computed by the client. Leave it out on a space with a "
        "model: the server embeds the content",
        min_length=1,
    ),
]


class Endpoint:
    """The MCP server and its streamable HTTP transport, as an ASGI app (`asgi`) for the HTTP/JSON
    port's `/mcp` route; `start` before the port serves, `stop` after it stopped."""

    def __init__(self, handlers: Handlers) -> None:
        self._handlers = handlers
        self._server: MCPServer[Any] = MCPServer(
            name="memspace", instructions=INSTRUCTIONS, log_level="WARNING"
        )
        for tool, description in (
            (self.remember, REMEMBER),
            (self.recall, RECALL),
            (self.forget, FORGET),
            (self.get, GET),
        ):
            self._server.add_tool(tool, description=description)
        # Makes the session manager. The Host check of the SDK (against DNS rebinding of a
        # browser's localhost) is off: a Service name or an ingress host reaches this port,
        # and every tool call needs the space's token anyway.
        self._server.streamable_http_app(
            streamable_http_path=PATH,
            json_response=True,
            stateless_http=True,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        self._manager = self._server.session_manager
        self._stopping = asyncio.Event()
        self._running: asyncio.Task[None] | None = None

    async def start(self) -> None:
        started = asyncio.Event()

        async def run() -> None:
            # One task enters and leaves the manager's task group (anyio needs both in one task).
            async with self._manager.run():
                started.set()
                await self._stopping.wait()

        self._running = asyncio.get_running_loop().create_task(run())
        waiting = asyncio.ensure_future(started.wait())
        await asyncio.wait({waiting, self._running}, return_when=asyncio.FIRST_COMPLETED)
        if not started.is_set():
            waiting.cancel()
            await self._running  # raises why it could not start

    async def stop(self) -> None:
        self._stopping.set()
        if self._running is not None:
            await self._running

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._manager.handle_request(scope, receive, send)

    async def _call(
        self, ctx: Context[Any, Any], method: str, request: protobuf_message.Message
    ) -> dict[str, Any]:
        # grpc's method handlers hold grpc.aio coroutines here (the stubs describe sync ones).
        handler: Any = self._handlers["MemoryService"][method]
        found: Mapping[str, str] = ctx.headers or {}
        metadata = [(key.lower(), value) for key, value in found.items() if key.lower() in HEADERS]
        context = http_calls.CallContext(metadata)
        try:
            answer = await handler.unary_unary(request, context.as_grpc())
        except http_calls.RefusedError as refused:
            raise ToolError(_refusal(refused)) from refused
        except errors.MemspaceError as err:
            raise ToolError(_refusal(http_calls.RefusedError.of(err))) from err
        return http_calls.to_json(answer)

    async def remember(
        self,
        content: Annotated[str, Field(description="The text of the memory", min_length=1)],
        *,
        ctx: Context[Any, Any],
        embedding: Embedding = None,
        tags: Annotated[
            dict[str, str] | None, Field(description="String tags to filter recall by")
        ] = None,
        id: Annotated[
            str | None,
            Field(description="The memory's id; the server makes one when absent"),
        ] = None,
        confidence: Annotated[float | None, Field(description="How sure, 0..1")] = None,
    ) -> dict[str, Any]:
        memory = pb.Memory(content=content, embedding=embedding or (), tags=tags or {}, id=id or "")
        if confidence is not None:
            memory.confidence = confidence
        return await self._call(ctx, "Remember", pb.RememberRequest(memory=memory))

    async def recall(
        self,
        *,
        ctx: Context[Any, Any],
        cue: Annotated[
            list[float] | None,
            Field(
                description="The query embedding as a float array of the space's dimension, "
                "computed by the client: only on a space without an embedding model (modes "
                "vector and hybrid); a space with one embeds the text query instead",
            ),
        ] = None,
        query: Annotated[
            str | None,
            Field(
                description="What to recall, as text: found by keyword (BM25 over content and "
                "tags) in modes keyword and hybrid, and embedded by the server for modes vector "
                "and hybrid on a space with an embedding model",
                max_length=4096,
            ),
        ] = None,
        mode: Annotated[
            Literal["vector", "keyword", "hybrid"],
            Field(
                description="vector: cosine similarity to the cue or the embedded query; "
                "keyword: BM25 of the query; hybrid: both, fused by reciprocal rank"
            ),
        ] = "vector",
        k: Annotated[int, Field(description="How many memories at most", ge=1)] = 5,
        tags: Annotated[
            dict[str, str] | None,
            Field(description="Only memories carrying all these tags"),
        ] = None,
        min_score: Annotated[
            float | None,
            Field(
                description="Only memories scoring at least this: cosine (vector, and the "
                "vector half of hybrid) or BM25 (keyword)"
            ),
        ] = None,
    ) -> dict[str, Any]:
        request = pb.RecallRequest(
            cue=cue or [], k=k, tags=tags or {}, query=query or "", mode=_MODES[mode]
        )
        if min_score is not None:
            request.min_score = min_score
        return await self._call(ctx, "Recall", request)

    async def forget(
        self,
        id: Annotated[str, Field(description="The id of the memory to forget", min_length=1)],
        ctx: Context[Any, Any],
    ) -> dict[str, Any]:
        return await self._call(ctx, "Forget", pb.ForgetRequest(id=id))

    async def get(
        self,
        id: Annotated[str, Field(description="The id of the memory", min_length=1)],
        ctx: Context[Any, Any],
    ) -> dict[str, Any]:
        return await self._call(ctx, "Get", pb.GetRequest(id=id))


def _refusal(refused: http_calls.RefusedError) -> str:
    text = f"{refused.code.name}: {refused.message}"
    body = http_calls.error_body(refused)
    if "retry_after_s" in body:
        text += f" (retry after {body['retry_after_s']} s)"
    return text


REMEMBER = (
    "Store one memory (its text and optional tags) in this space; answered with its id once it "
    "is durable. A space with an embedding model embeds the text on the server; a space without "
    "one needs the embedding too (a float array of the space's dimension)."
)
RECALL = (
    "The k best memories of this space, best first, with their scores: closest in meaning "
    "(mode vector, the default: cosine similarity to the text query, which a space with an "
    "embedding model embeds on the server; a space without one needs the cue, a float array of "
    "the space's dimension), by keyword (mode keyword: BM25 of the text query over content and "
    "tags, for exact names, codes and rare words), or both fused by reciprocal rank (mode hybrid)."
)
_MODES = {
    "vector": pb.RECALL_MODE_VECTOR,
    "keyword": pb.RECALL_MODE_KEYWORD,
    "hybrid": pb.RECALL_MODE_HYBRID,
}
FORGET = "Remove one memory of this space by id; an unknown id answers forgotten=false."
GET = "One memory of this space by id (NOT_FOUND when there is none)."
