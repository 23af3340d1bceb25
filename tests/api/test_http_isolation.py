"""The isolation tests of the gRPC API (test_isolation.py, test_auth.py) repeated over HTTP/JSON:
what is remembered in one space is never seen, changed or announced through another, whether the
space comes from the path or the X-Memory-Space header, and a space's token opens that space
only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from memspace_contract import index
from tests.api.conftest import ADMIN_TOKEN, DIM, Start, subscribed, vec
from tests.api.over_http import Events, Web, headers, http_callers, memory_json, web

A, B = "space-a", "space-b"


@pytest.fixture
async def two(start: Start) -> AsyncIterator[Web]:
    async with web(start) as w:
        for space in (A, B):
            made = await w.client.put(f"/v1/spaces/{space}", json={"embedding_dim": DIM})
            assert made.status_code == 200
        yield w


async def remember_in_a(c: httpx.AsyncClient, by_header: bool = False) -> list[dict[str, Any]]:
    done = []
    for i in range(3):
        # By the header, the path names another space: the header wins (a conflict is refused,
        # so here the path names the same space).
        response = await c.post(
            f"/v1/spaces/{A}/memories",
            json=memory_json(f"a{i}", 1.0, float(i), tag="t"),
            headers=headers(A) if by_header else {},
        )
        assert response.status_code == 200
        done.append(response.json())
    return done


async def recall(c: httpx.AsyncClient, space: str, **extra: Any) -> list[dict[str, Any]]:
    response = await c.post(f"/v1/spaces/{space}/recall", json={"cue": vec(1), "k": 100, **extra})
    assert response.status_code == 200
    hits: list[dict[str, Any]] = response.json()["hits"]
    return hits


async def test_recall_in_b_never_returns_a_memories(two: Web) -> None:
    await remember_in_a(two.client, by_header=True)
    assert await recall(two.client, B) == []
    assert await recall(two.client, B, tags={"tag": "t"}) == []
    assert len(await recall(two.client, A)) == 3


async def test_get_and_forget_in_b_do_not_reach_a_memories(two: Web) -> None:
    c = two.client
    written = await remember_in_a(c)
    for done in written:
        got = await c.get(f"/v1/spaces/{B}/memories/{done['id']}")
        assert got.status_code == 404
        gone = await c.delete(f"/v1/spaces/{B}/memories/{done['id']}")
        assert gone.json()["forgotten"] is False
    for done in written:
        kept = await c.get(f"/v1/spaces/{A}/memories/{done['id']}")
        assert kept.json()["memory"]["id"] == done["id"]


async def test_the_same_id_in_two_spaces_is_two_memories(two: Web) -> None:
    c = two.client
    for space in (A, B):
        body = {"id": "shared", "content": space, "embedding": vec(1)}
        assert (await c.post(f"/v1/spaces/{space}/memories", json=body)).status_code == 200
    await c.delete(f"/v1/spaces/{B}/memories/shared")
    kept = await c.get(f"/v1/spaces/{A}/memories/shared")
    assert kept.json()["memory"]["content"] == A


async def test_subscribe_in_b_sees_no_a_events(two: Web) -> None:
    c = two.client
    await remember_in_a(c)
    async with (
        c.stream("GET", f"/v1/spaces/{B}/events?since_lsn=1") as replay,
        c.stream("GET", f"/v1/spaces/{B}/events") as live,
    ):
        await subscribed(two.running, B, count=2)  # both streams follow B before the writes
        await remember_in_a(c)
        mine = (await c.post(f"/v1/spaces/{B}/memories", json=memory_json("b"))).json()
        for response in (replay, live):
            event_id, name, data = await Events(response).next()
            assert (event_id, name) == (mine["lsn"], "remembered")
            assert (data["space"], data["id"]) == (B, mine["id"])


async def test_health_and_consolidate_of_b_count_nothing_of_a(two: Web) -> None:
    c = two.client
    await remember_in_a(c)
    health = (await c.get(f"/v1/spaces/{B}/health")).json()
    assert [(h["space"], h["memories"]) for h in health["spaces"]] == [(B, "0")]
    done = (await c.post(f"/v1/spaces/{B}/consolidate")).json()
    assert done["consolidated"] == "0"
    health_a = (await c.get(f"/v1/spaces/{A}/health")).json()
    assert health_a["spaces"][0]["memories"] == "3"


async def test_a_batch_in_b_lands_in_b_only(two: Web) -> None:
    c = two.client
    body = {"memories": [memory_json(f"b{i}") for i in range(5)]}
    done = await c.post(f"/v1/spaces/{B}/memories/batch", json=body, headers=headers(B))
    assert done.json()["count"] == 5
    health = (await c.get("/v1/health")).json()
    assert {h["space"]: h["memories"] for h in health["spaces"]} == {
        "default": "0",
        A: "0",
        B: "5",
    }


async def test_an_empty_batch_names_the_paths_space_never_the_default(two: Web) -> None:
    done = await two.client.post(f"/v1/spaces/{B}/memories/batch", json={"memories": []})
    assert done.status_code == 200
    # Over gRPC an empty stream without metadata would name no space; the path always does.
    missing = await two.client.post("/v1/spaces/nowhere/memories/batch", json={"memories": []})
    assert missing.status_code == 404


async def test_twenty_spaces_created_concurrently_are_all_usable(start: Start) -> None:
    async with web(start) as w:
        c = w.client
        names = [f"tenant-{i:02d}" for i in range(20)]
        made = await asyncio.gather(
            *(c.put(f"/v1/spaces/{name}", json={"embedding_dim": DIM}) for name in names)
        )
        assert [m.json()["created"] for m in made] == [True] * 20

        async def use(name: str) -> tuple[str, list[str]]:
            await c.post(f"/v1/spaces/{name}/memories", json=memory_json(name))
            return name, [h["memory"]["content"] for h in await recall(c, name)]

        for name, contents in await asyncio.gather(*(use(n) for n in names)):
            assert contents == [name]


# -- tokens ----------------------------------------------------------------------------------------

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
            assert made.status_code == 200
        yield w


MEMORY_METHODS = ["Remember", "RememberBatch", "Recall", "Get", "Forget", "Subscribe"]


@pytest.mark.parametrize("method", MEMORY_METHODS)
async def test_a_space_token_opens_its_space_only(guarded: Web, method: str) -> None:
    call = http_callers(guarded.client)[method]
    own = await call("team-a", headers(token=TOKENS["team-a"]))
    assert own in (200, 404)  # Get of an unknown id is 404 NOT_FOUND, past auth
    assert await call("team-b", headers(token=TOKENS["team-a"])) == 403
    assert await call("team-a", {}) == 401
    # Through the header as well: the token of team-a never opens team-b.
    assert await call("team-b", headers("team-b", TOKENS["team-a"])) == 403


async def test_a_space_token_never_reaches_another_spaces_data(guarded: Web) -> None:
    c = guarded.client
    a = headers(token=TOKENS["team-a"])
    written = await c.post(
        "/v1/spaces/team-b/memories", json=memory_json("b"), headers=headers(token=TOKENS["team-b"])
    )
    memory_id = written.json()["id"]
    assert (await c.get(f"/v1/spaces/team-b/memories/{memory_id}", headers=a)).status_code == 403
    # A conflicting header is refused before any token is looked at; the path alone is denied.
    conflict = await c.get(
        f"/v1/spaces/team-a/memories/{memory_id}", headers=headers("team-b", TOKENS["team-a"])
    )
    assert conflict.status_code == 400
    assert (await c.get(f"/v1/spaces/team-a/memories/{memory_id}", headers=a)).status_code == 404


async def test_a_denial_does_not_tell_whether_the_space_exists(guarded: Web) -> None:
    c = guarded.client
    token = headers(token=TOKENS["team-a"])
    exists = await c.post("/v1/spaces/team-b/recall", json={"cue": vec(1), "k": 1}, headers=token)
    missing = await c.post("/v1/spaces/no-such/recall", json={"cue": vec(1), "k": 1}, headers=token)
    assert exists.status_code == missing.status_code == 403
    assert exists.json()["message"].replace("team-b", "X") == missing.json()["message"].replace(
        "no-such", "X"
    )


async def test_space_management_needs_the_admin_token(guarded: Web) -> None:
    calls = http_callers(guarded.client)
    for method in ("ListSpaces", "CreateSpace", "DeleteSpace", "ApplyIndexEntry"):
        assert await calls[method]("team-a", headers(token=TOKENS["team-a"])) == 403
    listed = await guarded.client.get("/v1/spaces", headers=headers(token=ADMIN_TOKEN))
    assert [s["space"] for s in listed.json()["spaces"]] == ["default", "team-a", "team-b"]
    every = await guarded.client.get("/v1/health", headers=headers(token=TOKENS["team-a"]))
    assert every.status_code == 403
    own = await guarded.client.get("/v1/health", headers=headers("team-a", TOKENS["team-a"]))
    assert [s["space"] for s in own.json()["spaces"]] == ["team-a"]
