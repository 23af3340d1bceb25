"""Every third-party module the shipped packages import is a declared runtime dependency of
pyproject.toml (not merely installed because another dependency pulls it in): the image installs
exactly what pyproject.toml and its lock name."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("server", "contract", "operator", "cli")


def imported_modules() -> dict[str, set[str]]:
    """Top-level module -> the files importing it, over the shipped packages."""
    found: dict[str, set[str]] = {}
    for part in SHIPPED:
        for path in (REPO / part).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def test_every_imported_third_party_module_is_a_declared_dependency() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module, files in sorted(imported_modules().items()):
        if module in sys.stdlib_module_names or module.startswith("memspace_"):
            continue
        owners = {canonicalize_name(d) for d in distributions.get(module, [])}
        assert owners, f"{module} (imported by {sorted(files)}) is not installed at all"
        if not owners & declared:
            missing[module] = sorted(files)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
