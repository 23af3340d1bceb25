"""The `memspace` tenant commands (remember, recall, get, forget, watch) and `memspace status` as
a tenant runs them in a pod: a `memspace serve` process with tokens, and nothing but the
credentials Secret's files (MEMSPACE_CREDENTIALS_DIR), or flags, to find it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

from memspace_cli import status
from memspace_contract import client, index
from memspace_contract.v1 import memspace_pb2 as pb
from tests.api.conftest import ADMIN_TOKEN, DIM, memspace_serve


def memspace(
    *args: str, env: Mapping[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `memspace ARGS` with exactly the MEMSPACE_* variables in `env` (no others leak in)."""
    base = {key: value for key, value in os.environ.items() if not key.startswith("MEMSPACE_")}
    return subprocess.run(
        [sys.executable, "-m", "memspace_cli.main", *args],
        env={**base, "COLUMNS": "200", **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """A server with an admin token and two spaces with tokens of their own; the mounted
    credentials Secrets of both (address, team-a's directory, team-b's directory)."""
    root = tmp_path_factory.mktemp("shard")
    admin = root / "admin-token"
    admin.write_text(ADMIN_TOKEN)
    args = ["--data-root", str(root / "data"), "--listen", "127.0.0.1:0"]
    args += ["--admin-token-file", str(admin), "--default-embedding-dim", str(DIM)]
    args += ["--metrics-listen", "off"]
    with memspace_serve(args, root / "log") as server:
        secrets = []
        for space in ("team-a", "team-b"):
            token = f"token-of-{space}"
            with client.MemspaceClient(
                client.Credentials(endpoint=server.address, token=ADMIN_TOKEN)
            ) as admin_client:
                admin_client.spaces.CreateSpace(
                    pb.CreateSpaceRequest(
                        space=space, embedding_dim=DIM, token_sha256=index.token_sha256(token)
                    )
                )
            secret = root / f"{space}-memspace"
            secret.mkdir()
            for key, value in {"space": space, "endpoint": server.address, "token": token}.items():
                (secret / key).write_text(value)
            secrets.append(secret)
        yield server.address, secrets[0], secrets[1]


def test_a_tenant_remembers_recalls_gets_forgets_and_watches_from_its_mounted_secret(
    shard: tuple[str, Path, Path], tmp_path: Path
) -> None:
    _, team_a, team_b = shard
    env = {"MEMSPACE_CREDENTIALS_DIR": str(team_a)}
    sky = json.loads(
        ok(
            memspace(
                "remember",
                "the sky is blue",
                "--embedding",
                "[1, 0, 0, 0]",
                "-o",
                "json",
                "--tag",
                "source=chat",
                env=env,
            )
        )
    )
    assert sky["lsn"] >= 1
    vector = tmp_path / "grass.npy"
    np.save(vector, np.array([0.0, 1.0, 0.0, 0.0], dtype=np.float32))
    grass = json.loads(
        ok(
            memspace(
                "remember",
                "grass is green",
                "--embedding",
                f"@{vector}",
                "--id",
                "grass",
                "-o",
                "json",
                env=env,
            )
        )
    )
    assert grass == {"id": "grass", "lsn": sky["lsn"] + 1}
    hits = json.loads(
        ok(
            memspace(
                "recall", "--cue", "-", "-k", "2", "-o", "json", env=env, stdin="[1, 0.1, 0, 0]"
            )
        )
    )
    assert [(h["memory"]["id"], h["tier"]) for h in hits] == [(sky["id"], "hot"), ("grass", "hot")]
    assert hits[0]["memory"]["tags"] == {"source": "chat"}
    assert 0.99 < hits[0]["score"] <= 1.0
    table = ok(memspace("recall", "--cue", "[1, 0, 0, 0]", "-k", "1", env=env))
    header, row = (line.split() for line in table.splitlines() if line.strip() and "─" not in line)
    assert header == ["SCORE", "ID", "TIER", "CONTENT", "TAGS"]
    assert row == ["1.0000", sky["id"], "hot", "the", "sky", "is", "blue", "source=chat"]
    got = json.loads(ok(memspace("get", "grass", "--embeddings", "-o", "json", env=env)))
    assert (got["content"], got["embedding"], got["recallCount"]) == (
        "grass is green",
        [0.0, 1.0, 0.0, 0.0],
        1,
    )
    gone = json.loads(ok(memspace("forget", "grass", "-o", "json", env=env)))
    assert gone["forgotten"] is True
    assert "no such memory" in ok(memspace("forget", "grass", env=env))
    missing = memspace("get", "grass", env=env)
    assert missing.returncode == 1
    assert missing.stderr.startswith("memspace get: NOT_FOUND:")
    lines = ok(memspace("watch", "--since", str(sky["lsn"]), "--count", "3", "-o", "json", env=env))
    events = [json.loads(line) for line in lines.splitlines()]
    assert [(e["event"], e["id"], e["space"]) for e in events] == [
        ("remembered", sky["id"], "team-a"),
        ("remembered", "grass", "team-a"),
        ("forgotten", "grass", "team-a"),
    ]
    # The other tenant's Secret opens only its own space.
    other = json.loads(
        ok(
            memspace(
                "recall",
                "--cue",
                "[1, 0, 0, 0]",
                "-o",
                "json",
                env={"MEMSPACE_CREDENTIALS_DIR": str(team_b)},
            )
        )
    )
    assert other == []


def test_flags_name_the_server_space_and_token_and_bad_input_is_refused_clearly(
    shard: tuple[str, Path, Path],
) -> None:
    address, team_a, _ = shard
    flags = ["--endpoint", address, "--space", "team-b", "--token-file", str(team_a / "token")]
    denied = memspace("recall", "--cue", "[1, 0, 0, 0]", *flags, env={})
    assert denied.returncode == 1
    assert denied.stderr.startswith("memspace recall: PERMISSION_DENIED:")
    flags = ["--credentials-dir", str(team_a)]
    bad = memspace("recall", "--cue", "[1, 0", *flags, env={})
    assert (bad.returncode, "JSON array" in bad.stderr) == (2, True)
    short = memspace("remember", "x", "--embedding", "[1, 0]", *flags, env={})
    assert short.returncode == 1
    assert "INVALID_ARGUMENT" in short.stderr
    tag = memspace(
        "remember", "x", "--embedding", "[1, 0, 0, 0]", "--tag", "novalue", *flags, env={}
    )
    assert (tag.returncode, "KEY=VALUE" in tag.stderr) == (2, True)


def test_memspace_status_in_a_pod_needs_no_flags(shard: tuple[str, Path, Path]) -> None:
    _, team_a, _ = shard
    ok(
        memspace(
            "remember",
            "counted",
            "--embedding",
            "[0, 0, 1, 0]",
            env={"MEMSPACE_CREDENTIALS_DIR": str(team_a)},
        )
    )
    out = ok(memspace("status", "-o", "json", env={"MEMSPACE_CREDENTIALS_DIR": str(team_a)}))
    doc = json.loads(out)
    assert doc["status"] == "SERVING"
    assert [s["space"] for s in doc["spaces"]] == ["team-a"]
    assert doc["spaces"][0]["memories"] >= 1
    table = ok(memspace("status", env={"MEMSPACE_CREDENTIALS_DIR": str(team_a)}))
    assert table.splitlines()[0] == "server: SERVING"
    assert table.splitlines()[2].split()[:2] == ["team-a", "Active"]


def test_the_conventional_mount_is_read_without_any_setting(shard: tuple[str, Path, Path]) -> None:
    _, team_a, _ = shard
    found = client.Credentials.from_env({}, default_dir=team_a)
    assert (found.space, found.token) == ("team-a", "token-of-team-a")
    assert client.Credentials.from_env({}, default_dir=team_a / "absent").space is None


def test_memspace_status_shows_the_wal_lag_as_a_duration() -> None:
    shown = [status.duration(ms) for ms in (0, 850, 12_400, 187_000, 7_500_000)]
    assert shown == ["0ms", "850ms", "12.4s", "3m07s", "2h05m"]
