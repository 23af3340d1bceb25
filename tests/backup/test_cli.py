"""`memspace backup` against a stopped standalone server's data root and a real MinIO, in its own
process: create, list, restore, delete, and a kill -9 in the middle of a backup and of a restore."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from memspace_contract import spaces
from memspace_server import errors
from memspace_server.storage import backups, objects, registry, settings
from tests.backup.conftest import Ledger, check_holds, make_space, remember
from tests.support import minio

ALPHA = spaces.parse_space_id("alpha")


def memspace(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "memspace_cli.main", "backup", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def serve(root: Path, env: dict[str, str]) -> tuple[int, str]:
    """`memspace serve` on `root`: its exit status and stderr (it is expected to refuse)."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memspace_cli.main",
            "serve",
            "--data-root",
            str(root),
            "--listen",
            "127.0.0.1:0",
        ],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = process.communicate(timeout=60)
    return process.returncode, err


def run(*args: str, env: dict[str, str]) -> dict[str, object] | list[dict[str, object]]:
    process = memspace(*args, "-o", "json", env=env)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    result: dict[str, object] | list[dict[str, object]] = json.loads(out)
    return result


def kill_when(process: subprocess.Popen[str], ready: Callable[[], bool]) -> None:
    """SIGKILL `process` as soon as `ready()` holds, while it still runs."""
    deadline = time.monotonic() + 60
    while not ready():
        assert process.poll() is None, f"it finished before the kill: {process.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate()


@pytest.fixture
async def data_root(
    tmp_path: Path, engine_settings: settings.EngineSettings
) -> tuple[Path, Ledger]:
    """A stopped server's data root with space `alpha`: many files (small chunks), all tiers."""
    reg = registry.standalone(tmp_path / "data", engine_settings)
    ledger = Ledger()
    try:
        space_id = await make_space(reg, hot=300, warm=1500)
        await remember(reg, space_id, ledger, 2000, np.random.default_rng(7), batch=400)
        async with reg.lease(space_id) as space:
            await space.consolidate()
        await remember(reg, space_id, ledger, 50, np.random.default_rng(8))
    finally:
        await reg.close()
    return tmp_path / "data", ledger


@pytest.fixture
def env(minio_server: minio.Minio) -> dict[str, str]:
    return minio_server.environment()


async def holds(root: Path, space_id: spaces.SpaceId, ledger: Ledger) -> None:
    reg = registry.standalone(root)
    try:
        await check_holds(reg, space_id, ledger.memories)
    finally:
        await reg.close()


async def test_backup_create_list_restore_delete_from_the_command_line(
    tmp_path: Path,
    data_root: tuple[Path, Ledger],
    env: dict[str, str],
    minio_server: minio.Minio,
    bucket: str,
) -> None:
    root, ledger = data_root
    url = minio_server.url(bucket, "team")
    created = run("create", url, "--data-root", str(root), "--space", "alpha", env=env)
    assert isinstance(created, dict)
    assert created["space"] == "alpha"
    assert created["memories"] == len(ledger.memories)
    listed = run("list", url, env=env)
    assert isinstance(listed, list)
    assert [b["backup"] for b in listed] == [created["backup"]]

    restored = run(
        "restore",
        url,
        str(created["backup"]),
        "--data-root",
        str(root),
        "--space",
        "alpha",
        "--as",
        "beta",
        env=env,
    )
    assert isinstance(restored, dict)
    assert restored["space"] == "beta"
    await holds(root, spaces.parse_space_id("beta"), ledger)
    await holds(root, ALPHA, ledger)

    # A restore over an existing space is refused with a clear message.
    process = memspace(
        "restore",
        url,
        str(created["backup"]),
        "--data-root",
        str(root),
        "--space",
        "alpha",
        env=env,
    )
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "space 'alpha' exists" in err
    assert "--as" in err

    deleted = run("delete", url, str(created["backup"]), "--space", "alpha", env=env)
    assert isinstance(deleted, dict)
    assert int(deleted["deleted"]) > 0  # type: ignore[call-overload]
    assert run("list", url, "--space", "alpha", env=env) == []


async def test_a_backup_killed_midway_leaves_no_backup_and_a_retry_completes(
    tmp_path: Path,
    data_root: tuple[Path, Ledger],
    env: dict[str, str],
    minio_server: minio.Minio,
    bucket: str,
    target_config: objects.TargetConfig,
) -> None:
    root, ledger = data_root
    url = minio_server.url(bucket, "backups")
    target = objects.Target(target_config)
    assert target_config.url == url

    def some_uploaded() -> bool:
        blobs = minio_server.data / bucket / "backups" / "spaces" / "alpha" / "blobs"
        return blobs.is_dir() and sum(1 for _ in blobs.iterdir()) >= 10

    process = memspace("create", url, "--data-root", str(root), "--space", "alpha", env=env)
    kill_when(process, some_uploaded)
    assert await backups.list_backups(target, ALPHA) == []
    await holds(root, ALPHA, ledger)  # nothing acknowledged was lost

    created = run("create", url, "--data-root", str(root), "--space", "alpha", env=env)
    assert isinstance(created, dict)
    assert 0 < int(created["bytesUploaded"]) < int(created["bytes"])  # type: ignore[call-overload]
    manifest = await backups.read(target, ALPHA, str(created["backup"]))
    volume = tmp_path / "restored"
    await backups.restore(target, ALPHA, manifest.backup_id, volume)
    reg = registry.standalone(tmp_path / "other")
    try:
        reg.catalog.put(backups.index_entry(manifest, ALPHA))
        reg.volumes.mkdir(parents=True, exist_ok=True)
        volume.rename(reg.volume(ALPHA))
        await check_holds(reg, ALPHA, ledger.memories)
    finally:
        await reg.close()


async def test_a_restore_killed_midway_serves_nothing_and_a_retry_completes(
    tmp_path: Path,
    data_root: tuple[Path, Ledger],
    env: dict[str, str],
    minio_server: minio.Minio,
    bucket: str,
) -> None:
    root, ledger = data_root
    url = minio_server.url(bucket, "backups")
    created = run("create", url, "--data-root", str(root), "--space", "alpha", env=env)
    assert isinstance(created, dict)
    staging = root / "spaces" / "gamma" / backups.STAGING

    def some_downloaded() -> bool:
        return staging.is_dir() and sum(1 for p in staging.rglob("*") if p.is_file()) >= 10

    args = ("restore", url, str(created["backup"]), "--data-root", str(root), "--as", "gamma")
    kill_when(memspace(*args, "--space", "alpha", env=env), some_downloaded)
    reg = registry.standalone(root)
    try:
        assert spaces.parse_space_id("gamma") not in reg.entries()
        with pytest.raises(errors.SpaceRefusedError, match="restore"):
            await reg.load(
                spaces.parse_space_id("gamma"),
                backups.index_entry(
                    await backups.read(
                        objects.Target(objects.TargetConfig.from_environment(url, env)),
                        ALPHA,
                        str(created["backup"]),
                    ),
                    spaces.parse_space_id("gamma"),
                ),
            )
    finally:
        await reg.close()

    run(*args, "--space", "alpha", env=env)
    await holds(root, spaces.parse_space_id("gamma"), ledger)


async def test_a_data_root_in_use_is_refused_by_a_backup_and_by_a_second_server(
    data_root: tuple[Path, Ledger], env: dict[str, str], minio_server: minio.Minio, bucket: str
) -> None:
    root, _ = data_root
    holder = registry.standalone(root, exclusive=True)  # as a running server holds it
    try:
        with pytest.raises(errors.DataRootInUseError, match="in use by another memspace"):
            registry.standalone(root, exclusive=True)
        process = memspace(
            "create",
            minio_server.url(bucket),
            "--data-root",
            str(root),
            "--space",
            "alpha",
            env=env,
        )
        _, err = process.communicate(timeout=60)
        assert process.returncode == 1
        assert f"the data root {root} is in use by another memspace process" in err
        returncode, serve_err = serve(root, env)
        assert returncode == 2
        assert "is in use by another memspace process" in serve_err
    finally:
        await holder.close()
    # Released: the backup runs now.
    created = run(
        "create", minio_server.url(bucket), "--data-root", str(root), "--space", "alpha", env=env
    )
    assert isinstance(created, dict)
    assert created["space"] == "alpha"


async def test_a_restore_stopped_after_its_files_but_before_its_index_entry_completes_on_retry(
    data_root: tuple[Path, Ledger], env: dict[str, str], minio_server: minio.Minio, bucket: str
) -> None:
    root, ledger = data_root
    url = minio_server.url(bucket)
    created = run("create", url, "--data-root", str(root), "--space", "alpha", env=env)
    assert isinstance(created, dict)
    target = objects.Target(objects.TargetConfig.from_environment(url, env))
    # The files are in place (as a restore killed right after its last rename leaves them),
    # the index entry is not.
    await backups.restore(
        target,
        ALPHA,
        str(created["backup"]),
        root / "spaces" / "delta",
        space_id=spaces.parse_space_id("delta"),
    )
    assert backups.restored_from(root / "spaces" / "delta") == ("alpha", created["backup"])
    args = ("restore", url, str(created["backup"]), "--data-root", str(root), "--as", "delta")
    run(*args, "--space", "alpha", env=env)
    await holds(root, spaces.parse_space_id("delta"), ledger)
