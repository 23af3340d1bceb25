"""Keyword and hybrid recall as a user reaches them: the client library (sync and asyncio), the
`memspace recall` command and the HTTP/JSON front, each against a real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memspace_contract import client
from tests.api.conftest import DIM, Start, memspace_serve, vec
from tests.api.over_http import memory_json, web
from tests.api.test_cli_memories import memspace, ok


def test_the_sync_client_and_the_cli_recall_by_keyword_and_hybrid(tmp_path: Path) -> None:
    args = ["--data-root", str(tmp_path / "data"), "--listen", "127.0.0.1:0"]
    args += ["--default-embedding-dim", str(DIM), "--metrics-listen", "off"]
    with memspace_serve(args, tmp_path / "log") as server:
        with client.MemspaceClient.from_env({"MEMSPACE_ENDPOINT": server.address}) as memspace_:
            near = memspace_.remember("the cat sat", vec(1.0)).id
            rare = memspace_.remember("order 5521-B shipped", vec(0.0, 1.0), tags={"kind": "x"})
            by_word = memspace_.recall(query="5521", mode="keyword", k=3)
            assert [hit.memory.id for hit in by_word] == [rare.id]
            assert by_word[0].score > 0
            both = memspace_.recall(vec(1.0), k=2, query="5521-b", mode="hybrid")
            assert {hit.memory.id for hit in both} == {near, rare.id}
            assert memspace_.recall(query="5521", mode="keyword", tags={"kind": "y"}) == []
            with pytest.raises(ValueError, match="mode 'fuzzy'"):
                memspace_.recall(query="x", mode="fuzzy")
        env = {"MEMSPACE_ENDPOINT": server.address}
        found = json.loads(
            ok(memspace("recall", "--mode", "keyword", "--query", "shipped", "-o", "json", env=env))
        )
        assert [hit["memory"]["id"] for hit in found] == [rare.id]
        table = ok(
            memspace(
                "recall", "--mode", "hybrid", "--query", "5521", "--cue", "[1, 0, 0, 0]", env=env
            )
        )
        assert rare.id in table
        assert near in table
        refused = memspace("recall", "--mode", "keyword", env=env)
        assert refused.returncode == 2  # bad input, caught before any call
        assert "--query" in refused.stderr
        # Refused by the server: hybrid on a space without a model needs a cue as well.
        refused = memspace("recall", "--mode", "hybrid", "--query", "5521", env=env)
        assert refused.returncode == 1
        assert "INVALID_ARGUMENT" in refused.stderr
        assert "cue" in refused.stderr


async def test_the_asyncio_client_recalls_by_keyword(start: Start) -> None:
    running = await start()
    credentials = client.Credentials(endpoint=running.address, space="default")
    async with client.AsyncMemspaceClient(credentials) as memspace_:
        written = await memspace_.remember("the word quasar appears once", vec(0.0, 1.0))
        await memspace_.remember("nothing to see", vec(1.0))
        hits = await memspace_.recall(query="QUASAR", mode="keyword")
        assert [hit.memory.id for hit in hits] == [written.id]


async def test_the_http_front_recalls_by_keyword_and_hybrid(start: Start) -> None:
    async with web(start) as w:
        c = w.client
        made = await c.post(
            "/v1/spaces/default/memories", json=memory_json("lunar probe 88", 0.0, 1.0)
        )
        assert made.status_code == 200, made.text
        await c.post("/v1/spaces/default/memories", json=memory_json("solar panel", 1.0))
        found = await c.post(
            "/v1/spaces/default/recall",
            json={"mode": "RECALL_MODE_KEYWORD", "query": "probe", "k": 5},
        )
        assert found.status_code == 200, found.text
        assert [hit["memory"]["id"] for hit in found.json()["hits"]] == [made.json()["id"]]
        both = await c.post(
            "/v1/spaces/default/recall",
            json={"mode": "RECALL_MODE_HYBRID", "query": "probe", "cue": vec(1.0), "k": 2},
        )
        assert len(both.json()["hits"]) == 2
        bad = await c.post(
            "/v1/spaces/default/recall", json={"mode": "RECALL_MODE_KEYWORD", "k": 5}
        )
        assert bad.status_code == 400
        assert "query" in bad.text
