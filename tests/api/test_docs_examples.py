"""The documentation's examples run, as a reader would run them, against a real `memspace serve`
with an admin token: every ```python block of docs/client.md, docs/api.md and docs/migration.md
as a script of its own, and the ```sh blocks of docs/client.md made only of `memspace` and
`python` commands. The credentials come the way a pod gets them: a mounted Secret's files
(MEMSPACE_CREDENTIALS_DIR)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.conftest import ADMIN_TOKEN, memspace_serve

REPO = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
RUN_PYTHON = {"docs/client.md": 4, "docs/api.md": 1, "docs/migration.md": 1}
"""Each page and the least number of Python examples it has (a page that loses its examples
fails here, not silently)."""
RUNNABLE_SH = re.compile(r"^(memspace|python) ")


def blocks(page: str, language: str) -> list[str]:
    text = (REPO / page).read_text()
    return [body for lang, body in BLOCK.findall(text) if lang == language]


@pytest.fixture(scope="module")
def environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("docs")
    admin = root / "admin-token"
    admin.write_text(ADMIN_TOKEN)
    args = ["--data-root", str(root / "data"), "--listen", "127.0.0.1:0"]
    args += ["--admin-token-file", str(admin), "--metrics-listen", "off"]  # 768 dimensions
    with memspace_serve(args, root / "log") as server:
        secret = root / "secret"
        secret.mkdir()
        (secret / "endpoint").write_text(server.address)
        (secret / "token").write_text(ADMIN_TOKEN)  # the standalone default space's key
        base = {k: v for k, v in os.environ.items() if not k.startswith("MEMSPACE_")}
        bin_dir = str(Path(sys.executable).parent)
        yield {
            **base,
            "PATH": f"{bin_dir}:{base.get('PATH', '')}",
            "COLUMNS": "160",
            "MEMSPACE_CREDENTIALS_DIR": str(secret),
            "MEMSPACE_ADMIN_TOKEN_FILE": str(admin),
        }


def examples() -> list[tuple[str, int, str]]:
    found = []
    for page, least in RUN_PYTHON.items():
        bodies = blocks(page, "python")
        assert len(bodies) >= least, f"{page} has {len(bodies)} Python examples"
        found += [(page, n, body) for n, body in enumerate(bodies)]
    return found


@pytest.mark.parametrize(("page", "number", "code"), examples())
def test_a_python_example_of_the_docs_runs(
    environment: dict[str, str], tmp_path: Path, page: str, number: int, code: str
) -> None:
    ran = subprocess.run(
        [sys.executable, "-c", code],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, f"{page} example {number}:\n{code}\n{ran.stderr}"


def test_the_command_line_examples_of_the_client_guide_run(
    environment: dict[str, str], tmp_path: Path
) -> None:
    runnable = [
        body
        for body in blocks("docs/client.md", "sh")
        if all(RUNNABLE_SH.match(line) for line in body.splitlines() if line.strip())
    ]
    assert runnable, "docs/client.md has no runnable command-line example"
    for body in runnable:
        ran = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", body],
            env=environment,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert ran.returncode == 0, f"{body}\n{ran.stdout}\n{ran.stderr}"
        assert "the sky is blue" in ran.stdout
