"""Disk and volume faults against a real `memspace serve`: each gives a clear outcome, recovered
(every acknowledged write there) or refused (FAILED_PRECONDITION naming what is wrong, Health
`Failed`, the other spaces served, the damaged files left as they were), never a silent loss or
a server that will not start.

- the volume fills up mid-write (a real 3 MiB tmpfs): RESOURCE_EXHAUSTED, nothing acknowledged
  lost, writes resume once there is room;
- fdatasync fails with ENOSPC (injected): RESOURCE_EXHAUSTED, the unsynced record cut, nothing
  else lost;
- a partial frame or zeros after the last record: recovered, nothing lost;
- the last record cut short or bit-flipped: recovered without that record, with a warning
  naming the segment (it cannot be told from a torn append);
- a record bit-flipped, a length field flipped, or bytes cut out before the tail: refused;
- a segment that is not the last cut short, or missing: refused;
- `hot/checkpoint.json`, a file it names, or all of `hot/` deleted: refused (records missing);
- a garbled `hot/checkpoint.json`: refused (unreadable);
- the warm tier's Zarr group deleted: refused (the tier is missing);
- another space's `space.json` in the volume, or none: refused;
- a garbled index entry: the server starts, logs the file and serves the other spaces.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from memspace_contract import spaces
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_server import errors
from memspace_server.storage import memories, registry, settings
from tests.reliability.conftest import (
    CALL_TIMEOUT_S,
    DIM,
    ServerProcess,
    Servers,
    Stubs,
    Tmpfs,
    code_of,
    error_of,
    md,
    unit,
)

SPACES = ("alpha", "beta")
MAGIC_BYTES = 8
FRAME = struct.Struct("<II")


# -- helpers ------------------------------------------------------------------------------------


def volume(root: Path, space: str) -> Path:
    return root / "spaces" / space


def segments(root: Path, space: str) -> list[Path]:
    return sorted((volume(root, space) / "wal").glob("*.wal"))


def frames(path: Path) -> list[tuple[int, int]]:
    """(offset, total length) of every frame of a WAL segment, read independently of the server:
    an 8-byte magic, then length:u32 crc32c:u32 payload."""
    data = path.read_bytes()
    found = []
    pos = MAGIC_BYTES
    while pos + FRAME.size <= len(data):
        length, _crc = FRAME.unpack_from(data, pos)
        found.append((pos, FRAME.size + length))
        pos += FRAME.size + length
    assert pos == len(data), f"{path} does not end on a frame boundary"
    return found


async def write(stubs: Stubs, space: str, ids: list[str], rng: np.random.Generator) -> None:
    for memory_id in ids:
        await stubs.memories.Remember(
            pb.RememberRequest(
                memory=pb.Memory(
                    id=memory_id, content=f"content of {memory_id}", embedding=unit(rng)
                )
            ),
            metadata=md(space),
            timeout=CALL_TIMEOUT_S,
        )


async def populate(
    servers: Servers,
    root: Path,
    consolidate: bool,
    after: int = 10,
    tiers: pb.SpaceTiers | None = None,
) -> tuple[ServerProcess, dict[str, list[str]]]:
    """A killed server whose spaces alpha and beta hold 20 memories each (consolidated into a
    checkpoint when `consolidate`), then `after` more in the WAL only."""
    server = servers(root)
    await server.start()
    rng = np.random.default_rng(1)
    written: dict[str, list[str]] = {}
    stubs = Stubs(server.address)
    try:
        for space in SPACES:
            await stubs.spaces.CreateSpace(
                pb.CreateSpaceRequest(space=space, embedding_dim=DIM, tiers=tiers),
                timeout=CALL_TIMEOUT_S,
            )
            written[space] = [f"{space}-{n}" for n in range(20 + after)]
            await write(stubs, space, written[space][:20], rng)
            if consolidate:
                await stubs.memories.Consolidate(
                    pb.ConsolidateRequest(), metadata=md(space), timeout=CALL_TIMEOUT_S
                )
            await write(stubs, space, written[space][20:], rng)
    finally:
        await stubs.close()
    server.kill()
    return server, written


async def missing(stubs: Stubs, space: str, ids: list[str]) -> list[str]:
    """The ids of `ids` the space does not hold (it must answer, not fail)."""
    gone = []
    for memory_id in ids:
        code = await code_of(
            stubs.memories.Get(
                pb.GetRequest(id=memory_id), metadata=md(space), timeout=CALL_TIMEOUT_S
            )
        )
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND), (space, memory_id, code)
        if code is grpc.StatusCode.NOT_FOUND:
            gone.append(memory_id)
    return gone


async def state_of(stubs: Stubs, space: str) -> str:
    health = await stubs.spaces.Health(pb.HealthRequest(space=space), timeout=CALL_TIMEOUT_S)
    return health.spaces[0].state


async def assert_refused(
    server: ServerProcess, written: dict[str, list[str]], space: str, *words: str
) -> None:
    """The server runs; `space` is refused with a message holding `words` on every data RPC and
    in the log, its Health says Failed; the other space is served whole."""
    assert server.alive, server.log()
    stubs = Stubs(server.address)
    try:
        for call in (
            stubs.memories.Get(pb.GetRequest(id="x"), metadata=md(space), timeout=CALL_TIMEOUT_S),
            stubs.memories.Recall(
                pb.RecallRequest(cue=[1.0] * DIM, k=3), metadata=md(space), timeout=CALL_TIMEOUT_S
            ),
            stubs.memories.Remember(
                pb.RememberRequest(memory=pb.Memory(content="new", embedding=[1.0] * DIM)),
                metadata=md(space),
                timeout=CALL_TIMEOUT_S,
            ),
        ):
            err = await error_of(call)
            assert err.code() is grpc.StatusCode.FAILED_PRECONDITION, err
            for word in words:
                assert word in (err.details() or ""), (word, err.details())
        assert await state_of(stubs, space) == "Failed"
        others = [s for s in SPACES if s != space]
        for other in others:
            assert await missing(stubs, other, written[other]) == []
            assert await state_of(stubs, other) == "Active"
    finally:
        await stubs.close()
    assert f"space {space} refused" in server.log(), server.log()


async def restart_and_count_missing(
    server: ServerProcess, written: dict[str, list[str]]
) -> dict[str, list[str]]:
    await server.start()
    stubs = Stubs(server.address)
    try:
        return {space: await missing(stubs, space, ids) for space, ids in written.items()}
    finally:
        await stubs.close()


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


# -- a full disk ----------------------------------------------------------------------------------


def write_until_refused(fd: int) -> OSError:
    while True:
        try:
            os.write(fd, b"\0" * 4096)
        except OSError as err:
            return err


async def take_the_rest_of(mount: Path) -> Path:
    """Fill what is free on `mount` once its free space has not changed for a second."""
    last, still_since = -1, time.monotonic()
    deadline = time.monotonic() + 30
    while time.monotonic() - still_since < 1.0:
        free = os.statvfs(mount).f_bavail
        if free != last:
            last, still_since = free, time.monotonic()
        assert time.monotonic() < deadline, "the volume's free space never held still"
        await asyncio.sleep(0.1)
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        refusal = write_until_refused(fd)
    finally:
        os.close(fd)
    assert refusal.errno == errno.ENOSPC, refusal
    assert os.statvfs(mount).f_bavail == 0
    return filler


@pytest.mark.timeout(900)  # 85 s quiet, 205 s at load 17: thousands of writes, two restarts
async def test_a_full_volume_refuses_writes_clearly_and_loses_no_acknowledged_one(
    servers: Servers, tmpfs: Tmpfs
) -> None:
    mount = tmpfs("3m")
    ballast = mount / "ballast"
    ballast.write_bytes(os.urandom(384 * 1024))  # removed later to make room again
    root = mount / "data"
    server = servers(root)
    await server.start()
    stubs = Stubs(server.address)
    dim = 256
    await stubs.spaces.CreateSpace(
        pb.CreateSpaceRequest(
            space="full", embedding_dim=dim, tiers=pb.SpaceTiers(hot_capacity=300)
        ),
        timeout=CALL_TIMEOUT_S,
    )
    acked: list[str] = []
    refusals: list[tuple[grpc.StatusCode, str]] = []
    rng = np.random.default_rng(2)

    def full() -> int:
        return sum(code is grpc.StatusCode.RESOURCE_EXHAUSTED for code, _ in refusals)

    async def writer(name: str) -> None:
        for n in range(2000):
            memory_id = f"{name}-{n}"
            memory = pb.Memory(id=memory_id, content="x" * 1000, embedding=unit(rng, dim))
            try:
                await stubs.memories.Remember(
                    pb.RememberRequest(memory=memory), metadata=md("full"), timeout=CALL_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as err:
                refusals.append((err.code(), err.details() or ""))
                if full() >= 8:
                    return
            else:
                acked.append(memory_id)
        raise AssertionError("2000 writes each and the 3 MiB volume is still not full")

    await asyncio.gather(*(writer(f"w{n}") for n in range(6)))
    # A full volume, or the space reloading from disk after it: nothing else.
    for code, details in refusals:
        assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE), details
        assert code is not grpc.StatusCode.RESOURCE_EXHAUSTED or "full" in details, details
    assert full() >= 8
    assert len(acked) > 100
    # Reads go on; nothing acknowledged is missing while the volume is full.
    assert await missing(stubs, "full", acked) == []
    # Everything else that needs room says so too, never INTERNAL. The server frees room of its
    # own after refusals (a failed flush removes its partial generation), so the test takes what
    # is left once the volume's free space holds still, for as long as the create is tried.
    filler = await take_the_rest_of(mount)
    create = await error_of(
        stubs.spaces.CreateSpace(
            pb.CreateSpaceRequest(space="another", embedding_dim=dim), timeout=CALL_TIMEOUT_S
        )
    )
    filler.unlink()
    assert create.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, create
    consolidate = await code_of(
        stubs.memories.Consolidate(
            pb.ConsolidateRequest(), metadata=md("full"), timeout=CALL_TIMEOUT_S
        )
    )
    assert consolidate in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)
    await stubs.close()
    # A kill while full, and a restart on the full volume: everything is there.
    server.kill()
    assert await restart_and_count_missing(server, {"full": acked}) == {"full": []}
    # Room again: writes resume (after at most one retry while the space reloads).
    ballast.unlink()
    stubs = Stubs(server.address)
    more = [f"more-{n}" for n in range(20)]
    for memory_id in more:
        for _attempt in range(3):
            code = await code_of(
                stubs.memories.Remember(
                    pb.RememberRequest(
                        memory=pb.Memory(id=memory_id, content="y", embedding=unit(rng, dim))
                    ),
                    metadata=md("full"),
                    timeout=CALL_TIMEOUT_S,
                )
            )
            if code is grpc.StatusCode.OK:
                break
            assert code is grpc.StatusCode.UNAVAILABLE, code
        else:
            raise AssertionError(f"{memory_id} was not stored once there was room again")
    created = await stubs.spaces.CreateSpace(
        pb.CreateSpaceRequest(space="another", embedding_dim=dim), timeout=CALL_TIMEOUT_S
    )
    assert created.created
    await stubs.close()
    server.kill()
    assert await restart_and_count_missing(server, {"full": acked + more}) == {"full": []}
    assert "volume is full" in server.all_logs()


async def test_an_fsync_failing_with_enospc_cuts_the_unsynced_record_and_keeps_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC at fdatasync (thin-provisioned or network volumes report it there, after the
    write succeeded): the write is refused, the record cut from the log, and nothing else lost.
    Injected in process: no real filesystem fails fdatasync on demand."""
    engine = settings.EngineSettings()
    reg = registry.standalone(tmp_path / "data", engine)
    space_id = spaces.SpaceId("alpha")
    await reg.create(space_id, DIM)
    rng = np.random.default_rng(3)

    def draft(memory_id: str) -> memories.Draft:
        return memories.Draft(
            content=memory_id, embedding=np.array(unit(rng), np.float32), id=memory_id
        )

    real_fdatasync = os.fdatasync
    fail_next: list[bool] = []

    def fdatasync(fd: int) -> None:
        if fail_next:
            fail_next.clear()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    try:
        async with reg.lease(space_id) as space:
            for n in range(10):
                await space.remember(draft(f"kept-{n}"))
        fail_next.append(True)
        with pytest.raises(errors.DiskFullError, match="volume is full"):
            async with reg.lease(space_id) as space:
                await space.remember(draft("unsynced"))
        # The next request reloads the space from disk: exactly what was acknowledged.
        async with reg.lease(space_id) as space:
            assert space.count() == 10
            await space.remember(draft("after"))
            ids = {space.hot.get(f"kept-{n}") is not None for n in range(10)}
            assert ids == {True}
            assert space.hot.get("unsynced") is None
    finally:
        await reg.close()
    reopened = registry.standalone(tmp_path / "data", engine)
    try:
        async with reopened.lease(space_id) as space:
            assert space.count() == 11
            assert space.hot.get("unsynced") is None
    finally:
        await reopened.close()


# -- the WAL ---------------------------------------------------------------------------------------


def append_partial_frame(path: Path) -> None:
    with path.open("ab") as out:
        out.write(FRAME.pack(200, 12345) + b"partial")


def append_zeros(path: Path) -> None:
    with path.open("ab") as out:
        out.write(bytes(4096))


@pytest.mark.parametrize(
    "damage", [append_partial_frame, append_zeros], ids=["partial-frame", "zeros"]
)
async def test_a_torn_append_after_the_last_record_is_cut_and_nothing_is_lost(
    servers: Servers, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    root = tmp_path / "data"
    server, written = await populate(servers, root, consolidate=False)
    damage(segments(root, "alpha")[-1])
    assert await restart_and_count_missing(server, written) == {"alpha": [], "beta": []}
    assert "truncating a torn record" in server.log()


def cut_last_record(path: Path) -> None:
    offset, length = frames(path)[-1]
    os.truncate(path, offset + length // 2)


def flip_last_record(path: Path) -> None:
    offset, length = frames(path)[-1]
    flip(path, offset + length - 3)


@pytest.mark.parametrize(
    "damage", [cut_last_record, flip_last_record], ids=["cut-short", "bit-flip"]
)
async def test_a_damaged_last_record_is_cut_with_a_warning_and_the_rest_recovered(
    servers: Servers, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    """A damaged final record cannot be told from a torn append: it is cut, loudly."""
    root = tmp_path / "data"
    server, written = await populate(servers, root, consolidate=False)
    damage(segments(root, "alpha")[-1])
    gone = await restart_and_count_missing(server, written)
    assert gone == {"alpha": [written["alpha"][-1]], "beta": []}
    log = server.log()
    assert "truncating a torn record at the tail of WAL segment" in log
    assert "00000000000000000001.wal" in log


def flip_a_middle_record(path: Path) -> None:
    offset, length = frames(path)[len(frames(path)) // 2]
    flip(path, offset + FRAME.size + length // 2)


def cut_out_the_middle(path: Path) -> None:
    data = path.read_bytes()
    middle = frames(path)[len(frames(path)) // 2][0]
    path.write_bytes(data[:middle] + data[middle + 37 :])


def flip_a_length(path: Path) -> None:
    offset, _length = frames(path)[3]
    flip(path, offset + 1)


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (flip_a_middle_record, ("checksum mismatch", "before the tail")),
        (cut_out_the_middle, ("00000000000000000001.wal",)),
        (flip_a_length, ("00000000000000000001.wal",)),
    ],
    ids=["bit-flip", "bytes-cut-out", "length-flip"],
)
async def test_damage_before_the_tail_of_the_wal_refuses_the_space_and_touches_nothing(
    servers: Servers, tmp_path: Path, damage: Callable[[Path], None], words: tuple[str, ...]
) -> None:
    root = tmp_path / "data"
    server, written = await populate(servers, root, consolidate=False)
    segment = segments(root, "alpha")[-1]
    pristine = segment.read_bytes()
    damage(segment)
    damaged = segment.read_bytes()
    await server.start()
    await assert_refused(server, written, "alpha", "WAL segment", *words)
    assert segment.read_bytes() == damaged, "a refused space's log must be left as it was"
    # Repaired (a backup restored), the space is served whole again.
    server.kill()
    segment.write_bytes(pristine)
    assert await restart_and_count_missing(server, written) == {"alpha": [], "beta": []}


async def multi_segment_wal(root: Path) -> dict[str, list[str]]:
    """Spaces alpha and beta with WALs of several small segments (written through the storage
    engine: the server's own segments are 64 MiB), never consolidated."""
    reg = registry.standalone(root, settings.EngineSettings(wal_segment_bytes=1024))
    rng = np.random.default_rng(4)
    written: dict[str, list[str]] = {}
    try:
        for name in SPACES:
            space_id = spaces.SpaceId(name)
            await reg.create(space_id, DIM)
            written[name] = [f"{name}-{n}" for n in range(40)]
            async with reg.lease(space_id) as space:
                for memory_id in written[name]:
                    await space.remember(
                        memories.Draft(
                            content="c" * 100,
                            embedding=np.array(unit(rng), np.float32),
                            id=memory_id,
                        )
                    )
            await reg.loaded()[space_id].close(consolidate=False)
    finally:
        await reg.close()
    return written


def truncate_second_segment(root: Path) -> None:
    second = segments(root, "alpha")[1]
    os.truncate(second, second.stat().st_size // 2)


def delete_second_segment(root: Path) -> None:
    segments(root, "alpha")[1].unlink()


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (truncate_second_segment, ("is not the last segment",)),
        (delete_second_segment, ("expected",)),
    ],
    ids=["truncated", "deleted"],
)
async def test_a_damaged_segment_that_is_not_the_last_refuses_the_space(
    servers: Servers, tmp_path: Path, damage: Callable[[Path], None], words: tuple[str, ...]
) -> None:
    root = tmp_path / "data"
    written = await multi_segment_wal(root)
    assert len(segments(root, "alpha")) >= 3
    damage(root)
    server = servers(root)
    await server.start()
    await assert_refused(server, written, "alpha", "WAL segment", *words)


# -- checkpoints -----------------------------------------------------------------------------------


def delete_manifest(root: Path) -> None:
    (volume(root, "alpha") / "hot" / "checkpoint.json").unlink()


def delete_hot(root: Path) -> None:
    shutil.rmtree(volume(root, "alpha") / "hot")


def delete_a_run(root: Path) -> None:
    (run,) = (volume(root, "alpha") / "hot").glob("run-*.npz")
    run.unlink()


def garble_manifest(root: Path) -> None:
    (volume(root, "alpha") / "hot" / "checkpoint.json").write_text('{"format": 1, "seq": ')


@pytest.mark.parametrize("after", [10, 0], ids=["with-wal-after", "nothing-after"])
@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (delete_manifest, ("records are missing",)),
        (delete_hot, ("records are missing",)),
        (delete_a_run, ("hot checkpoint", "damaged")),
        (garble_manifest, ("checkpoint manifest", "unreadable")),
    ],
    ids=["manifest-deleted", "hot-deleted", "run-deleted", "manifest-garbled"],
)
async def test_a_lost_or_damaged_hot_checkpoint_refuses_the_space_never_empties_it(
    servers: Servers,
    tmp_path: Path,
    damage: Callable[[Path], None],
    words: tuple[str, ...],
    after: int,
) -> None:
    """`after` 0: every record was consolidated, so the WAL holds none: the checkpoint is all
    there is, and losing it must still be noticed."""
    root = tmp_path / "data"
    server, written = await populate(servers, root, consolidate=True, after=after)
    damage(root)
    await server.start()
    await assert_refused(server, written, "alpha", *words)


async def test_a_lost_warm_tier_refuses_the_space(servers: Servers, tmp_path: Path) -> None:
    root = tmp_path / "data"
    server, written = await populate(
        servers, root, consolidate=True, tiers=pb.SpaceTiers(hot_capacity=10)
    )
    assert list((volume(root, "alpha") / "warm").glob("g*")), "nothing was demoted to warm"
    shutil.rmtree(volume(root, "alpha") / "warm")
    await server.start()
    await assert_refused(server, written, "alpha", "warm tier", "missing")


# -- identity --------------------------------------------------------------------------------------


async def test_another_spaces_identity_in_a_volume_refuses_it_until_repaired(
    servers: Servers, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    server, written = await populate(servers, root, consolidate=True)
    identity = volume(root, "alpha") / "space.json"
    own = identity.read_bytes()
    shutil.copy(volume(root, "beta") / "space.json", identity)
    await server.start()
    await assert_refused(server, written, "alpha", "belongs to space 'beta'")
    server.kill()
    identity.write_bytes(own)
    assert await restart_and_count_missing(server, written) == {"alpha": [], "beta": []}


async def test_a_volume_with_data_but_no_identity_is_refused(
    servers: Servers, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    server, written = await populate(servers, root, consolidate=False)
    (volume(root, "alpha") / "space.json").unlink()
    await server.start()
    await assert_refused(server, written, "alpha", "no space.json")


async def test_a_garbled_index_entry_is_logged_and_the_other_spaces_are_served(
    servers: Servers, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    server, written = await populate(servers, root, consolidate=False)
    (root / "index" / "alpha.json").write_text("{not json")
    await server.start()
    stubs = Stubs(server.address)
    try:
        assert await missing(stubs, "beta", written["beta"]) == []
        listed = await stubs.spaces.ListSpaces(pb.ListSpacesRequest(), timeout=CALL_TIMEOUT_S)
        assert "alpha" not in [s.space for s in listed.spaces]
    finally:
        await stubs.close()
    assert "ignoring spaces index file alpha.json" in server.log()
    assert segments(root, "alpha"), "the space's data must be left alone"
