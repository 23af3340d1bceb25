"""The floor of a Recall and a Remember over gRPC in Python: a bare grpc.aio server answering
memspace's `Recall` and `Remember` with only the steps no implementation of them can skip,
measured beside the echo server and `memspace serve` (`grpc_bench`).

- Recall: the cue from the wire into a float32 vector, checked (length, finite, not zero); one
  product over 1,000 x 64 stored rows, the top k, and a RecallResponse of k hits (id, content,
  score, tier, confidence, time), as memspace answers the benchmark's Recall.
- Remember: the embedding checked the same way, an id of 128 random bits, the record (id,
  content, embedding) framed with a CRC32C and appended to one file by a writer thread, which
  fdatasyncs each group of records queued while it wrote (group commit), then acknowledged.

Nothing else: no tenant (one space, no routing, no auth, no quota, no metrics), no index of
ids, no tiers, no replay. Whatever `memspace serve` does per call beyond this floor is its own
cost; what the floor costs beyond the echo server is Python's, gRPC's and the disk's, which
no code of memspace can remove. `python -m benchmarks.grpc_floor DIRECTORY` serves until it
is killed (and prints its address as the echo server does).
"""

from __future__ import annotations

import asyncio
import math
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

import crc32c
import grpc
import numpy as np

from benchmarks import write_floor
from memspace_contract.v1 import memspace_pb2 as pb

SERVICE = "memspace.v1.MemoryService"
ROWS = 1_000
DIM = 64
RECORD = struct.Struct("<IIHI")
"""crc32c, length, id length, content length; then the id, the content and the embedding."""


def _vector(values: object, dim: int) -> np.ndarray:
    vector = np.array(values, np.float32)
    square = float(vector @ vector) if vector.shape == (dim,) else 0.0
    if square == 0.0 or not math.isfinite(square):
        raise ValueError(f"an embedding of {dim} finite values, not all zero")
    return vector


class Floor:
    def __init__(self, directory: Path) -> None:
        rng = np.random.default_rng(7)
        self.matrix = rng.standard_normal((ROWS, DIM)).astype(np.float32)
        self.norms = np.sqrt(np.einsum("ij,ij->i", self.matrix, self.matrix))
        self.ids = [os.urandom(16).hex() for _ in range(ROWS)]
        self.contents = [f"memory {row}" for row in range(ROWS)]
        self.created = time.time()
        self.directory = directory
        self.log: write_floor.GroupCommit | None = None
        self.lsn = 0
        self.write_dims: dict[str, int] = {}

    async def recall(
        self, request: pb.RecallRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RecallResponse:
        try:
            cue = _vector(request.cue, DIM)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        k = min(request.k or 10, ROWS)
        scores = (self.matrix @ cue) / (self.norms * math.sqrt(float(cue @ cue)))
        top = np.argpartition(scores, ROWS - k)[ROWS - k :]
        top = top[np.argsort(-scores[top])]
        response = pb.RecallResponse()
        add = response.hits.add
        seconds, nanos = divmod(round(self.created * 1e9), 1_000_000_000)
        for row, score in zip(top.tolist(), scores[top].tolist(), strict=True):
            hit = add(score=score, tier="hot")
            memory = hit.memory
            memory.id = self.ids[row]
            memory.content = self.contents[row]
            memory.confidence = 1.0
            memory.created_at.seconds, memory.created_at.nanos = seconds, nanos
        return response

    async def remember(
        self, request: pb.RememberRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RememberResponse:
        if self.log is None:
            self.log = write_floor.GroupCommit(self.directory / "floor.log")
        try:
            # The space written to takes the size of its first embedding (memspace's
            # benchmark writes 64 and 384 values to different spaces; the floor has one).
            dim = self.write_dims.setdefault(request.space, len(request.memory.embedding))
            embedding = _vector(request.memory.embedding, dim)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        memory_id = os.urandom(16).hex().encode()
        content = request.memory.content.encode()
        body = b"".join((memory_id, content, embedding.tobytes()))
        head = RECORD.pack(crc32c.crc32c(body), len(body), len(memory_id), len(content))
        self.lsn += 1
        lsn = self.lsn
        await self.log.append([head, body])
        return pb.RememberResponse(id=memory_id.decode(), lsn=lsn)


async def serve(directory: Path) -> None:
    floor = Floor(directory)
    server = grpc.aio.server()
    handlers = {
        "Recall": grpc.unary_unary_rpc_method_handler(
            floor.recall,
            request_deserializer=pb.RecallRequest.FromString,
            response_serializer=pb.RecallResponse.SerializeToString,
        ),
        "Remember": grpc.unary_unary_rpc_method_handler(
            floor.remember,
            request_deserializer=pb.RememberRequest.FromString,
            response_serializer=pb.RememberResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"serving on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    asyncio.run(serve(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
