"""Checks, without a network, that requirements.lock (what the image installs, every file by hash)
is current with pyproject.toml; `make lint` runs it, `make lock` regenerates the lock:

    python hack/lockfile.py [--pyproject P] [--lock L] [--build-requirements B]

uv records, for every locked package, what asked for it (`# via memspace (pyproject.toml)`,
`# via -r FILE`, `# via PACKAGE`). The lock is current when:
- its top-level packages are exactly pyproject.toml's runtime dependencies, plus the build
  backend from hack/image/build-requirements.in, which must match [build-system] requires;
- every top-level pin satisfies its specifier in pyproject.toml (a raised minimum shows);
- every package is pinned with `==` and carries at least one hash (pip --require-hashes).
A change of the resolution itself (a new release upstream) needs the index: `make lock`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
PROJECT_VIA = "memspace (pyproject.toml)"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


@dataclasses.dataclass
class Locked:
    name: str
    version: str
    marker: str
    hashes: int = 0
    via: list[str] = dataclasses.field(default_factory=list)


def parse_lock(text: str) -> list[Locked]:
    """The lock's entries, with their hashes counted and their `# via` annotations."""
    entries: list[Locked] = []
    in_via = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        found = _PIN.match(raw)
        if found:
            marker = raw.partition(";")[2].rstrip(" \\").strip() if ";" in raw else ""
            entries.append(Locked(canonicalize_name(found[1]), found[2], marker))
            in_via = False
        elif line.startswith("--hash=") and entries:
            entries[-1].hashes += 1
        elif line.startswith("# via") and entries:
            rest = line.removeprefix("# via").strip()
            in_via = not rest
            if rest:
                entries[-1].via.append(rest)
        elif in_via and line.startswith("#   ") and entries:
            entries[-1].via.append(line.removeprefix("#").strip())
        elif not line.startswith("#") and not line.startswith("--"):
            raise ValueError(f"unexpected line in the lock file: {raw!r}")
    return entries


def requirement_names(requirements: list[str]) -> dict[str, Requirement]:
    parsed = [Requirement(text) for text in requirements]
    return {canonicalize_name(r.name): r for r in parsed}


def problems(pyproject: Path, lock: Path, build_requirements: Path) -> list[str]:
    found: list[str] = []
    project = tomllib.loads(pyproject.read_text())
    runtime = requirement_names(project["project"]["dependencies"])
    backend = requirement_names(project["build-system"]["requires"])
    listed = [
        line.strip()
        for line in build_requirements.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if {str(r) for r in requirement_names(listed).values()} != {str(r) for r in backend.values()}:
        found.append(
            f"{build_requirements.name} lists {sorted(listed)} but pyproject.toml's "
            f"[build-system] requires {sorted(project['build-system']['requires'])}"
        )
    entries = parse_lock(lock.read_text())
    build_via = f"-r {build_requirements.relative_to(lock.parent)}"
    locked_runtime = {e.name for e in entries if PROJECT_VIA in e.via}
    locked_backend = {e.name for e in entries if build_via in e.via}
    for kind, wanted, locked in (
        ("runtime dependencies", set(runtime), locked_runtime),
        ("build requirements", set(requirement_names(listed)), locked_backend),
    ):
        if missing := wanted - locked:
            found.append(f"{kind} missing from the lock: {', '.join(sorted(missing))}")
        if extra := locked - wanted:
            found.append(f"the lock has {kind} that are no longer asked for: {sorted(extra)}")
    wanted_all = {**runtime, **requirement_names(listed)}
    for entry in entries:
        if entry.hashes == 0:
            found.append(f"{entry.name}=={entry.version} has no hash")
        requirement = wanted_all.get(entry.name)
        if requirement is not None and not requirement.specifier.contains(
            Version(entry.version), prereleases=True
        ):
            found.append(
                f"{entry.name}=={entry.version} does not satisfy {requirement} (pyproject.toml)"
            )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=REPO / "pyproject.toml")
    parser.add_argument("--lock", type=Path, default=REPO / "requirements.lock")
    parser.add_argument(
        "--build-requirements",
        type=Path,
        default=REPO / "hack" / "image" / "build-requirements.in",
    )
    args = parser.parse_args(argv)
    if not args.lock.is_file():
        print(f"{args.lock} is missing: run `make lock`", file=sys.stderr)
        return 1
    found = problems(args.pyproject, args.lock, args.build_requirements)
    for problem in found:
        print(f"{args.lock.name}: {problem}", file=sys.stderr)
    if found:
        print(
            "requirements.lock is not current with pyproject.toml: run `make lock`", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
