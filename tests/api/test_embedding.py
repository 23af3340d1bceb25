"""Server-side embeddings: a space created with an embedding model takes text only, over gRPC,
HTTP/JSON and MCP alike, embedded by the real packaged model (wordllama-l2-256, no stand-in).
A paraphrase is recalled above unrelated memories; a client's own vector still works when its
dimension matches; a space without a model refuses text-only calls with a clear message."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from memspace_contract import client, models
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_server import embedding
from tests.api.conftest import DIM, Running, Start, failure, md, memspace_serve, vec
from tests.api.over_http import headers, web
from tests.api.test_mcp import answer, call, refused, session, text

MODEL = models.DEFAULT_MODEL
MODEL_DIM = models.MODELS[MODEL].dim

NOTES = [
    "The dentist appointment moved to Thursday afternoon at three.",
    "Quarterly revenue grew by twelve percent compared with last year.",
    "Alice prefers green tea to coffee in the morning.",
    "The deployment failed because the database migration timed out.",
    "Our cat sleeps on the warm windowsill every day.",
]
# Each asks for one note in other words (few shared words).
PARAPHRASES = [
    ("When do I see the dental surgeon?", 0),
    ("How much did sales increase this quarter?", 1),
    ("Which drink does Alice like?", 2),
    ("Why did the release break?", 3),
    ("Where does the kitten nap?", 4),
]


async def create(running: Running, space: str, model: str = MODEL, dim: int = 0) -> pb.Space:
    return await running.spaces.CreateSpace(
        pb.CreateSpaceRequest(space=space, embedding_model=model, embedding_dim=dim)
    )


@pytest.fixture
async def server(start: Start) -> Running:
    running = await start()
    made = await create(running, "notes")
    assert made.embedding_model == MODEL
    assert made.embedding_dim == MODEL_DIM
    return running


def text_memory(content: str, **tags: str) -> pb.Memory:
    return pb.Memory(content=content, tags=tags)


async def test_a_paraphrase_is_recalled_above_unrelated_memories_over_grpc(
    server: Running,
) -> None:
    ids = []
    for note in NOTES:
        made = await server.memories.Remember(
            pb.RememberRequest(memory=text_memory(note)), metadata=md("notes")
        )
        ids.append(made.id)
    for question, expected in PARAPHRASES:
        hits = await server.memories.Recall(
            pb.RecallRequest(query=question, k=len(NOTES), include_embeddings=True),
            metadata=md("notes"),
        )
        assert hits.hits[0].memory.id == ids[expected], (question, hits)
        assert hits.hits[0].score > hits.hits[1].score
        # The stored vector is the model's: unit length, of the model's dimension.
        stored = np.array(hits.hits[0].memory.embedding, dtype=np.float32)
        assert stored.shape == (MODEL_DIM,)
        assert abs(float(np.linalg.norm(stored)) - 1.0) < 1e-4


async def test_remember_batch_embeds_text_in_order_beside_the_clients_own_vectors(
    server: Running,
) -> None:
    own = embedding.load(models.MODELS[MODEL]).embed([NOTES[3]])[0]

    async def stream() -> AsyncIterator[pb.RememberRequest]:
        for i, note in enumerate(NOTES):
            memory = text_memory(note, n=str(i))
            if i == 3:  # a client's own vector of the right dimension is stored as sent
                memory.embedding.extend(own.tolist())
            yield pb.RememberRequest(memory=memory)

    done = await server.memories.RememberBatch(stream(), metadata=md("notes"))
    assert done.count == len(NOTES)
    for question, expected in PARAPHRASES:
        hits = await server.memories.Recall(
            pb.RecallRequest(query=question, k=1), metadata=md("notes")
        )
        assert hits.hits[0].memory.id == done.ids[expected], question
        assert hits.hits[0].memory.tags["n"] == str(expected)


async def test_a_batch_larger_than_one_model_call_is_embedded_whole(start: Start) -> None:
    running = await start(embedding_batch=4)
    await create(running, "notes")
    count = 10

    async def stream() -> AsyncIterator[pb.RememberRequest]:
        for i in range(count):
            yield pb.RememberRequest(memory=text_memory(f"{NOTES[i % len(NOTES)]} (copy {i})"))

    done = await running.memories.RememberBatch(stream(), metadata=md("notes"))
    assert done.count == count
    got = await running.memories.Get(pb.GetRequest(id=done.ids[7]), metadata=md("notes"))
    assert got.memory.content.endswith("(copy 7)")
    assert len(got.memory.embedding) == MODEL_DIM


async def test_a_clients_own_vector_of_another_dimension_is_refused(server: Running) -> None:
    err = await failure(
        server.memories.Remember(
            pb.RememberRequest(memory=pb.Memory(content="x", embedding=vec(1.0))),
            metadata=md("notes"),
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(MODEL_DIM) in (err.details() or "")
    err = await failure(
        server.memories.Recall(pb.RecallRequest(cue=vec(1.0), k=1), metadata=md("notes"))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    hits = await server.memories.Recall(
        pb.RecallRequest(query="anything", k=5), metadata=md("notes")
    )
    assert list(hits.hits) == []


async def test_text_only_calls_on_a_space_without_a_model_are_refused(server: Running) -> None:
    calls: list[Awaitable[Any]] = [
        server.memories.Remember(
            pb.RememberRequest(memory=text_memory("no vector")), metadata=md("default")
        ),
        server.memories.Recall(pb.RecallRequest(query="no vector", k=1), metadata=md("default")),
    ]
    for made in calls:
        err = await failure(made)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "has no embedding model" in (err.details() or ""), err.details()
    hits = await server.memories.Recall(pb.RecallRequest(cue=vec(1.0), k=5), metadata=md("default"))
    assert list(hits.hits) == []  # nothing was stored


async def test_empty_text_without_a_vector_is_refused(server: Running) -> None:
    for content in ("", "   "):
        err = await failure(
            server.memories.Remember(
                pb.RememberRequest(memory=text_memory(content)), metadata=md("notes")
            )
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, content


async def test_create_space_checks_the_model_and_its_dimension(server: Running) -> None:
    unknown = await failure(create(server, "other", model="no-such-model"))
    assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert MODEL in (unknown.details() or "")  # names the models offered
    conflicting = await failure(create(server, "other", dim=DIM))
    assert conflicting.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(MODEL_DIM) in (conflicting.details() or "")
    same = await create(server, "other", dim=MODEL_DIM)
    assert same.created
    assert same.embedding_model == MODEL
    again = await create(server, "notes")
    assert not again.created
    changed = await failure(create(server, "notes", model="", dim=MODEL_DIM))
    assert changed.code() == grpc.StatusCode.FAILED_PRECONDITION
    listed = await server.spaces.ListSpaces(pb.ListSpacesRequest())
    by_name = {s.space: s for s in listed.spaces}
    assert by_name["notes"].embedding_model == MODEL
    assert by_name["default"].embedding_model == ""


async def test_a_server_that_offers_no_model_refuses_one(start: Start) -> None:
    running = await start(embedding_models="none")
    err = await failure(create(running, "notes"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "offers no embedding model" in (err.details() or "")


async def test_text_only_remember_and_recall_over_http(start: Start) -> None:
    async with web(start) as w:
        made = await w.client.put(
            "/v1/spaces/notes", json={"embedding_model": MODEL}, headers=headers()
        )
        assert made.status_code == 200, made.text
        assert made.json()["embedding_dim"] == MODEL_DIM
        one = await w.client.post("/v1/spaces/notes/memories", json={"content": NOTES[0]})
        assert one.status_code == 200, one.text
        batch = await w.client.post(
            "/v1/spaces/notes/memories/batch",
            json={"memories": [{"content": note} for note in NOTES[1:]]},
        )
        assert batch.status_code == 200, batch.text
        ids = [one.json()["id"], *batch.json()["ids"]]
        for question, expected in PARAPHRASES:
            found = await w.client.post("/v1/spaces/notes/recall", json={"query": question, "k": 3})
            assert found.status_code == 200, found.text
            assert found.json()["hits"][0]["memory"]["id"] == ids[expected], question
        refused_http = await w.client.post(
            "/v1/spaces/default/memories", json={"content": "no vector"}
        )
        assert refused_http.status_code == 400
        assert "has no embedding model" in refused_http.json()["message"]


async def test_text_only_tools_over_mcp(start: Start) -> None:
    async with web(start) as w:
        await create(w.running, "notes")
        async with session(w, "notes", None) as s:
            listed = {tool.name: tool for tool in (await s.list_tools()).tools}
            assert listed["remember"].input_schema["required"] == ["content"]
            assert "required" not in listed["recall"].input_schema
            ids = [answer(await call(s, "remember", content=note))["id"] for note in NOTES]
            for question, expected in PARAPHRASES:
                hits = answer(await call(s, "recall", query=question, k=2))["hits"]
                assert hits[0]["memory"]["id"] == ids[expected], question
        async with session(w, "default", None) as s:
            denied = await call(s, "remember", content="no vector")
            assert refused(denied, "INVALID_ARGUMENT"), text(denied)
            assert "has no embedding model" in text(denied)


async def test_one_space_cannot_hold_the_embedding_threads() -> None:
    """A space with many batches waiting gets a turn only after the other waiting spaces."""
    turns = embedding.Turns(1)
    order: list[str] = []
    release = asyncio.Event()

    async def batch(space: str) -> None:
        await turns.enter(space)
        try:
            order.append(space)
            await release.wait()
        finally:
            turns.leave(space)

    first = asyncio.create_task(batch("flood"))
    await asyncio.sleep(0)
    flood = [asyncio.create_task(batch("flood")) for _ in range(5)]
    await asyncio.sleep(0)
    quiet = asyncio.create_task(batch("quiet"))
    await asyncio.sleep(0)
    assert turns.waiting("flood") == 5
    assert turns.waiting("quiet") == 1
    release.set()
    await asyncio.gather(first, *flood, quiet)
    # The quiet space's one batch ran right after the flood's next one, not after all five.
    assert order.index("quiet") <= 2, order
    assert turns.free == 1


def test_the_model_loads_from_its_package_without_a_network() -> None:
    """The weights and tokenizer ship in the wheel: loading needs no hub and no download, and
    does not import wordllama itself (which configures the root logger)."""
    script = (
        "import sys; from memspace_contract import models; from memspace_server import embedding\n"
        "m = embedding.load(models.MODELS[models.DEFAULT_MODEL])\n"
        "v = m.embed(['offline'])\n"
        "assert v.shape == (1, m.dim), v.shape\n"
        "assert 'wordllama' not in sys.modules\n"
        "print('ok')\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": "/nonexistent",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


async def test_the_client_library_and_the_cli_take_text_only(server: Running) -> None:
    credentials = client.Credentials(endpoint=server.address, space="notes")
    async with client.AsyncMemspaceClient(credentials, timeout=30) as memspace:
        first = await memspace.remember(NOTES[0], tags={"via": "client"})
        batch = await memspace.remember_batch(NOTES[1:3])
        assert batch.count == 2
        hits = await memspace.recall(query=PARAPHRASES[0][0], k=3)
        assert hits[0].memory.id == first.id
        hits = await memspace.recall(query=PARAPHRASES[2][0], k=3)
        assert hits[0].memory.id == batch.ids[1]
        with pytest.raises(grpc.aio.AioRpcError) as no_cue:
            await memspace.recall(k=3)
        assert no_cue.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def memspace_cli(*args: str) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("MEMSPACE_")}
        return subprocess.run(
            [sys.executable, "-m", "memspace_cli.main", *args, "--endpoint", server.address],
            env={**base, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    made = await asyncio.to_thread(
        memspace_cli, "remember", NOTES[3], "--space", "notes", "-o", "json"
    )
    assert made.returncode == 0, made.stderr
    made_id = json.loads(made.stdout)["id"]
    found = await asyncio.to_thread(
        memspace_cli,
        "recall",
        "--query",
        PARAPHRASES[3][0],
        "-k",
        "1",
        "--space",
        "notes",
        "-o",
        "json",
    )
    assert found.returncode == 0, found.stderr
    assert [h["memory"]["id"] for h in json.loads(found.stdout)] == [made_id]
    neither = await asyncio.to_thread(memspace_cli, "recall", "--space", "notes")
    assert neither.returncode == 2
    assert "--query" in neither.stderr
    refused_cli = await asyncio.to_thread(memspace_cli, "remember", "text", "--space", "default")
    assert refused_cli.returncode == 1
    assert "has no embedding model" in refused_cli.stderr


async def test_hybrid_recall_by_text_alone_embeds_the_query_on_a_space_with_a_model(
    server: Running,
) -> None:
    """The vector half of hybrid recall comes from the embedded query: a memory that shares no
    word with the query, which keyword recall cannot find, is among the hybrid hits."""
    ids = []
    for note in NOTES:
        made = await server.memories.Remember(
            pb.RememberRequest(memory=text_memory(note)), metadata=md("notes")
        )
        ids.append(made.id)
    question = "Where does a kitten nap?"  # no word in common with the cat's note
    cat = ids[4]

    async def recall(mode: pb.RecallMode.ValueType) -> list[str]:
        found = await server.memories.Recall(
            pb.RecallRequest(query=question, k=3, mode=mode), metadata=md("notes")
        )
        return [hit.memory.id for hit in found.hits]

    assert cat not in await recall(pb.RECALL_MODE_KEYWORD)
    assert cat in await recall(pb.RECALL_MODE_HYBRID)
    assert (await recall(pb.RECALL_MODE_VECTOR))[0] == cat


def test_the_standalone_default_space_takes_text_with_a_default_model(tmp_path: Path) -> None:
    """`make run`'s server: the 'default' space made with --default-embedding-model takes text
    only, and the commands the start banner prints for it work as printed."""
    args = ["--data-root", str(tmp_path / "data"), "--listen", "127.0.0.1:0"]
    args += ["--metrics-listen", "off", "--default-embedding-model", MODEL]
    with memspace_serve(args, tmp_path / "log") as served:
        banner = served.log.read_text()
        assert f"embedding_dim {MODEL_DIM}, model {MODEL}" in banner
        printed = [
            shlex.split(line.split(":", 1)[1] if line.lstrip().startswith("text:") else line)
            for line in banner.splitlines()
            if "memspace remember" in line or "memspace recall" in line
        ]
        assert [argv[:2] for argv in printed] == [
            ["memspace", "remember"],
            ["memspace", "recall"],
        ]
        base = {k: v for k, v in os.environ.items() if not k.startswith("MEMSPACE_")}

        def run(argv: list[str]) -> str:
            done = subprocess.run(
                [sys.executable, "-m", "memspace_cli.main", *argv[1:], "-o", "json"],
                env={**base, "COLUMNS": "200"},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            return done.stdout

        run([*printed[0][:-1], "Our cat sleeps on the warm windowsill."])
        made = json.loads(run(printed[0]))["id"]
        hits = json.loads(run(printed[1]))
        assert hits[0]["memory"]["id"] == made
    with memspace_serve(args, tmp_path / "log-again") as served:
        # The space keeps the model it was made with; a second start does not remake it.
        assert f"embedding_dim {MODEL_DIM}, model {MODEL}" in served.log.read_text()
