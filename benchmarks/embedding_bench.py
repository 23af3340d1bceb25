"""Server-side embedding benchmarks (the packaged model, wordllama-l2-256), each figure beside
its baseline in the same run:

- `embed_per_s`: texts embedded per second by the model in-process, batches of 64 sentences of
  12-20 words, two batches at once on two threads (the 2 cores of this machine);
  `embed_per_s_one_thread` the same on one thread (the server's default
  --embedding-threads 1), and `embed_threads_speedup` the ratio of the two.
- `remember_text_vs_vector`: Remember calls per second with text only (the server embeds it)
  over Remember calls with the same text and its ready vector, against one `memspace serve`
  process, 8 callers, rounds interleaved ABAB, the median of the per-round ratios. Reported,
  not bounded: it says what server-side embedding costs a writer. `remember_batch_text_vs_vector`
  the same for RememberBatch streams of 64 memories.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.grpc_bench import closed_loop, memspace_serve, running
from memspace_contract import models
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc
from memspace_server import embedding

BATCH = 64
MODEL = models.MODELS[models.DEFAULT_MODEL]
_TEXT = (
    "the a user said they like prefer hiking mountains lake weekend meeting moved thursday "
    "afternoon dentist revenue grew quarter percent coffee tea morning deployment failed "
    "database migration timed out cat sleeps warm window every day project deadline friday "
    "report budget approved team lunch office remote work travel flight booked hotel paris "
    "birthday party sister gift book novel reading evening music concert ticket price"
)
WORDS = tuple(_TEXT.split())


def sentences(count: int, seed: int = 3) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        " ".join(rng.choice(WORDS, size=int(rng.integers(12, 21)))).capitalize() + "."
        for _ in range(count)
    ]


def _embed_rate(
    model: embedding.StaticModel, texts: Sequence[str], threads: int, s: float
) -> float:
    """Texts a second, `threads` batches of BATCH at once, for about `s` seconds."""
    batches = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(model.embed, batches[:threads]))  # warm
        done = 0
        started = time.perf_counter()
        while time.perf_counter() - started < s:
            for found in pool.map(model.embed, batches):
                done += len(found)
        return done / (time.perf_counter() - started)


def _embed_per_s(results: dict[str, object], quick: bool) -> None:
    model = embedding.load(MODEL)
    texts = sentences(BATCH * 16)
    seconds = 1.0 if quick else 4.0
    one = _embed_rate(model, texts, 1, seconds)
    two = _embed_rate(model, texts, 2, seconds)
    results["embed_per_s"] = round(two)
    results["embed_per_s_one_thread"] = round(one)
    results["embed_threads_speedup"] = round(two / one, 2)
    print(f"   embed: {two:.0f}/s on 2 threads, {one:.0f}/s on 1 (batches of {BATCH})")


async def _remember_text_vs_vector(results: dict[str, object], quick: bool, tmp: Path) -> None:
    texts = sentences(4096, seed=5)
    vectors = embedding.load(MODEL).embed(texts)
    rounds = 2 if quick else 4
    seconds = 1.0 if quick else 3.0
    process = memspace_serve(tmp / "data", tmp / "serve.log")
    with running(process):
        async with grpc.aio.insecure_channel(process.address) as channel:
            spaces = pb_grpc.SpaceServiceStub(channel)
            stub = pb_grpc.MemoryServiceStub(channel)
            await spaces.CreateSpace(
                pb.CreateSpaceRequest(space="bench", embedding_model=MODEL.name)
            )
            metadata = (("x-memory-space", "bench"),)
            counter = iter(range(10**9))

            def one(with_vector: bool) -> Callable[[], Awaitable[object]]:
                def call() -> Awaitable[object]:
                    i = next(counter) % len(texts)
                    memory = pb.Memory(content=texts[i])
                    if with_vector:
                        memory.embedding.extend(vectors[i].tolist())
                    return stub.Remember(pb.RememberRequest(memory=memory), metadata=metadata)

                return call

            def batch(with_vector: bool) -> Callable[[], Awaitable[object]]:
                async def requests() -> AsyncIterator[pb.RememberRequest]:
                    start = next(counter) * BATCH % (len(texts) - BATCH)
                    for i in range(start, start + BATCH):
                        memory = pb.Memory(content=texts[i])
                        if with_vector:
                            memory.embedding.extend(vectors[i].tolist())
                        yield pb.RememberRequest(memory=memory)

                def call() -> Awaitable[object]:
                    return stub.RememberBatch(requests(), metadata=metadata)

                return call

            for name, make, callers in (
                ("remember_text_vs_vector", one, 8),
                ("remember_batch_text_vs_vector", batch, 2),
            ):
                ratios = []
                rates: dict[bool, list[float]] = {True: [], False: []}
                await closed_loop(make(False), callers, 0.5)  # warm: loads the model
                for _ in range(rounds):
                    text_rate, _ = await closed_loop(make(False), callers, seconds)
                    vector_rate, _ = await closed_loop(make(True), callers, seconds)
                    rates[False].append(text_rate)
                    rates[True].append(vector_rate)
                    ratios.append(text_rate / vector_rate)
                results[name] = round(statistics.median(ratios), 3)
                unit = "calls" if make is one else "streams of 64"
                print(
                    f"   {name}: {statistics.median(rates[False]):.0f} {unit}/s with text, "
                    f"{statistics.median(rates[True]):.0f} with vectors, ratio "
                    f"{results[name]}"
                )


def run(results: dict[str, Any], quick: bool = False) -> None:
    _embed_per_s(results, quick)
    with tempfile.TemporaryDirectory(prefix="memspace-embed-bench-") as tmp:
        asyncio.run(_remember_text_vs_vector(results, quick, Path(tmp)))
