"""The registry: concurrent creation, lazy loading, idle unload, discovery and isolation."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from memspace_contract import spaces
from memspace_server import errors
from memspace_server.storage import memories, registry, settings

from .conftest import DIM, draft, make_space, vec


def _open_files_under(root: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(root)):
            found.append(target)
    for line in Path("/proc/self/maps").read_text().splitlines():
        if str(root) in line:
            found.append(line.split()[-1])
    return found


async def test_twenty_distinct_spaces_are_created_concurrently(
    spaces_registry: registry.Registry,
) -> None:
    names = [spaces.SpaceId(f"space-{i:02d}") for i in range(20)]
    results = await asyncio.gather(*(spaces_registry.create(n, DIM) for n in names))
    assert all(created for _, created in results)
    assert sorted(spaces_registry.entries()) == names
    rng = np.random.default_rng(0)

    async def fill(name: spaces.SpaceId) -> None:
        async with spaces_registry.lease(name) as space:
            await space.remember(draft(rng, name, id="same-id"))

    await asyncio.gather(*(fill(n) for n in names))
    for name in names:
        async with spaces_registry.lease(name) as space:
            assert (await space.get("same-id")).content == name
            assert space.count() == 1


async def test_twenty_concurrent_creations_of_one_space_make_one_space(
    spaces_registry: registry.Registry,
) -> None:
    name = spaces.SpaceId("shared")
    results = await asyncio.gather(*(spaces_registry.create(name, DIM) for _ in range(20)))
    assert sum(created for _, created in results) == 1
    assert list(spaces_registry.entries()) == [name]
    loaded = await asyncio.gather(*(spaces_registry.load(name) for _ in range(20)))
    assert len({id(s) for s in loaded}) == 1
    with pytest.raises(errors.SpaceConflictError, match="embedding_dim 16"):
        await spaces_registry.create(name, DIM * 2)


async def test_creations_from_several_threads_are_safe(tmp_path: Path) -> None:
    reg = registry.standalone(tmp_path)
    loop = asyncio.get_running_loop()

    callers: set[int] = set()

    def create_from_thread(i: int) -> bool:
        callers.add(threading.get_ident())
        future = asyncio.run_coroutine_threadsafe(
            reg.create(spaces.SpaceId(f"t-{i % 5}"), DIM), loop
        )
        return future.result(timeout=30)[1]

    outcomes = await asyncio.gather(*(asyncio.to_thread(create_from_thread, i) for i in range(20)))
    assert sum(outcomes) == 5
    # The calls really came from other threads than the loop's.
    assert callers
    assert threading.get_ident() not in callers
    names = [spaces.SpaceId(f"t-{i}") for i in range(5)]
    assert sorted(reg.entries()) == names
    for name in names:
        assert (reg.volume(name) / "space.json").is_file()
    # What was created survives a restart: the index on disk holds exactly those five.
    await reg.close()
    again = registry.standalone(tmp_path)
    try:
        assert sorted(again.entries()) == names
    finally:
        await again.close()


async def test_discovery_lists_spaces_without_loading_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    first = registry.standalone(tmp_path)
    for name in ("one", "two", "three"):
        space_id = await make_space(first, name)
        async with first.lease(space_id) as space:
            await space.remember(draft(rng, name))
    await first.close()
    second = registry.standalone(tmp_path)
    try:
        assert sorted(second.entries()) == ["one", "three", "two"]
        assert second.loaded() == {}
        health = await second.health()
        assert [h.memories for h in health] == [1, 1, 1]
        assert second.loaded() == {}
        assert _open_files_under(tmp_path) == []
        async with second.lease(spaces.SpaceId("two")) as space:
            hits = await space.recall(memories.Query(cue=vec(rng), k=5))
            assert [h.memory.content for h in hits] == ["two"]
    finally:
        await second.close()


async def test_an_idle_space_is_unloaded_and_holds_no_files(tmp_path: Path) -> None:
    reg = registry.standalone(tmp_path, settings.EngineSettings(chunk_rows=16), idle_unload_s=0.0)
    rng = np.random.default_rng(2)
    try:
        space_id = await make_space(reg, hot=10)
        async with reg.lease(space_id) as space:
            for _ in range(50):
                await space.remember(draft(rng))
            await space.consolidate()
            assert _open_files_under(tmp_path)
            await reg.maintain()
            assert space_id in reg.loaded(), "a leased space is never unloaded"
        await reg.maintain()
        assert reg.loaded() == {}
        assert _open_files_under(tmp_path) == []
        async with reg.lease(space_id) as space:
            assert space.count() == 50
    finally:
        await reg.close()


async def test_an_inactive_or_unknown_space_is_refused(spaces_registry: registry.Registry) -> None:
    with pytest.raises(errors.SpaceNotFoundError):
        await spaces_registry.load(spaces.SpaceId("nobody"))
    space_id = await make_space(spaces_registry)
    entry = spaces_registry.entries()[space_id]
    spaces_registry.catalog.put(dataclasses.replace(entry, state="Inactive"))
    with pytest.raises(errors.SpaceInactiveError, match="Active"):
        await spaces_registry.load(space_id)


async def test_two_spaces_never_see_each_others_memories_events_metrics_or_files(
    spaces_registry: registry.Registry,
) -> None:
    rng = np.random.default_rng(3)
    alpha = await make_space(spaces_registry, "alpha", hot=5, warm=5)
    beta = await make_space(spaces_registry, "beta", hot=5, warm=5)
    async with spaces_registry.lease(alpha) as a, spaces_registry.lease(beta) as b:
        beta_events = await b.subscribe(0)
        seen: list[object] = []

        async def watch() -> None:
            async for event in beta_events:
                seen.append(event)

        watcher = asyncio.ensure_future(watch())
        shared = vec(rng)
        alpha_ids = []
        for i in range(30):
            memory_id, _ = await a.remember(
                memories.Draft(
                    content=f"alpha {i}",
                    embedding=(shared + i * 0.01).astype(np.float32),
                    id=f"id-{i}",
                )
            )
            alpha_ids.append(memory_id)
        await a.consolidate()
        await b.remember(memories.Draft(content="beta 0", embedding=shared, id="id-0"))
        hits = await b.recall(memories.Query(cue=shared, k=100))
        assert [h.memory.content for h in hits] == ["beta 0"]
        assert (await b.get("id-0")).content == "beta 0"
        with pytest.raises(errors.MemoryNotFoundError):
            await b.get("id-5")
        assert await b.forget("id-7") == (False, 0)
        assert (await a.get("id-7")).content == "alpha 7"
        assert b.health().memories == 1
        assert a.health().memories == 30
        for _ in range(3000):  # 30 s at least for beta's event to reach its subscriber
            if seen:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # and any event of alpha that would follow it
        watcher.cancel()
        assert [e.id for e in seen] == ["id-0"]  # type: ignore[attr-defined]
    alpha_files = {p.name for p in spaces_registry.volume(alpha).rglob("*")}
    beta_dir = spaces_registry.volume(beta)
    assert all(alpha not in p.read_text(errors="ignore") for p in beta_dir.rglob("*.json"))
    assert alpha_files


async def test_a_deleted_space_leaves_nothing_behind(spaces_registry: registry.Registry) -> None:
    space_id = await make_space(spaces_registry, "doomed")
    async with spaces_registry.lease(space_id) as space:
        await space.remember(draft(np.random.default_rng(4)))
    assert await spaces_registry.delete(space_id)
    assert not spaces_registry.volume(space_id).exists()
    assert space_id not in spaces_registry.entries()
    assert not await spaces_registry.delete(space_id)
