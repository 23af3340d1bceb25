"""The MCP endpoint (`/mcp` on the HTTP/JSON port) through the SDK's own client over streamable
HTTP, against a real server: the tools are listed and work, a token opens its own space only
(a refusal is a tool error naming the gRPC status), and a malformed call is a clear tool error."""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import mcp_types
import pytest
from mcp.client import ClientSession
from mcp.client.streamable_http import streamable_http_client

from memspace_contract import index
from memspace_server.api import mcp_app, mcp_deferring
from tests.api.conftest import ADMIN_TOKEN, DIM, Start, memspace_serve, vec
from tests.api.over_http import Web, headers, web

TOKENS = {"team-a": "token-of-team-a", "team-b": "token-of-team-b"}


@pytest.fixture
async def guarded(start: Start, admin_token_file: Path) -> AsyncIterator[Web]:
    async with web(start, admin_token_file=admin_token_file) as w:
        for space, token in TOKENS.items():
            made = await w.client.put(
                f"/v1/spaces/{space}",
                json={"embedding_dim": DIM, "token_sha256": index.token_sha256(token)},
                headers=headers(token=ADMIN_TOKEN),
            )
            assert made.status_code == 200, made.text
        yield w


@contextlib.asynccontextmanager
async def session(
    w: Web | str, space: str | None, token: str | None
) -> AsyncIterator[ClientSession]:
    """An initialized MCP session to the server at `w` (a Web, or a base URL)."""
    url = w.base_url if isinstance(w, Web) else w
    async with (
        httpx2.AsyncClient(headers=headers(space, token), timeout=30) as http,
        streamable_http_client(f"{url}/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as s,
    ):
        await s.initialize()
        yield s


async def call(s: ClientSession, tool: str, **arguments: Any) -> mcp_types.CallToolResult:
    result = await s.call_tool(tool, arguments)
    assert isinstance(result, mcp_types.CallToolResult)
    return result


def text(result: mcp_types.CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, mcp_types.TextContent))


def refused(result: mcp_types.CallToolResult, code: str) -> bool:
    """A tool error naming the gRPC status of the edge's refusal."""
    return result.is_error and f": {code}: " in text(result)


def answer(result: mcp_types.CallToolResult) -> dict[str, Any]:
    assert not result.is_error, text(result)
    assert result.structured_content is not None
    found: dict[str, Any] = result.structured_content
    return found


async def test_the_tools_are_listed_with_their_embedding_arguments(guarded: Web) -> None:
    async with session(guarded, "team-a", TOKENS["team-a"]) as s:
        listed = await s.list_tools()
    tools = {tool.name: tool for tool in listed.tools}
    assert set(tools) == {"remember", "recall", "forget", "get"}
    # Text only is enough on a space with an embedding model (tests/api/test_embedding.py);
    # a space without one takes the client's vectors.
    assert tools["remember"].input_schema["required"] == ["content"]
    assert "embedding" in tools["remember"].input_schema["properties"]
    # A keyword recall needs no cue, a vector one no query: the server says which is missing.
    assert tools["recall"].input_schema.get("required", []) == []
    properties = tools["recall"].input_schema["properties"]
    assert {"cue", "query", "mode", "k", "tags", "min_score"} <= set(properties)
    for name in ("remember", "recall"):
        assert "embedding model" in (tools[name].description or "")
    assert "reciprocal rank" in (tools["recall"].description or "")


async def test_keyword_and_hybrid_recall_through_mcp(guarded: Web) -> None:
    async with session(guarded, "team-a", TOKENS["team-a"]) as s:
        near = answer(await call(s, "remember", content="the cat sat", embedding=vec(1.0)))
        rare = answer(
            await call(s, "remember", content="ticket ZX-9041 reopened", embedding=vec(0.0, 1.0))
        )
        by_cue = answer(await call(s, "recall", cue=vec(1.0), k=1))["hits"]
        assert [h["memory"]["id"] for h in by_cue] == [near["id"]]
        by_word = answer(await call(s, "recall", mode="keyword", query="zx-9041", k=1))["hits"]
        assert [h["memory"]["id"] for h in by_word] == [rare["id"]]
        both = answer(await call(s, "recall", mode="hybrid", cue=vec(1.0), query="ZX-9041", k=2))[
            "hits"
        ]
        assert {h["memory"]["id"] for h in both} == {near["id"], rare["id"]}
        no_query = await call(s, "recall", mode="keyword", k=1)
        assert refused(no_query, "INVALID_ARGUMENT"), text(no_query)
        assert "query" in text(no_query)
    async with session(guarded, "team-b", TOKENS["team-b"]) as s:
        assert answer(await call(s, "recall", mode="keyword", query="zx", k=5))["hits"] == []


async def test_remember_recall_get_forget_through_mcp(guarded: Web) -> None:
    async with session(guarded, "team-a", TOKENS["team-a"]) as s:
        near = answer(
            await call(s, "remember", content="near", embedding=vec(1.0), tags={"t": "x"})
        )
        far = answer(await call(s, "remember", content="far", embedding=vec(0.0, 1.0)))
        assert near["id"]
        assert far["id"]
        assert near["id"] != far["id"]
        hits = answer(await call(s, "recall", cue=vec(1.0, 0.1), k=2))["hits"]
        assert [h["memory"]["content"] for h in hits] == ["near", "far"]
        assert hits[0]["score"] > hits[1]["score"]
        tagged = answer(await call(s, "recall", cue=vec(1.0), k=5, tags={"t": "x"}))["hits"]
        assert [h["memory"]["id"] for h in tagged] == [near["id"]]
        got = answer(await call(s, "get", id=near["id"]))
        assert got["memory"]["content"] == "near"
        assert got["memory"]["tags"] == {"t": "x"}
        assert answer(await call(s, "forget", id=near["id"]))["forgotten"] is True
        missing = await call(s, "get", id=near["id"])
        assert missing.is_error
        assert refused(missing, "NOT_FOUND"), text(missing)
    # The same memories over the HTTP/JSON front: one space, one edge.
    seen = await guarded.client.get(
        f"/v1/spaces/team-a/memories/{far['id']}", headers=headers(token=TOKENS["team-a"])
    )
    assert seen.status_code == 200
    assert seen.json()["memory"]["content"] == "far"


async def test_a_token_opens_its_own_space_only(guarded: Web) -> None:
    made = await guarded.client.post(
        "/v1/spaces/team-b/memories",
        json={"content": "secret of b", "embedding": vec(1.0)},
        headers=headers(token=TOKENS["team-b"]),
    )
    assert made.status_code == 200
    b_id = made.json()["id"]
    # The token of team-a naming team-b: every tool is refused, nothing of b is seen or changed.
    async with session(guarded, "team-b", TOKENS["team-a"]) as s:
        for tool, arguments in (
            ("recall", {"cue": vec(1.0)}),
            ("get", {"id": b_id}),
            ("forget", {"id": b_id}),
            ("remember", {"content": "intruder", "embedding": vec(1.0)}),
        ):
            denied = await call(s, tool, **arguments)
            assert denied.is_error, tool
            assert refused(denied, "PERMISSION_DENIED"), text(denied)
    # A wrong token, and no token at all.
    for token, code in (("not-a-token", "PERMISSION_DENIED"), (None, "UNAUTHENTICATED")):
        async with session(guarded, "team-b", token) as s:
            denied = await call(s, "recall", cue=vec(1.0))
            assert refused(denied, code), text(denied)
    # team-a's own session sees none of b.
    async with session(guarded, "team-a", TOKENS["team-a"]) as s:
        assert answer(await call(s, "recall", cue=vec(1.0), k=10))["hits"] == []
        assert refused(await call(s, "get", id=b_id), "NOT_FOUND")
    still = await guarded.client.get(
        f"/v1/spaces/team-b/memories/{b_id}", headers=headers(token=TOKENS["team-b"])
    )
    assert still.status_code == 200
    listed = await guarded.client.post(
        "/v1/spaces/team-b/recall",
        json={"cue": vec(1.0), "k": 10},
        headers=headers(token=TOKENS["team-b"]),
    )
    assert [h["memory"]["content"] for h in listed.json()["hits"]] == ["secret of b"]


async def test_malformed_calls_are_clear_tool_errors(guarded: Web) -> None:
    async with session(guarded, "team-a", TOKENS["team-a"]) as s:
        # Not a float array: refused by the tool's schema before any call.
        wrong = await call(s, "remember", content="x", embedding="one two three")
        assert wrong.is_error
        assert "embedding" in text(wrong)
        # Neither a cue nor a query: the edge refuses the empty cue.
        missing = await call(s, "recall", k=3)
        assert refused(missing, "INVALID_ARGUMENT"), text(missing)
        # The wrong dimension: the edge's own refusal, with its gRPC status.
        short = await call(s, "remember", content="x", embedding=[1.0, 2.0])
        assert short.is_error
        assert refused(short, "INVALID_ARGUMENT"), text(short)
        assert str(DIM) in text(short)
        # Nothing was stored by any of them.
        assert answer(await call(s, "recall", cue=vec(1.0), k=10))["hits"] == []
    # No space named: the edge's default space, which team-a's token does not open.
    async with session(guarded, None, TOKENS["team-a"]) as s:
        unnamed = await call(s, "recall", cue=vec(1.0))
        assert refused(unnamed, "PERMISSION_DENIED"), text(unnamed)
        assert "'default'" in text(unnamed)


async def test_a_memspace_serve_process_serves_mcp_and_drains_cleanly(tmp_path: Path) -> None:
    args = [
        f"--data-root={tmp_path / 'data'}",
        "--listen=127.0.0.1:0",
        "--http-listen=127.0.0.1:0",
        "--metrics-listen=off",
        f"--default-embedding-dim={DIM}",
    ]
    with memspace_serve(args, tmp_path / "serve.log") as served:
        port = re.search(r"HTTP/JSON on :(\d+)", served.output())
        assert port, served.output()
        url = f"http://127.0.0.1:{port.group(1)}"
        async with session(url, "default", None) as s:
            assert {t.name for t in (await s.list_tools()).tools} == {
                "remember",
                "recall",
                "forget",
                "get",
            }
            made = answer(await call(s, "remember", content="kept", embedding=vec(1.0)))
            hits = answer(await call(s, "recall", cue=vec(1.0), k=3))["hits"]
            assert [h["memory"]["id"] for h in hits] == [made["id"]]
        # The drain stops the HTTP port and then the MCP endpoint: the process ends by itself.
        served.popen.send_signal(signal.SIGTERM)
        assert served.popen.wait(timeout=60) == 0, served.output()[-4000:]
    assert "Traceback" not in served.output(), served.output()[-4000:]


def test_the_deferred_endpoint_is_served_where_the_mcp_endpoint_says() -> None:
    assert mcp_deferring.PATH == mcp_app.PATH
