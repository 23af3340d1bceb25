"""Text to vectors on the server: the embedding models of `memspace_contract.models`, loaded from
the packages installed with the server (never downloaded), and the bounded, fair admission of
the work to them. Nothing here knows gRPC or the storage engine.

Embedding is CPU work (a tokenizer in Rust, numpy): it runs on `threads` threads of its own,
never on the event loop, one batch of at most `batch` texts a thread at a time. While every
thread is busy, further batches wait in the queue of their space, and a thread that comes free
takes the next batch of the next space in turn (round robin): a space that sends a hundred
batches gets no more of the threads than one that sends a single one, which starts after at
most one batch of each other waiting space.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.metadata
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from memspace_contract import models
from memspace_server import errors, importing, queueing

if TYPE_CHECKING:
    import tokenizers
    from safetensors import numpy as safetensors_numpy
else:
    # By the first model loaded (a space with a model), not at the start.
    tokenizers = importing.lazy("tokenizers")
    safetensors_numpy = importing.lazy("safetensors.numpy")

log = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]

MAX_TOKENS = 512
"""Tokens of a text that count toward its vector (a mean of token vectors: more add little
meaning and only cost time; a 64 KiB content is cut there)."""


class StaticModel:
    """A static embedding model: a vector per token, a text's vector the mean of its tokens'
    vectors, scaled to unit length. Thread-safe (the tokenizer and the matrix are read only)."""

    def __init__(
        self, model: models.Model, vectors: Vectors, tokenizer: tokenizers.Tokenizer
    ) -> None:
        if vectors.ndim != 2 or vectors.shape[1] != model.dim:
            raise ValueError(
                f"{model.name}: weights of shape {vectors.shape}, not (*, {model.dim})"
            )
        self.model = model
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.tokenizer = tokenizer
        tokenizer.no_padding()
        tokenizer.enable_truncation(MAX_TOKENS)

    @property
    def dim(self) -> int:
        return self.model.dim

    def embed(self, texts: Sequence[str]) -> Vectors:
        """One unit vector a text, as rows of an (n, dim) float32 matrix. A text without a single
        token (only white space) is refused: it has no meaning to search by."""
        # encode_batch releases the GIL (so embedding threads run on cores of their own) and,
        # with TOKENIZERS_PARALLELISM off (`load`), stays on its calling thread.
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
        if lengths.size and lengths.min() == 0:
            empty = int(np.argmin(lengths))
            raise errors.InvalidMemoryError(
                f"text {empty} of the batch has no words to embed ({texts[empty][:40]!r}): send "
                "text with words, or the embedding itself"
            )
        total = int(lengths.sum())
        ids = np.fromiter((i for e in encodings for i in e.ids), np.int64, total)
        np.clip(ids, 0, self.vectors.shape[0] - 1, out=ids)
        starts = np.zeros(len(encodings), np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        sums = np.add.reduceat(self.vectors[ids], starts, axis=0)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        # A text whose token vectors cancel out exactly: vanishingly rare, refused by the
        # engine's zero-vector check rather than divided by zero here.
        np.divide(sums, norms, out=sums, where=norms > 0)
        return sums


def _package_dir(distribution: str, *parts: str) -> Path:
    """A path inside an installed distribution, found without importing it (importing wordllama
    configures the root logger)."""
    try:
        found = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise errors.FailedPreconditionError(
            f"the package {distribution!r} of this embedding model is not installed on the server"
        ) from err
    return Path(str(found.locate_file(Path(*parts))))


def load(model: models.Model) -> StaticModel:
    """Load a model of the table from its installed package (blocking: about 0.3 s)."""
    # The tokenizer's own thread pool would spread each batch over every core of the machine,
    # past the threads the server gives embedding (--embedding-threads): one core a batch.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if model.name != models.WORDLLAMA_L2_256.name:
        raise errors.FailedPreconditionError(f"no loader for embedding model {model.name!r}")
    root = _package_dir(model.package, "wordllama")
    weights = safetensors_numpy.load_file(str(root / "weights" / "l2_supercat_256.safetensors"))
    tokenizer = tokenizers.Tokenizer.from_file(
        str(root / "tokenizers" / "l2_supercat_tokenizer_config.json")
    )
    return StaticModel(model, weights["embedding.weight"], tokenizer)


class Turns(queueing.FairQueue):
    """At most `threads` batches at work; the ones beyond wait per space and start in round
    robin over the spaces (event loop only: no locking)."""

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError("embedding needs at least one thread")
        super().__init__(per_space=threads, total=threads)

    @property
    def free(self) -> int:
        return int(self.total) - self.working

    async def enter(self, space: str) -> None:
        """Return once the batch may start; `leave(space)` exactly once after that."""
        await self.acquire(space)

    def leave(self, space: str) -> None:
        """A batch finished: its thread goes to the oldest waiting batch of the next space."""
        self.release(space)


class Embedder:
    """The server's embedding: the models it offers, loaded once on first use, and the threads
    that run them under fair `Turns`."""

    def __init__(self, offered: Sequence[str], threads: int, batch: int) -> None:
        self.offered = tuple(offered)
        self.batch = batch
        self.turns = Turns(threads)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="memspace-embed"
        )
        self._loaded: dict[str, StaticModel] = {}
        self._loading = asyncio.Lock()

    def model(self, name: str) -> models.Model:
        """The offered model called `name` (InvalidArgumentError naming the offered ones)."""
        try:
            return models.lookup(name, self.offered)
        except models.UnknownModelError as err:
            raise errors.InvalidArgumentError(str(err)) from err

    async def _load(self, name: str) -> StaticModel:
        found = self._loaded.get(name)
        if found is not None:
            return found
        if name not in self.offered:
            raise errors.FailedPreconditionError(
                f"this server does not offer embedding model {name!r} (offered: "
                f"{', '.join(self.offered) or 'none'}); ask the platform admin to add it to the "
                "chart's server.embedding.models"
            )
        async with self._loading:
            found = self._loaded.get(name)
            if found is None:
                loop = asyncio.get_running_loop()
                found = await loop.run_in_executor(self._executor, load, models.MODELS[name])
                self._loaded[name] = found
                log.info("embedding model %s loaded", name)
        return found

    async def embed(self, space: str, name: str, texts: Sequence[str]) -> Vectors:
        """The unit vectors of `texts` by model `name`, in batches of at most `batch`, each
        taking its turn among the spaces."""
        model = await self._load(name)
        loop = asyncio.get_running_loop()
        parts = []
        for start in range(0, len(texts), self.batch):
            chunk = texts[start : start + self.batch]
            await self.turns.enter(space)
            try:
                parts.append(await loop.run_in_executor(self._executor, model.embed, chunk))
            finally:
                self.turns.leave(space)
        if not parts:
            return np.zeros((0, model.dim), dtype=np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
