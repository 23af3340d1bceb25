"""The HTTP/JSON front against a real server (uvicorn on the server's loop, httpx over a socket):
every method has a route; calls go through the same routing, auth and error table as gRPC, and
fail with the HTTP status of their gRPC twin's code and the same message; Subscribe is
Server-Sent Events whose ids are LSNs."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import grpc
import httpx
import pytest

from memspace_contract import index
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_server import errors, settings
from memspace_server.api import errors_map, handling, openapi
from memspace_server.api.http_routes import OPERATIONS, ROUTES
from tests.api.conftest import (
    ADMIN_TOKEN,
    DIM,
    Start,
    details,
    failure,
    make_settings,
    md,
    memory,
    rpc_callers,
    status_of,
    vec,
    write_entry,
)
from tests.api.over_http import Events, headers, http_callers, memory_json, web
from tests.api.test_tls import make_pki
from tests.conftest import QuotaClock

ROOT = Path(__file__).resolve().parents[2]


def test_every_grpc_method_has_exactly_one_http_operation() -> None:
    methods = {
        (service.name, method.name) for service in handling.services() for method in service.methods
    }
    routed = [(op.service, op.method) for op in OPERATIONS]
    assert sorted(routed) == sorted(methods)
    assert len({(op.verb, op.path) for op in ROUTES}) == len(ROUTES)


def test_every_grpc_status_has_one_http_status() -> None:
    assert set(errors_map.HTTP_STATUS) == set(grpc.StatusCode)
    for code in errors_map.TABLE.values():
        assert 400 <= errors_map.http_status(code) < 600
    assert errors_map.http_status(grpc.StatusCode.INVALID_ARGUMENT) == 400
    assert errors_map.http_status(grpc.StatusCode.UNAVAILABLE) == 503


def test_the_committed_openapi_document_is_the_one_the_code_builds() -> None:
    committed = (ROOT / "docs" / "openapi.json").read_text()
    assert committed == openapi.text()
    assert openapi.main(["--check", str(ROOT / "docs" / "openapi.json")]) == 0


async def test_the_server_serves_its_openapi_document(start: Start) -> None:
    async with web(start) as w:
        response = await w.client.get("/openapi.json")
    assert response.status_code == 200
    assert response.json() == json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert response.json()["openapi"] == "3.1.0"


async def test_a_memory_round_trips_over_http(start: Start) -> None:
    async with web(start) as w:
        c = w.client
        made = await c.post(
            "/v1/spaces/default/memories", json=memory_json("tea", 1.0, 0.5, topic="drinks")
        )
        assert made.status_code == 200
        memory_id, lsn = made.json()["id"], int(made.json()["lsn"])
        assert lsn == 1
        got = (await c.get(f"/v1/spaces/default/memories/{memory_id}")).json()["memory"]
        assert (got["content"], got["tags"], got["embedding"]) == (
            "tea",
            {"topic": "drinks"},
            vec(1.0, 0.5),
        )
        batch = await c.post(
            "/v1/spaces/default/memories/batch",
            json={"memories": [memory_json("a", 0.0, 1.0), memory_json("b", 0.0, 0.0, 1.0)]},
        )
        assert batch.json()["count"] == 2
        assert len(batch.json()["ids"]) == 2
        hits = (
            await c.post(
                "/v1/spaces/default/recall", json={"cue": vec(1.0, 0.5), "k": 2, "min_score": 0.5}
            )
        ).json()["hits"]
        assert [hit["memory"]["id"] for hit in hits] == [memory_id]
        assert hits[0]["tier"] == "hot"
        assert hits[0]["score"] == pytest.approx(1.0)
        assert (await c.post("/v1/spaces/default/consolidate")).json()["consolidated"] == "3"
        forgotten = (await c.delete(f"/v1/spaces/default/memories/{memory_id}")).json()
        assert forgotten["forgotten"] is True
        assert int(forgotten["lsn"]) > 3
        gone = await c.get(f"/v1/spaces/default/memories/{memory_id}")
        assert gone.status_code == 404
        assert gone.json()["code"] == "NOT_FOUND"
        health = (await c.get("/v1/spaces/default/health")).json()
        assert health["status"] == "SERVING"
        assert health["spaces"][0]["memories"] == "2"
    # What HTTP stored, gRPC reads.
    found = await w.running.memories.Get(pb.GetRequest(id=batch.json()["ids"][0]))
    assert found.memory.content == "a"


async def test_spaces_are_managed_over_http(start: Start) -> None:
    async with web(start) as w:
        c = w.client
        made = await c.put("/v1/spaces/notes", json={"embedding_dim": 8})
        assert made.json() == {**made.json(), "space": "notes", "embedding_dim": 8, "created": True}
        again = await c.put("/v1/spaces/notes", json={"embedding_dim": 8})
        assert again.json()["created"] is False
        other = await c.put("/v1/spaces/notes", json={"embedding_dim": 16})
        assert other.status_code == 409
        assert other.json()["code"] == "FAILED_PRECONDITION"
        listed = (await c.get("/v1/spaces")).json()["spaces"]
        assert [space["space"] for space in listed] == ["default", "notes"]
        assert (await c.delete("/v1/spaces/notes")).json() == {"deleted": True}
        assert (await c.delete("/v1/spaces/notes")).json() == {"deleted": False}


async def test_the_header_names_the_space_and_a_conflict_is_grpcs_invalid_argument(
    start: Start,
) -> None:
    async with web(start) as w:
        await w.client.put("/v1/spaces/other", json={"embedding_dim": DIM})
        same = await w.client.post(
            "/v1/spaces/other/memories", json=memory_json("o"), headers=headers("other")
        )
        assert same.status_code == 200
        for path in ("/v1/spaces/default/recall", "/v1/spaces/default/memories/batch"):
            body = {"cue": vec(1), "k": 1} if path.endswith("recall") else {"memories": []}
            refused = await w.client.post(path, json=body, headers=headers("other"))
            assert refused.status_code == 400
            err = await failure(
                w.running.memories.Recall(
                    pb.RecallRequest(space="default", cue=vec(1), k=1), metadata=md("other")
                )
            )
            assert refused.json() == {"code": "INVALID_ARGUMENT", "message": details(err)}
        # Nothing fell back to either space.
        for space in ("default", "other"):
            health = (await w.client.get(f"/v1/spaces/{space}/health")).json()
            assert health["spaces"][0]["memories"] == ("1" if space == "other" else "0")


async def test_every_method_fails_over_http_with_the_status_of_its_grpc_twin(
    start: Start, admin_token_file: Path
) -> None:
    async with web(start, admin_token_file=admin_token_file) as w:
        for space, token in (("team-a", "ta"), ("team-b", "tb")):
            await w.running.spaces.CreateSpace(
                pb.CreateSpaceRequest(
                    space=space, embedding_dim=DIM, token_sha256=index.token_sha256(token)
                ),
                metadata=md(token=ADMIN_TOKEN),
            )
        grpc_calls, http_calls = rpc_callers(w.running.api), http_callers(w.client)
        cases: list[tuple[str, str | None]] = [
            ("team-a", None),
            ("team-a", "ta"),
            ("team-a", "tb"),
            ("team-a", ADMIN_TOKEN),
            ("nowhere", "ta"),
            ("nowhere", ADMIN_TOKEN),
            ("Not_A_Space", ADMIN_TOKEN),
        ]
        seen = set()
        for method, call in sorted(grpc_calls.items()):
            if method in ("CreateSpace", "DeleteSpace"):
                continue  # they change what the next case finds: tested on their own above
            for named, bearer in cases:
                code = await status_of(call(named, md(token=bearer)))
                status = await http_calls[method](named, headers(token=bearer))
                assert status == errors_map.http_status(code), (method, named, bearer, code)
                seen.add(status)
        assert {200, 400, 401, 403, 404} <= seen


async def test_a_bad_body_is_400_with_what_is_wrong(start: Start) -> None:
    async with web(start) as w:
        c = w.client
        cases = {
            b"{not json": "not JSON",
            b"[1, 2]": "must be a JSON object",
            json.dumps({"cue": vec(1), "k": 1, "colour": "red"}).encode(): "colour",
            json.dumps({"cue": vec(1), "k": 1, "space": "default"}).encode(): "from the path",
            json.dumps({"cue": [1.0, 2.0], "k": 1}).encode(): "exactly 4",
            json.dumps({"cue": vec(1), "k": "many"}).encode(): "k",
        }
        for body, words in cases.items():
            response = await c.post("/v1/spaces/default/recall", content=body)
            assert response.status_code == 400, body
            assert response.json()["code"] == "INVALID_ARGUMENT"
            assert words in response.json()["message"], response.json()
        missing = await c.post("/v1/spaces/default/memories")
        assert missing.status_code == 400
        unrouted = await c.patch("/v1/spaces/default/memories/x")
        assert unrouted.status_code == 405
        assert unrouted.json()["code"] == "UNIMPLEMENTED"


async def test_a_body_over_the_receive_limit_is_refused(start: Start) -> None:
    async with web(start, max_receive_message_bytes=4096) as w:
        big = memory_json("x" * 8192)
        response = await w.client.post("/v1/spaces/default/memories", json=big)
        assert response.status_code == 429
        assert "over 4096 bytes" in response.json()["message"]


async def test_a_rate_limited_call_says_when_to_retry(
    start: Start, managed_dirs: tuple[Path, Path], quota_clock: QuotaClock
) -> None:
    index_dir, volumes = managed_dirs
    write_entry(
        index_dir,
        "reader",
        token="tr",
        volumes=volumes,
        quota=index.Quota(max_recalls_per_second=2),
    )
    async with web(start, data_root=volumes, index_dir=index_dir) as w:
        statuses = []
        for _ in range(3):
            response = await w.client.post(
                "/v1/spaces/reader/recall",
                json={"cue": vec(1), "k": 1},
                headers=headers(token="tr"),
            )
            statuses.append(response.status_code)
        assert statuses == [200, 200, 429]
        assert response.json()["code"] == "RESOURCE_EXHAUSTED"
        assert 0.0 < response.json()["retry_after_s"] <= 0.5
        assert response.headers["Retry-After"] == "1"


async def test_subscribe_is_server_sent_events_with_lsn_ids_and_resumes_after_last_event_id(
    start: Start,
) -> None:
    async with web(start) as w:
        c = w.client
        written = [
            (await c.post("/v1/spaces/default/memories", json=memory_json(f"m{i}"))).json()
            for i in range(4)
        ]
        async with c.stream("GET", "/v1/spaces/default/events?since_lsn=1") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            seen = await Events(response).take(2)
        assert [(i, name) for i, name, _ in seen] == [("1", "remembered"), ("2", "remembered")]
        assert seen[1][2]["id"] == written[1]["id"]
        assert seen[1][2]["lsn"] == "2"
        # A reader that stopped after LSN 2 resumes at 3, whatever the URL's since_lsn says.
        resumed = {"Last-Event-ID": "2"}
        async with c.stream(
            "GET", "/v1/spaces/default/events?since_lsn=1", headers=resumed
        ) as response:
            events = Events(response)
            replayed = await events.take(2)
            gone = await c.delete(f"/v1/spaces/default/memories/{written[0]['id']}")
            live = await events.next()
        assert [i for i, _, _ in replayed] == ["3", "4"]
        assert live[0] == gone.json()["lsn"] == "5"
        assert live[1] == "forgotten"
        bad = await c.get("/v1/spaces/default/events", headers={"Last-Event-ID": "x"})
        assert bad.status_code == 400


async def test_an_ended_event_stream_says_where_to_resume(start: Start) -> None:
    async with web(start) as w:
        c = w.client
        await c.post("/v1/spaces/default/memories", json=memory_json("first"))
        async with c.stream("GET", "/v1/spaces/default/events?since_lsn=1") as response:
            events = Events(response)
            assert (await events.next())[0] == "1"
            # The server drains: the stream ends with an error event whose id is the last LSN
            # delivered (EventSource resumes after it) and whose body names the resume LSN.
            drained = asyncio.ensure_future(w.running.server.drain())
            last_id, name, body = await events.next()
            await drained
        assert name == "error"
        assert last_id == "1"
        assert body["code"] == "UNAVAILABLE"
        assert body["resume_lsn"] == "2"


async def test_a_refused_subscription_is_an_http_error_before_any_event(
    start: Start, admin_token_file: Path
) -> None:
    async with web(start, admin_token_file=admin_token_file) as w:
        c = w.client
        assert (await c.get("/v1/spaces/default/events")).status_code == 401
        wrong = await c.get("/v1/spaces/default/events", headers=headers(token="nope"))
        assert wrong.status_code == 403
        missing = await c.get("/v1/spaces/nowhere/events", headers=headers(token=ADMIN_TOKEN))
        assert missing.status_code == 404
        conflict = await c.get("/v1/spaces/default/events", headers=headers("other", ADMIN_TOKEN))
        assert conflict.status_code == 400


def test_an_http_port_off_loopback_needs_tls_and_a_token_like_the_grpc_port(
    tmp_path: Path,
) -> None:
    with pytest.raises(settings.SettingsError, match=r"0\.0\.0\.0:8080"):
        make_settings(tmp_path, http_listen="0.0.0.0:8080")
    make_settings(tmp_path, http_listen="0.0.0.0:8080", insecure=True)


async def test_an_http_call_counts_in_the_same_metrics_as_grpc(start: Start) -> None:
    async with web(start) as w:
        await w.running.memories.Remember(pb.RememberRequest(memory=memory("g")))
        await w.client.post("/v1/spaces/default/memories", json=memory_json("h"))
        await w.client.get("/v1/spaces/default/memories/nothing")
        counted = w.running.server.metrics.requests
    ok = counted.labels("default", "MemoryService/Remember", "OK")._value.get()
    assert ok == 2.0
    missing = counted.labels("default", "MemoryService/Get", "NOT_FOUND")._value.get()
    assert missing == 1.0


def test_http_errors_are_the_grpc_table() -> None:
    refused = errors.SpaceNotFoundError("no space 'x' on this server")
    assert errors_map.http_status(errors_map.code_for(refused)) == 404


async def test_with_tls_the_http_port_speaks_https_with_the_grpc_certificate(
    start: Start, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    running = await start(
        tls_cert_file=pki.cert_file, tls_key_file=pki.key_file, http_listen="127.0.0.1:0"
    )
    assert running.server.http is not None
    url = f"https://127.0.0.1:{running.server.http.port}"
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    async with httpx.AsyncClient(base_url=url, verify=context) as c:
        made = await c.post("/v1/spaces/default/memories", json=memory_json("secret"))
        assert made.status_code == 200
    # Plain HTTP to the TLS port gets no answer, and a client that does not trust the CA fails.
    async with httpx.AsyncClient(base_url=url.replace("https", "http")) as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get("/v1/spaces")
    async with httpx.AsyncClient(base_url=url) as untrusting:
        with pytest.raises(httpx.ConnectError):
            await untrusting.get("/v1/spaces")
