"""Schemathesis against a running `memspace serve` from the committed OpenAPI document: every
operation answers only statuses, content types and bodies the document lists, and never a server
error, for generated valid and invalid requests (with the admin token, so calls get past auth)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.api.conftest import ADMIN_TOKEN, memspace_serve

ROOT = Path(__file__).resolve().parents[2]
_HTTP_PORT = re.compile(r"HTTP/JSON on :(\d+)")


def test_schemathesis_finds_no_undocumented_answer(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text(ADMIN_TOKEN)
    args = [
        f"--data-root={tmp_path / 'data'}",
        "--listen=127.0.0.1:0",
        "--http-listen=127.0.0.1:0",
        "--metrics-listen=off",
        "--default-embedding-dim=4",
        f"--admin-token-file={token}",
    ]
    with memspace_serve(args, tmp_path / "serve.log") as served:
        found = _HTTP_PORT.search(served.output())
        assert found, served.output()
        st = Path(sys.executable).with_name("st")
        run = subprocess.run(
            [
                str(st),
                "run",
                str(ROOT / "docs" / "openapi.json"),
                f"--url=http://127.0.0.1:{found.group(1)}",
                "--checks=not_a_server_error,status_code_conformance,content_type_conformance,"
                "response_schema_conformance",
                # The event stream never ends by itself: test_http.py reads it. The backup calls
                # would send generated targets' requests to any address, or write to any
                # directory: test_http.py and tests/backup call them with real targets.
                "--exclude-path-regex=/events$|/backups|/restore$",
                f"--header=Authorization: Bearer {ADMIN_TOKEN}",
                "--phases=coverage,fuzzing",
                "--max-examples=15",
                "--seed=16",
                "--workers=1",
                "--request-timeout=10",
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,  # schemathesis keeps its cache in the working directory
            timeout=240,
            check=False,
        )
        log = served.output()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Traceback" not in log, log[-4000:]
    assert re.search(r"\d+ generated, \d+ passed", run.stdout), run.stdout[-2000:]
