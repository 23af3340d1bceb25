"""FakeKubelet: a stand-in for the kubelet, doing its jobs that matter to the operator tests for
server shards run as local processes. It stays for speed (a shard "restart" takes a fraction of
a second, so the operator tests can restart shards many times) and to let those tests run on the
control plane without a node. Every behaviour it stands in for is also tested with real pods on
the real node, in tests/e2e/test_journey.py: the shard pod's volumes mounted and Ready, health
followed into the status, a new space's mount restarting the shard with nothing lost, Inactive
and Active through the index without a restart, a deleted space's volume unmounted, and the
faults a stand-in cannot make (pod deleted, node drained, operator pod killed, helm upgrade).

For every shard StatefulSet `memspace-shard-N` in the server namespace it:
1. projects the shard's index Secret `memspace-shard-N-spaces` into `<root>/shard-N/index/` as
   a Secret volume is projected: files written into a fresh `..<stamp>` directory, the
   `..data` symlink swapped atomically, one `<key> -> ..data/<key>` symlink per key;
2. links each bound PV's host path (the host-path provisioner's directory under
   /tmp/hostpath_pv) to `<root>/shard-N/spaces/<spaceId>`, where the pod's template mounts the
   space's claim;
3. projects the shard's TLS Secret (the template's `tls` volume) into `<root>/shard-N/tls/`
   the same way, again whenever the Secret changes (a rotation reaches the running server);
4. runs `memspace serve` on those directories, on the port the operator's
   MEMSPACE_SHARD_ENDPOINT_TEMPLATE gives for shard N, with the template's TLS flags (their
   paths moved to the projected directory), restarting it (SIGTERM, so it drains) when the pod
   template changes, as a StatefulSet rolling update would.

Like a pod, a shard starts only when every claim its template mounts is bound.

`PodStatuses` stands in for the kubelet's status reports: the control plane's StatefulSet
controller makes the shard pods, which no node runs here; it marks each one Running and Ready
(by default at once; with a FakeKubelet, once a shard process serves exactly the claims of that
pod's spec), as the real node does for real pods (tests/e2e).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.operator.conftest import Kube, mounted_claims

log = logging.getLogger(__name__)

SPACES_PATH = "/var/lib/memspace/spaces/"
TLS_PATH = "/etc/memspace/tls"
SYNC_S = 0.2


class ShardProcess:
    """One shard 'pod': its directories and its `memspace serve` process."""

    def __init__(self, shard: int, root: Path, port: int, admin_token_file: Path) -> None:
        self.shard = shard
        self.root = root
        self.port = port
        self.admin_token_file = admin_token_file
        self.spaces = root / "spaces"
        self.index = root / "index"
        self.tls = root / "tls"
        self.tls_data: dict[str, str] | None = None
        self.tls_args: list[str] = []
        self.template: str | None = None
        self.claims: frozenset[str] = frozenset()
        """The claims the running process serves (its pod's volumes)."""
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.stopped_at: list[float] = []
        """When a running server was stopped (seconds since the epoch): its restarts."""
        self.index_data: dict[str, str] | None = None
        for directory in (self.spaces, self.index):
            directory.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        log_file = (self.root / "server.log").open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "memspace_cli.main", "serve",
                f"--data-root={self.spaces}", f"--index-dir={self.index}",
                f"--listen=127.0.0.1:{self.port}", "--metrics-listen=off",
                f"--admin-token-file={self.admin_token_file}",
                "--index-refresh=0.2", "--maintain-interval=0.5", "--drain-timeout=5",
                *self.tls_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log_file.close()
        self.starts += 1

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        self.stopped_at.append(time.time())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


def project(directory: Path, data: dict[str, str]) -> None:
    """Write `data` into `directory` the way the kubelet projects a Secret volume."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir()
    for key, value in data.items():
        (stamp / key).write_text(value)
    link = directory / "..data_tmp"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(stamp.name)
    previous = (directory / "..data").resolve() if (directory / "..data").exists() else None
    os.replace(link, directory / "..data")
    for key in data:
        entry = directory / key
        if not entry.is_symlink():
            entry.symlink_to(f"..data/{key}")
    for entry in directory.iterdir():
        if not entry.name.startswith(".") and entry.name not in data:
            entry.unlink()
    if previous is not None and previous != stamp.resolve():
        shutil.rmtree(previous, ignore_errors=True)


class FakeKubelet:
    def __init__(
        self,
        kube: Kube,
        server_namespace: str,
        root: Path,
        endpoint_template: str,
        admin_token_file: Path,
    ) -> None:
        self.kube = Kube(kube.cluster)  # a client of its own: it runs in its own thread
        self.server_namespace = server_namespace
        self.root = root
        self.endpoint_template = endpoint_template
        self.admin_token_file = admin_token_file
        self.shards: dict[int, ShardProcess] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-kubelet", daemon=True)
        self.errors: list[str] = []
        self.project_index = True
        """False: index Secret changes are not projected into running shards (a real kubelet
        refreshes a Secret volume only about once a minute; this one every SYNC_S seconds)."""
        self.paused = False
        """True: nothing at all happens (no projection, no restart), as on a stalled node."""
        self.statuses = PodStatuses(kube, server_namespace)
        """Its status reports: a shard pod is Ready once a process serves its claims."""
        self.statuses.gate = self.serves

    def __enter__(self) -> FakeKubelet:
        self._thread.start()
        self.statuses.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for shard in self.shards.values():
            shard.stop()
        self.statuses.__exit__(*exc)

    def serves(self, pod: dict[str, Any]) -> bool:
        """Whether a shard process runs with exactly the claims of this pod and answers."""
        labels = pod["metadata"].get("labels") or {}
        value = labels.get("memspace.dev/shard", "")
        shard = self.shards.get(int(value)) if value.isdigit() else None
        if shard is None or shard.process is None or shard.process.poll() is not None:
            return False
        if pod_claims(pod) != shard.claims:
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", shard.port)) == 0

    def port(self, shard: int) -> int:
        endpoint = self.endpoint_template.format(shard=shard, namespace=self.server_namespace)
        return int(endpoint.rpartition(":")[2])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as err:  # keep going, as a kubelet does; tests see the errors
                self.errors.append(repr(err))
                log.exception("fake kubelet round failed")
            self._stop.wait(SYNC_S)

    def sync(self) -> None:
        if self.paused:
            return
        for statefulset in self.kube.statefulsets(self.server_namespace):
            labels = statefulset["metadata"].get("labels") or {}
            if not labels.get("memspace.dev/shard", "").isdigit():
                continue
            number = int(labels["memspace.dev/shard"])
            shard = self.shards.get(number)
            if shard is None:
                shard = self.shards[number] = ShardProcess(
                    number, self.root / f"shard-{number}", self.port(number), self.admin_token_file
                )
            self._sync_shard(shard, statefulset)

    def _sync_shard(self, shard: ShardProcess, statefulset: dict[str, Any]) -> None:
        secret = self.kube.secret(self.server_namespace, f"memspace-shard-{shard.shard}-spaces")
        if secret is not None and secret != shard.index_data and self.project_index:
            project(shard.index, secret)
            shard.index_data = secret
        tls_secret = tls_secret_of(statefulset)
        if tls_secret is not None:
            data = self.kube.secret(self.server_namespace, tls_secret)
            if data is not None and data != shard.tls_data:
                project(shard.tls, data)
                shard.tls_data = data
        template = json.dumps(statefulset["spec"]["template"], sort_keys=True)
        if template == shard.template and shard.process is not None:
            if shard.process.poll() is not None:
                shard.start()  # restartPolicy: Always
            return
        claims = mounted_claims(statefulset)
        links: dict[str, str] = {}
        for mount_path, claim_name in claims.items():
            pvc = self.kube.pvc(self.server_namespace, claim_name)
            volume = (pvc or {}).get("spec", {}).get("volumeName")
            pv = self.kube.pv(volume) if volume else None
            host_path = (pv or {}).get("spec", {}).get("hostPath", {}).get("path")
            if not host_path or (pvc or {}).get("status", {}).get("phase") != "Bound":
                return  # the pod waits for its volumes (ContainerCreating)
            links[mount_path.removeprefix(SPACES_PATH)] = host_path
        if tls_secret is not None and shard.tls_data is None:
            return  # the pod waits for its Secret volume too
        shard.stop()  # the old pod goes (draining), the new one comes with the new volumes
        for entry in shard.spaces.iterdir():
            if entry.name not in links:
                entry.unlink()
        for space_id, host_path in links.items():
            link = shard.spaces / space_id
            if link.is_symlink() and os.readlink(link) == host_path:
                continue
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(host_path)
        shard.template = template
        shard.claims = frozenset(claims.values())
        shard.tls_args = tls_args(statefulset, shard.tls)
        shard.start()


def tls_secret_of(statefulset: dict[str, Any]) -> str | None:
    """The Secret of the shard template's `tls` volume, if it has one."""
    for volume in statefulset["spec"]["template"]["spec"].get("volumes") or []:
        if volume.get("name") == "tls" and volume.get("secret"):
            return str(volume["secret"]["secretName"])
    return None


def tls_args(statefulset: dict[str, Any], directory: Path) -> list[str]:
    """The template's --tls-* flags, pointing at the projected directory."""
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    return [
        arg.replace(TLS_PATH, str(directory))
        for arg in container.get("args") or []
        if arg.startswith("--tls-")
    ]


def pod_claims(pod: dict[str, Any]) -> frozenset[str]:
    """The claims a pod's spec mounts under the spaces' path."""
    spec = pod.get("spec") or {}
    volumes = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in spec.get("volumes") or []
        if v.get("persistentVolumeClaim")
    }
    found = set()
    for container in spec.get("containers") or []:
        for mount in container.get("volumeMounts") or []:
            if mount.get("mountPath", "").startswith(SPACES_PATH) and mount["name"] in volumes:
                found.add(volumes[mount["name"]])
    return frozenset(found)


class PodStatuses:
    """Marks the shard pods of a server namespace Running and Ready as a kubelet would (every
    SYNC_S seconds), or not Ready while `gate` says the pod's server does not serve it."""

    def __init__(self, kube: Kube, server_namespace: str) -> None:
        self.kube = Kube(kube.cluster)  # a client of its own: it runs in its own thread
        self.server_namespace = server_namespace
        self.gate: Callable[[dict[str, Any]], bool] = lambda _pod: True
        self.paused = False
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pod-statuses", daemon=True)

    def __enter__(self) -> PodStatuses:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self.errors, self.errors

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.paused:
                    self.sync()
            except Exception as err:  # keep going, as a kubelet does; the test sees the errors
                self.errors.append(repr(err))
                log.exception("pod status round failed")
            self._stop.wait(SYNC_S)

    def sync(self) -> None:
        selector = "app.kubernetes.io/component=shard"
        for pod in self.kube.pods(self.server_namespace, selector):
            if pod["metadata"].get("deletionTimestamp"):
                continue
            ready = self.gate(pod)
            conditions = (pod.get("status") or {}).get("conditions") or []
            shown = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
            if ready != shown or (pod.get("status") or {}).get("phase") != "Running":
                self.kube.set_pod_ready(self.server_namespace, pod["metadata"]["name"], ready)
