"""The metrics port behind a bearer token (`memspace serve --metrics-token-file`): without the
token a scrape gets 401 and learns nothing (no space IDs); the token file is re-read when it is
rotated."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.api.conftest import memspace_serve


def scrape(port: int, token: str | None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_metrics_need_the_bearer_token_when_a_token_file_is_given(tmp_path: Path) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text("scrape-me\n")
    args = [
        "--data-root",
        str(tmp_path / "data"),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--metrics-token-file",
        str(token_file),
        "--index-refresh",
        "0.1",
    ]
    with memspace_serve(args, tmp_path / "serve.log") as process:
        found = re.search(r"metrics on :(\d+)", process.output())
        assert found, process.output()
        port = int(found.group(1))
        for wrong in (None, "nope", "scrape-me-too", ""):
            status, body = scrape(port, wrong)
            assert status == 401
            assert "memspace_" not in body
            assert "default" not in body
        status, body = scrape(port, "scrape-me")
        assert status == 200
        assert "memspace_requests_total" in body or "memspace_spaces" in body
        # Rotation: the new token opens the port at once, the old one no longer does.
        token_file.write_text("rotated\n")
        os.utime(token_file, ns=(1, 1))
        assert scrape(port, "rotated")[0] == 200
        assert scrape(port, "scrape-me")[0] == 401


def test_an_unreadable_metrics_token_file_stops_the_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "memspace_cli.main",
            "serve",
            "--data-root",
            str(tmp_path / "data"),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-token-file",
            str(tmp_path / "missing"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--metrics-token-file" in done.stderr + done.stdout


def test_a_managed_shard_starts_without_its_metrics_token_and_admits_nobody_until_it_appears(
    tmp_path: Path,
) -> None:
    """The shard pod mounts the metrics token Secret as optional (it goes with `helm uninstall`):
    the shard still starts, its metrics port admits nobody, not even an empty bearer, until the
    file is there."""
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    token_file = tmp_path / "metrics" / "token"
    args = [
        "--data-root", str(tmp_path / "data"), "--index-dir", str(index_dir),
        "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
        "--metrics-token-file", str(token_file), "--index-refresh", "0.1",
    ]  # fmt: skip
    with memspace_serve(args, tmp_path / "serve.log") as process:
        found = re.search(r"metrics on :(\d+)", process.output())
        assert found, process.output()
        port = int(found.group(1))
        assert "cannot read the token file" in process.output()
        for anyone in (None, "", "guess"):
            assert scrape(port, anyone)[0] == 401
        token_file.parent.mkdir()
        token_file.write_text("scrape-me\n")
        assert scrape(port, "scrape-me")[0] == 200
        assert scrape(port, "")[0] == 401
