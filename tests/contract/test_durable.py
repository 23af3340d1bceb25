"""Durable file I/O: whole replacements, flushed files, and what counts as a full disk."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from memspace_contract import durable


def test_an_atomic_write_replaces_the_file_whole_and_leaves_nothing_beside_it(
    tmp_path: Path,
) -> None:
    target = tmp_path / "space.json"
    durable.atomic_write(target, "old")
    durable.atomic_write(target, b"new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.json"]


def test_an_atomic_write_that_fails_keeps_the_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "manifest.json"
    durable.atomic_write(target, "old")

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space") as raised:
        durable.atomic_write(target, "new")
    assert durable.is_disk_full(raised.value)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_an_atomic_write_can_keep_the_file_to_its_owner(tmp_path: Path) -> None:
    target = tmp_path / "entry.json"
    durable.atomic_write(target, "{}", mode=0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_write_file_writes_every_byte(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    durable.write_file(tmp_path / "state.npz", memoryview(data))
    assert (tmp_path / "state.npz").read_bytes() == data


def test_fsync_paths_flushes_the_files_that_exist(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "chunk").write_bytes(b"x")
    durable.fsync_paths([tmp_path / "a" / "chunk", tmp_path / "a" / "missing"])
    durable.fsync_dir(tmp_path)


@pytest.mark.parametrize(
    ("err", "full"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (OSError(errno.EIO, "Input/output error"), False),
        (ValueError("not an OSError"), False),
    ],
)
def test_a_full_volume_or_quota_is_a_full_disk(err: BaseException, full: bool) -> None:
    assert durable.is_disk_full(err) is full


def test_truncate_cuts_a_file_short(tmp_path: Path) -> None:
    path = tmp_path / "segment.wal"
    path.write_bytes(b"0123456789")
    durable.truncate(path, 4)
    assert path.read_bytes() == b"0123"
