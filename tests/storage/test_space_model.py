"""A model-based test of a space: random remembers, forgets, consolidations and crashes (a torn
or zero-filled WAL tail, a consolidation cut off before its manifest), each followed by a
reopen from disk, compared with an in-memory model. Nothing acknowledged may be lost and
nothing forgotten may come back."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from memspace_contract import index, spaces
from memspace_server import errors
from memspace_server.storage import memories, registry, wal
from memspace_server.storage import settings as engine

DIM = 8
SPACE = spaces.SpaceId("model")
IDS = st.sampled_from([f"id-{i}" for i in range(12)])


class SpaceModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.root = Path(tempfile.mkdtemp(prefix="memspace-model-"))
        self.model: dict[str, tuple[str, bytes]] = {}
        self.counter = 0
        self.registry = self._open_registry()

    def _open_registry(self) -> registry.Registry:
        return registry.standalone(
            self.root, engine.EngineSettings(chunk_rows=4, wal_segment_bytes=1024)
        )

    def run(self, coroutine: object) -> object:
        return self.loop.run_until_complete(coroutine)  # type: ignore[arg-type]

    @initialize()
    def create(self) -> None:
        self.run(
            self.registry.create(
                SPACE, DIM, tiers_config=index.Tiers(hot_capacity=4, warm_capacity=6)
            )
        )

    async def _space_call(self, method: str, *args: object) -> object:
        async with self.registry.lease(SPACE) as space:
            return await getattr(space, method)(*args)

    @rule(memory_id=IDS, seed=st.integers(0, 2**16))
    def remember(self, memory_id: str, seed: int) -> None:
        embedding = np.random.default_rng(seed).normal(size=DIM).astype(np.float32) + 0.01
        self.counter += 1
        content = f"v{self.counter}"
        draft = memories.Draft(content=content, embedding=embedding, id=memory_id)
        self.run(self._space_call("remember", draft))
        self.model[memory_id] = (content, embedding.tobytes())

    @rule(memory_id=IDS)
    def forget(self, memory_id: str) -> None:
        outcome = self.run(self._space_call("forget", memory_id))
        assert isinstance(outcome, tuple)
        forgotten = outcome[0]
        assert forgotten == (memory_id in self.model)
        self.model.pop(memory_id, None)

    @rule()
    def consolidate(self) -> None:
        self.run(self._space_call("consolidate"))

    def _crash(self) -> Path:
        """Stop without consolidating, as a killed process would; return the space's WAL dir."""
        space = self.registry.loaded().get(SPACE)
        if space is not None:
            self.run(space.close(consolidate=False))
        self.run(self.registry.close())
        return self.root / "spaces" / SPACE / "wal"

    def _reopen(self) -> None:
        self.registry = self._open_registry()

    @rule(garbage=st.binary(min_size=1, max_size=40), zeros=st.booleans())
    def crash_with_a_torn_tail(self, garbage: bytes, zeros: bool) -> None:
        wal_dir = self._crash()
        segments = wal.list_segments(wal_dir)
        if segments:
            with segments[-1][1].open("ab") as out:
                out.write(bytes(len(garbage)) if zeros else b"\x30\x00\x00\x00" + garbage)
        self._reopen()

    @precondition(lambda self: bool(self.model))
    @rule()
    def crash_during_consolidation(self) -> None:
        """A consolidation that wrote its files but died before switching the manifest."""
        self._crash()
        hot = self.root / "spaces" / SPACE / "hot"
        (hot / ".checkpoint.json.tmp").write_text('{"format": 1, "seq": ')
        (hot / "run-99999999.npz").write_bytes(b"partial")
        self._reopen()

    @rule()
    def clean_restart(self) -> None:
        self.run(self.registry.close())
        self._reopen()

    @invariant()
    def every_acknowledged_memory_is_there_and_nothing_else(self) -> None:
        async def check() -> None:
            async with self.registry.lease(SPACE) as space:
                assert space.count() == len(self.model)
                for memory_id, (content, embedding) in self.model.items():
                    memory = await space.get(memory_id)
                    assert memory.content == content
                    assert memory.embedding.tobytes() == embedding
                for memory_id in {f"id-{i}" for i in range(12)} - set(self.model):
                    try:
                        await space.get(memory_id)
                    except errors.MemoryNotFoundError:
                        continue
                    raise AssertionError(f"{memory_id} came back")

        self.run(check())

    def teardown(self) -> None:
        try:
            self.run(self.registry.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.root, ignore_errors=True)


SpaceModel.TestCase.settings = settings(
    max_examples=200 if os.environ.get("MEMSPACE_SOAK") else 12,
    stateful_step_count=30 if os.environ.get("MEMSPACE_SOAK") else 20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_space_model = SpaceModel.TestCase
