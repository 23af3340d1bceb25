"""A real MinIO (S3) server on loopback for the backup tests, its data in a temporary directory.

The binary is built by ``make k8s-tools`` (hack/k8s-tools.sh, MINIO_VERSION in
hack/k8s/versions.env) and linked into ``.cluster/bin/minio``. Buckets are made as directories of
the data directory before the server starts, which a single-drive MinIO serves as buckets; the
tests then go through the S3 protocol only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support import controlplane

ACCESS_KEY = "memspace-test"
SECRET_KEY = "memspace-test-secret"
REGION = "us-east-1"
START_TIMEOUT = 60.0


def find_binary() -> Path:
    return controlplane.find_tools(names=("minio",))["minio"]


@dataclasses.dataclass
class Minio:
    """A running MinIO: its S3 endpoint, credentials and data directory."""

    endpoint: str
    data: Path
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    binary: Path = dataclasses.field(default_factory=find_binary)
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    def url(self, bucket: str, prefix: str = "") -> str:
        return f"s3://{bucket}/{prefix}".rstrip("/")

    def environment(self) -> dict[str, str]:
        """The variables a memspace process reads its target's credentials from."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "MEMSPACE_BACKUP_ENDPOINT": self.endpoint,
        }

    def start(self) -> None:
        """Start (or restart after `stop`) the server on its port; returns once it answers."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.data.parent),
            "MINIO_ROOT_USER": self.access_key,
            "MINIO_ROOT_PASSWORD": self.secret_key,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_CALLHOME_ENABLE": "off",
        }
        console = controlplane.free_port()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(self.binary),
                    "server",
                    str(self.data),
                    "--address",
                    f"127.0.0.1:{self.port}",
                    "--console-address",
                    f"127.0.0.1:{console}",
                    "--quiet",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"minio exited with {self.process.returncode}: {self.log.read_text()[-2000:]}"
                )
            if _ready(self.port):
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"minio did not answer within {START_TIMEOUT} s: {self.log}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); its data stays for a restart."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def make_bucket(self, name: str) -> str:
        """A new, empty bucket (a directory of the drive; MinIO lists it as a bucket)."""
        (self.data / name).mkdir()
        return name


def _ready(port: int) -> bool:
    """Whether MinIO's liveness endpoint answers 200 (plain HTTP over loopback)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET /minio/health/live HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return sock.recv(64).split(b" ", 2)[1:2] == [b"200"]
    except OSError:
        return False


@contextlib.contextmanager
def running(directory: Path, buckets: tuple[str, ...] = ()) -> Iterator[Minio]:
    """A MinIO serving `directory/data` on a free loopback port until the block ends."""
    data = directory / "data"
    data.mkdir(parents=True)
    port = controlplane.free_port()
    server = Minio(endpoint=f"http://127.0.0.1:{port}", data=data, port=port, log=directory / "log")
    for bucket in buckets:
        server.make_bucket(bucket)
    server.start()
    try:
        yield server
    finally:
        server.stop()
