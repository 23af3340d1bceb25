"""Keyword and hybrid recall through a real server over a socket: BM25 finds the exact rare
term a vector recall misses, hybrid finds both, Forget reaches the keyword index, a restart
keeps it without a rebuild, a kill -9 rebuilds it to exactly what was acknowledged, bad input is
INVALID_ARGUMENT, and one space's keyword search never answers another's memories."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc
from tests.api.conftest import DIM, Running, details, failure, md, memory, memspace_serve, vec
from tests.api.test_drain import serve_args, wait_exit

KEYWORD, HYBRID = pb.RECALL_MODE_KEYWORD, pb.RECALL_MODE_HYBRID
REBUILT = "keyword index of default rebuilt"


async def remember_corpus(m: Any, space: str = "default") -> dict[str, str]:
    """A few memories; the one about the rare term points away from the cue (1, 0, 0, 0)."""
    written = {}
    for name, content, embedding in [
        ("near", "the cat sat on the mat", (1.0, 0.1)),
        ("close", "a dog sat near the door", (0.9, 0.3)),
        ("rare", "invoice QX-7731 was paid twice", (0.0, 0.0, 1.0)),
        ("other", "the weather was mild", (0.0, 1.0)),
    ]:
        done = await m.Remember(
            pb.RememberRequest(memory=memory(content, *embedding, kind=name)), metadata=md(space)
        )
        written[name] = done.id
    return written


def ids(answer: pb.RecallResponse) -> list[str]:
    return [hit.memory.id for hit in answer.hits]


async def test_keyword_recall_finds_the_rare_term_that_vector_recall_misses(
    standalone: Running,
) -> None:
    m = standalone.memories
    written = await remember_corpus(m)
    by_vector = await m.Recall(pb.RecallRequest(cue=vec(1.0), k=2))
    assert written["rare"] not in ids(by_vector)
    by_word = await m.Recall(pb.RecallRequest(mode=KEYWORD, query="qx-7731", k=2))
    assert ids(by_word) == [written["rare"]]
    assert by_word.hits[0].score > 1.0  # a BM25 score, not a clamped cosine
    # Tag filters narrow keyword recall too; tags are words of the index as well.
    assert ids(
        await m.Recall(pb.RecallRequest(mode=KEYWORD, query="sat", tags={"kind": "near"}, k=10))
    )
    assert (
        ids(
            await m.Recall(
                pb.RecallRequest(mode=KEYWORD, query="qx 7731", tags={"kind": "near"}, k=10)
            )
        )
        == []
    )
    assert ids(await m.Recall(pb.RecallRequest(mode=KEYWORD, query="weather", k=5))) == [
        written["other"]
    ]
    # min_score is a floor on the BM25 score in keyword mode.
    floor = by_word.hits[0].score + 1.0
    assert (
        ids(await m.Recall(pb.RecallRequest(mode=KEYWORD, query="qx", min_score=floor, k=10))) == []
    )


async def test_hybrid_recall_finds_both_the_keyword_hit_and_the_vector_hit(
    standalone: Running,
) -> None:
    m = standalone.memories
    written = await remember_corpus(m)
    both = await m.Recall(pb.RecallRequest(mode=HYBRID, cue=vec(1.0), query="QX-7731", k=2))
    assert set(ids(both)) == {written["near"], written["rare"]}
    # Reciprocal-rank fusion: each hit scores the sum of 1 / (60 + rank) over the two lists.
    assert all(1 / 64 < hit.score <= 2 / 61 for hit in both.hits)


async def test_forget_removes_a_memory_from_the_keyword_index(standalone: Running) -> None:
    m = standalone.memories
    written = await remember_corpus(m)
    assert ids(await m.Recall(pb.RecallRequest(mode=KEYWORD, query="invoice", k=10)))
    assert (await m.Forget(pb.ForgetRequest(id=written["rare"]))).forgotten
    assert ids(await m.Recall(pb.RecallRequest(mode=KEYWORD, query="invoice", k=10))) == []
    assert ids(
        await m.Recall(pb.RecallRequest(mode=HYBRID, cue=vec(0, 0, 1), query="invoice", k=10))
    )


async def test_a_batch_is_found_by_keyword(standalone: Running) -> None:
    async def requests() -> AsyncIterator[pb.RememberRequest]:
        for i in range(20):
            yield pb.RememberRequest(memory=memory(f"batch item{i} plain", 1.0, float(i)))

    done = await standalone.memories.RememberBatch(requests())
    assert done.count == 20
    found = await standalone.memories.Recall(pb.RecallRequest(mode=KEYWORD, query="item7", k=10))
    assert [hit.memory.content for hit in found.hits] == ["batch item7 plain"]
    plain = await standalone.memories.Recall(pb.RecallRequest(mode=KEYWORD, query="plain", k=50))
    assert len(plain.hits) == 20


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.RecallRequest(mode=KEYWORD, k=10), "needs a text query"),
        (pb.RecallRequest(mode=KEYWORD, query="   ", k=10), "needs a text query"),
        (pb.RecallRequest(mode=HYBRID, cue=vec(1.0), k=10), "needs a text query"),
        (pb.RecallRequest(mode=HYBRID, query="cat", k=10), "needs a cue"),
        (pb.RecallRequest(mode=KEYWORD, query="x" * 4097, k=10), "at most 4096"),
        (pb.RecallRequest(mode=KEYWORD, query="cat", k=0), "k is 0"),
        (pb.RecallRequest(mode=7, query="cat", k=10), "mode 7"),  # type: ignore[arg-type]
    ],
)
async def test_bad_keyword_recalls_are_invalid_argument(
    standalone: Running, request_: pb.RecallRequest, message: str
) -> None:
    await remember_corpus(standalone.memories)
    err = await failure(standalone.memories.Recall(request_))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in details(err)


async def test_keyword_search_in_one_space_never_returns_another_spaces_memories(
    standalone: Running,
) -> None:
    for space in ("space-a", "space-b"):
        await standalone.spaces.CreateSpace(pb.CreateSpaceRequest(space=space, embedding_dim=DIM))
    m = standalone.memories
    in_a = await remember_corpus(m, "space-a")
    await m.Remember(
        pb.RememberRequest(memory=memory("nothing alike", 1.0)), metadata=md("space-b")
    )
    for query in ("invoice", "cat", "kind", "near", "the"):
        for mode in (KEYWORD, HYBRID):
            found = await m.Recall(
                pb.RecallRequest(mode=mode, cue=vec(1.0), query=query, k=100),
                metadata=md("space-b"),
            )
            assert not set(ids(found)) & set(in_a.values())
    found = await m.Recall(
        pb.RecallRequest(mode=KEYWORD, query="invoice", k=10), metadata=md("space-a")
    )
    assert ids(found) == [in_a["rare"]]


async def keyword_ids(address: str, query: str) -> set[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        found = await stub.Recall(pb.RecallRequest(mode=KEYWORD, query=query, k=1000))
        return set(ids(found))


async def test_a_restart_keeps_the_keyword_index_and_a_crash_rebuilds_it_exactly(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    with memspace_serve(serve_args(data), tmp_path / "first.log") as process:
        async with grpc.aio.insecure_channel(process.address) as channel:
            m = pb_grpc.MemoryServiceStub(channel)
            kept = [
                (await m.Remember(pb.RememberRequest(memory=memory(f"durable word{i}", 1.0)))).id
                for i in range(30)
            ]
            assert len(await keyword_ids(process.address, "durable")) == 30
            assert (await m.Forget(pb.ForgetRequest(id=kept.pop(0)))).forgotten
        process.popen.send_signal(signal.SIGTERM)
        assert await wait_exit(process.popen, 20) == 0
    assert REBUILT in (tmp_path / "first.log").read_text()  # the first keyword recall built it

    with memspace_serve(serve_args(data), tmp_path / "second.log") as process:
        assert await keyword_ids(process.address, "durable") == set(kept)
        async with grpc.aio.insecure_channel(process.address) as channel:
            m = pb_grpc.MemoryServiceStub(channel)
            # Acknowledged after the last keyword commit: only the WAL has them when killed.
            late = [
                (await m.Remember(pb.RememberRequest(memory=memory(f"durable late{i}", 1.0)))).id
                for i in range(5)
            ]
            assert (await m.Forget(pb.ForgetRequest(id=kept.pop()))).forgotten
        process.popen.send_signal(signal.SIGKILL)
        process.popen.wait()
    assert REBUILT not in (tmp_path / "second.log").read_text()  # a clean restart reused it

    with memspace_serve(serve_args(data), tmp_path / "third.log") as process:
        assert await keyword_ids(process.address, "durable") == set(kept) | set(late)
        assert await keyword_ids(process.address, "late3") == {late[3]}
        await asyncio.sleep(0)
    assert REBUILT in (tmp_path / "third.log").read_text()  # the crash left it behind: rebuilt
