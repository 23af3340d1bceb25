"""The memspace image for tests: `build()` makes (or reuses) `memspace:dev` with hack/image.sh and
returns its `docker save` tar, ready for `ctr -n k8s.io images import` on a node; `engine()` runs
the script's own dockerd (Debian's docker.io, its data root under the cache, no iptables, no
bridge) for as long as a test needs containers, and stops it with every container afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.support import controlplane

SCRIPT = controlplane.REPO / "hack" / "image.sh"
IMAGE = "memspace:dev"
DOCKER = "/usr/bin/docker"
"""Debian's client, which speaks Debian's dockerd's API (another docker may come first on PATH)."""
BUILD_TIMEOUT_S = 1800.0
"""A cold build: apt-get, debootstrap, the image (about 4 minutes here), with room to spare."""


class ImageBuildError(RuntimeError):
    pass


def _script(*args: str, timeout: float) -> str:
    result = subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise ImageBuildError(
            f"hack/image.sh {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
        )
    lines = result.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def build() -> Path:
    """The tar of `memspace:dev`, built only if its inputs changed since the last build."""
    tar = Path(_script("build", timeout=BUILD_TIMEOUT_S))
    if not tar.is_file():
        raise ImageBuildError(f"hack/image.sh reported {tar}, which does not exist")
    return tar


class Docker:
    """The docker client, talking to the script's dockerd."""

    def __init__(self, host: str) -> None:
        self.host = host

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        argv = [DOCKER, *args]
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "DOCKER_HOST": self.host},
            check=False,
        )
        if check and result.returncode != 0:
            raise ImageBuildError(
                f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        return result


@contextlib.contextmanager
def engine() -> Iterator[Docker]:
    """dockerd for the duration; every container and the daemon are gone afterwards. Holds the
    build's lock meanwhile: another run's build waits rather than lose its daemon to our stop
    (so call `build()` before, not inside)."""
    lock = Path(_script("lock-file", timeout=30.0))
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        host = _script("daemon-start", timeout=300.0)
        try:
            yield Docker(host)
        finally:
            _script("daemon-stop", timeout=120.0)
