"""The light distribution `memspace-client` (client/pyproject.toml): it installs with pip into an
empty venv without the server's or the operator's dependencies, and its `memspace` command and
library work there against a real server."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.api.conftest import DIM, memspace_serve

REPO = Path(__file__).resolve().parents[2]
LIGHT = REPO / "client"
HEAVY = ("memspace_server", "memspace_operator", "pydantic", "zarr", "kopf", "kubernetes")

# `pip install ./client` into an empty venv (a build, and the index for what pip has not
# cached) is the first test's setup: minutes on a loaded machine, near the suite's 300 s.
pytestmark = pytest.mark.timeout(900)


def light_project() -> dict[str, object]:
    project: dict[str, object] = tomllib.loads((LIGHT / "pyproject.toml").read_text())["project"]
    return project


def test_the_light_distribution_keeps_in_step_with_the_full_one() -> None:
    full = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    light = light_project()
    assert light["version"] == full["version"]
    assert light["scripts"] == full["scripts"]
    bounds = {Requirement(r).name: Requirement(r).specifier for r in full["dependencies"]}
    for text in light["dependencies"]:  # type: ignore[attr-defined]
        wanted = Requirement(text)
        assert bounds.get(wanted.name) == wanted.specifier, f"{text} differs from pyproject.toml"


def test_what_the_light_distribution_imports_it_declares() -> None:
    """Every third-party module the client and the command import (outside the lazily loaded
    server) is one of its dependencies."""
    declared = {"numpy", "grpc", "google", "rich"}  # grpcio -> grpc, protobuf -> google
    files = [
        *(REPO / "contract/memspace_contract/client").glob("*.py"),
        REPO / "contract/memspace_contract/spaces.py",
        REPO / "contract/memspace_contract/wire.py",
        *(REPO / "cli/memspace_cli").glob("*.py"),
    ]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("memspace_contract", "memspace_cli"):
                    continue
                lazy = top in ("memspace_server", "memspace_operator")  # behind a try or a flag
                assert lazy or top in declared, f"{path.name} imports {name}"


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty venv with `pip install ./client` in it (pip's own index settings and cache)."""
    root = tmp_path_factory.mktemp("light")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(LIGHT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr
    return root / "venv"


def test_pip_installs_the_light_client_without_the_server(light_venv: Path) -> None:
    python = str(light_venv / "bin" / "python")
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {item["name"].lower() for item in json.loads(listed.stdout)}
    assert {"memspace-client", "grpcio", "protobuf", "numpy", "rich"} <= names
    assert not names & {"pydantic", "zarr", "kopf", "kubernetes", "memspace"}
    for module in HEAVY:
        probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, check=False)
        assert probe.returncode != 0, f"{module} is importable in the light venv"
    serve = subprocess.run(
        [str(light_venv / "bin" / "memspace"), "serve"], capture_output=True, text=True, check=False
    )
    assert serve.returncode == 2
    assert "the server is not installed" in serve.stderr


def test_the_light_client_and_command_work_against_a_server(
    light_venv: Path, tmp_path: Path
) -> None:
    args = ["--data-root", str(tmp_path / "data"), "--listen", "127.0.0.1:0"]
    args += ["--default-embedding-dim", str(DIM), "--metrics-listen", "off"]
    with memspace_serve(args, tmp_path / "log") as server:
        base = {k: v for k, v in os.environ.items() if not k.startswith("MEMSPACE_")}
        env = {**base, "MEMSPACE_ENDPOINT": server.address}
        command = str(light_venv / "bin" / "memspace")
        stored = subprocess.run(
            [command, "remember", "light", "--embedding", "[1, 0, 0, 0]", "-o", "json"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert stored.returncode == 0, stored.stderr
        memory_id = json.loads(stored.stdout)["id"]
        script = (
            "from memspace_contract.client import MemspaceClient\n"
            "with MemspaceClient.from_env() as m:\n"
            "    print(m.recall([1.0, 0.0, 0.0, 0.0], k=1)[0].memory.id)\n"
        )
        recalled = subprocess.run(
            [str(light_venv / "bin" / "python"), "-c", script],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            cwd=tmp_path,  # not the checkout: the installed packages, not the sources
        )
        assert recalled.returncode == 0, recalled.stderr
        assert recalled.stdout.strip() == memory_id
        status = subprocess.run(
            [command, "status", "-o", "json"], env=env, capture_output=True, text=True, check=False
        )
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["spaces"][0]["memories"] == 1
