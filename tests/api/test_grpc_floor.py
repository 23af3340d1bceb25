"""The floor server of the gRPC benchmark (`benchmarks/grpc_floor.py`) answers what memspace
answers: a figure measured against it means something only if its Recall ranks by cosine and
its Remember is durable. Run as the benchmark runs it, a subprocess over a real socket."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import crc32c
import grpc
import numpy as np
import pytest

from benchmarks import grpc_bench, grpc_floor
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc


@pytest.fixture
async def floor(tmp_path: Path) -> AsyncIterator[tuple[pb_grpc.MemoryServiceAsyncStub, Path]]:
    process = grpc_bench.Process(
        [sys.executable, "-m", "benchmarks.grpc_floor", str(tmp_path)],
        tmp_path / "floor.out",
    )
    with grpc_bench.running(process):
        async with grpc.aio.insecure_channel(process.address) as channel:
            yield pb_grpc.MemoryServiceStub(channel), tmp_path


async def test_recall_ranks_the_stored_rows_by_cosine(
    floor: tuple[pb_grpc.MemoryServiceAsyncStub, Path], tmp_path: Path
) -> None:
    stub, _ = floor
    # The same rows as the server's (a fixed seed), made here to know the answer.
    matrix = grpc_floor.Floor(tmp_path).matrix
    cue = matrix[123] + 0.01 * matrix[7]
    answer = await stub.Recall(pb.RecallRequest(space="any", cue=cue.tolist(), k=5))
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    expected = np.argsort(-(unit @ (cue / np.linalg.norm(cue))))[:5]
    assert [hit.memory.content for hit in answer.hits] == [f"memory {r}" for r in expected]
    assert answer.hits[0].memory.content == "memory 123"
    assert answer.hits[0].score == pytest.approx(1.0, abs=1e-3)
    scores = [hit.score for hit in answer.hits]
    assert scores == sorted(scores, reverse=True)


async def test_a_bad_cue_is_refused(floor: tuple[pb_grpc.MemoryServiceAsyncStub, Path]) -> None:
    stub, _ = floor
    for cue in ([0.0] * grpc_floor.DIM, [1.0] * 3, [float("nan")] * grpc_floor.DIM):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Recall(pb.RecallRequest(space="any", cue=cue, k=5))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_remember_acknowledges_a_record_on_disk(
    floor: tuple[pb_grpc.MemoryServiceAsyncStub, Path],
) -> None:
    stub, directory = floor
    embedding = np.arange(1, grpc_floor.DIM + 1, dtype=np.float32)
    answers = [
        await stub.Remember(
            pb.RememberRequest(
                space="any", memory=pb.Memory(content=f"note {n}", embedding=embedding.tolist())
            )
        )
        for n in range(3)
    ]
    assert [a.lsn for a in answers] == [1, 2, 3]
    data = (directory / "floor.log").read_bytes()
    offset, seen = 0, []
    while offset < len(data):
        crc, length, id_length, content_length = grpc_floor.RECORD.unpack_from(data, offset)
        body = data[offset + grpc_floor.RECORD.size : offset + grpc_floor.RECORD.size + length]
        assert crc32c.crc32c(body) == crc
        memory_id = body[:id_length].decode()
        content = body[id_length : id_length + content_length].decode()
        vector = np.frombuffer(body[id_length + content_length :], np.float32)
        assert np.array_equal(vector, embedding)
        seen.append((memory_id, content))
        offset += grpc_floor.RECORD.size + length
    assert seen == [(a.id, f"note {n}") for n, a in enumerate(answers)]
