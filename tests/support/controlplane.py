"""The processes of the local control plane: etcd, kube-apiserver, kube-controller-manager.

``Cluster`` starts them (or attaches to a cluster run elsewhere), stops them without leaving a
process behind, and gives tests kubectl, helm, kubernetes clients and ServiceAccount identities.
The pytest fixtures and ``make cluster`` live in tests/support/cluster.py.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import kubernetes.client
import kubernetes.config

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = REPO / ".cluster"
BIN_DIR = Path(os.environ.get("MEMSPACE_K8S_BIN_DIR", STATE_DIR / "bin"))
TOOLS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kubectl",
    "helm",
    "memspace-test-pki",
)
STORAGE_CLASS = "hostpath"
HOSTPATH_ROOT = Path("/tmp/hostpath_pv")  # fixed by the host-path provisioner
SERVICE_CIDR = "10.0.0.0/24"
START_TIMEOUT = 90.0
CLAIM_SYNC_PERIOD = "2s"
"""kube-controller-manager's --pvclaimbinder-sync-period for the tests: a claim whose
provisioning failed (a conflicting update, say) is tried again within 2 s. Binding itself follows
the claims' and volumes' events; the period re-queues every claim and volume, and each pending
claim scans the volumes of its class, so thousands of claims want a longer one (the operator
bench passes its own)."""


class ToolsMissingError(RuntimeError):
    """A control-plane binary is not built or linked; ``make k8s-tools`` fixes it."""


class ControlPlaneError(RuntimeError):
    """A component did not start or the API server answered something unexpected."""


class KubectlError(subprocess.CalledProcessError):
    """kubectl (or helm) exited non-zero; the message carries its stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr}"


def close_client(client: kubernetes.client.ApiClient) -> None:
    """Close a kubernetes ApiClient with its pooled connections: `close()` keeps them, and one
    left to the collector is finalized in whichever later test runs then, failing it on the
    unclosed socket's ResourceWarning (filterwarnings = error)."""
    client.close()  # type: ignore[no-untyped-call]
    client.rest_client.pool_manager.clear()


def kube_version() -> str:
    """The Kubernetes version the tools are built at (hack/k8s/versions.env)."""
    for line in (REPO / "hack" / "k8s" / "versions.env").read_text().splitlines():
        if line.startswith("KUBE_VERSION="):
            return line.split("=", 1)[1].strip()
    raise ControlPlaneError("KUBE_VERSION is missing from hack/k8s/versions.env")


def find_tools(
    bin_dir: Path = BIN_DIR, names: Sequence[str] = TOOLS, *, search_path: bool = False
) -> dict[str, Path]:
    """The tools, from ``bin_dir`` (or $PATH), or a ToolsMissingError saying how to get them."""
    found: dict[str, Path] = {}
    for name in names:
        if os.access(bin_dir / name, os.X_OK):
            found[name] = bin_dir / name
        elif search_path and (on_path := shutil.which(name)):
            found[name] = Path(on_path)
    if missing := [name for name in names if name not in found]:
        raise ToolsMissingError(
            f"{', '.join(missing)} not found in {bin_dir}: run `make k8s-tools` (it builds the "
            "Kubernetes test control plane once; see docs/test-control-plane.md)"
        )
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on ``host`` (the loopback interface by default)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


_WATCHDOG = """
import os, signal, sys
for line in sys.stdin.readlines():  # returns when the owner has gone, however it went
    try:
        os.killpg(int(line), signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


class Watchdog:
    """Kills registered process groups when its owner dies, even by SIGKILL.

    It is a separate process reading process-group IDs from a pipe: when the pipe closes (the
    owner exits in any way), it kills those groups. A clean stop has already killed them.
    """

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG],
            stdin=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a Ctrl-C to the test run must not kill the watchdog first
        )

    def watch(self, pgid: int) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(f"{pgid}\n")
        self._process.stdin.flush()

    def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(timeout=30)


def stop_groups(
    groups: Sequence[tuple[int, subprocess.Popen[bytes] | None]], grace: float = 5.0
) -> None:
    """SIGTERM process groups, then SIGKILL those left after ``grace`` seconds.

    Each group comes with its leader when that is our child: waiting reaps it (a zombie still
    counts as a member of its group). All are stopped at once: the data is thrown away anyway.
    """

    def gone(pgid: int, process: subprocess.Popen[bytes] | None) -> bool:
        if process is not None:
            return process.poll() is not None
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        left = [(pgid, process) for pgid, process in groups if not gone(pgid, process)]
        for pgid, _ in left:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            time.sleep(0.02)
            left = [(pgid, process) for pgid, process in left if not gone(pgid, process)]
        if not left:
            return


class Cluster:
    """One control plane: its processes, PKI, kubeconfig and helpers to use it.

    Attributes: ``kubeconfig`` (admin, client certificate in system:masters), ``server`` (URL),
    ``bin_dir`` (kubectl, helm and the rest), ``version`` (the built Kubernetes version) and
    ``workdir`` (etcd data, PKI, component logs under ``logs/``).

    With ``node_ip``, it is the control plane of a real node (tests/support/node.py): the API
    server binds and advertises that address (pods reach it there), its certificate names it,
    ServiceAccount admission is on (pods get tokens) and it can reach the kubelet; ``node`` is
    then the Node, once one is started.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        bin_dir: Path = BIN_DIR,
        watchdog: bool = True,
        local: bool = True,
        node_ip: str | None = None,
        claim_sync_period: str = CLAIM_SYNC_PERIOD,
        service_cidr: str = SERVICE_CIDR,
    ) -> None:
        self.local = local  # False: attached to a cluster run elsewhere (kind), see attach()
        self.claim_sync_period = claim_sync_period
        self.service_cidr = service_cidr  # a node's routes assume SERVICE_CIDR: keep it there
        self.node_ip = node_ip
        self.node: Any = None  # the tests.support.node.Node of a cluster with a node
        names = TOOLS if local else ("kubectl", "helm")
        self.tools = find_tools(bin_dir, names, search_path=not local)
        self.bin_dir = bin_dir
        self.version = kube_version()
        self.workdir = workdir
        self.pki = workdir / "pki"
        self.logs = workdir / "logs"
        self.kubeconfig = workdir / "admin.kubeconfig"
        self.server = ""
        self.groups: dict[str, int] = {}  # component name -> process group ID
        self._processes: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}
        self._clients: list[kubernetes.client.ApiClient] = []
        self._watchdog = Watchdog() if watchdog else None
        self._ssl: ssl.SSLContext | None = None
        self._token: str | None = None

    @classmethod
    def attach(cls, kubeconfig: Path, workdir: Path) -> Cluster:
        """A cluster run by someone else (kind, say), reached through its kubeconfig.

        Nothing is started or stopped; the ``hostpath`` StorageClass is created if missing.
        Its credentials must be a client certificate or a token.
        """
        attached = cls(workdir, watchdog=False, local=False)
        attached.kubeconfig = kubeconfig
        view = attached.kubectl("config", "view", "--raw", "--minify", "--flatten", "-o", "json")
        config = json.loads(view.stdout)
        server = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        attached.pki.mkdir(parents=True, exist_ok=True)
        pem = {
            "ca.crt": server.get("certificate-authority-data"),
            "admin.crt": user.get("client-certificate-data"),
            "admin.key": user.get("client-key-data"),
        }
        for name, data in pem.items():
            if data:
                (attached.pki / name).write_bytes(base64.b64decode(data))
        attached._token = user.get("token")
        attached.connect(server["server"])
        status, version = attached.request("GET", "/version")
        if status != 200:
            raise ControlPlaneError(
                f"{server['server']} answered /version with {status}: {version}"
            )
        attached.version = version["gitVersion"]
        attached._create_storage_class()
        return attached

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start etcd, kube-apiserver and kube-controller-manager; return when all are ready."""
        deadline = time.monotonic() + timeout
        self.logs.mkdir(parents=True, exist_ok=True)
        extra_ips = [self.node_ip] if self.node_ip else []
        subprocess.run([self.tools["memspace-test-pki"], self.pki, *extra_ips], check=True)
        pki = {name: str(self.pki / name) for name in os.listdir(self.pki)}
        address = self.node_ip or "127.0.0.1"
        if self.node_ip:
            admission = [
                # logs, exec and port-forward: the API server calls the kubelet as admin
                f"--kubelet-client-certificate={pki['admin.crt']}",
                f"--kubelet-client-key={pki['admin.key']}",
                "--kubelet-preferred-address-types=InternalIP",
            ]
        else:
            admission = ["--disable-admission-plugins=ServiceAccount"]

        etcd_url, peer_url = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
        self._spawn("etcd", [
            "--name=default", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}", "--unsafe-no-fsync=true",
            "--log-level=warn",
        ])  # fmt: skip
        port = free_port(address)
        self.connect(f"https://{address}:{port}")
        self._spawn("kube-apiserver", [
            # envtest's flags: loopback, RBAC, service-account issuer and keys, no SA admission
            # (with a node: its address, and SA admission on).
            f"--advertise-address={address}", f"--bind-address={address}",
            f"--secure-port={port}", f"--cert-dir={self.pki}",
            f"--etcd-servers={etcd_url}", f"--service-cluster-ip-range={self.service_cidr}",
            "--allow-privileged=true", "--authorization-mode=RBAC", *admission,
            f"--client-ca-file={pki['ca.crt']}",
            f"--tls-cert-file={pki['apiserver.crt']}",
            f"--tls-private-key-file={pki['apiserver.key']}",
            f"--service-account-issuer={self.server}",
            f"--service-account-key-file={pki['sa.pub']}",
            f"--service-account-signing-key-file={pki['sa.key']}",
            "--profiling=false",
        ])  # fmt: skip
        self.write_kubeconfig(
            self.kubeconfig, cert=Path(pki["admin.crt"]), key=Path(pki["admin.key"])
        )
        self._wait(
            "kube-apiserver /readyz", deadline, lambda: self.request("GET", "/readyz")[0] == 200
        )

        self._spawn("kube-controller-manager", [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            f"--cert-dir={self.workdir / 'kcm-certs'}", "--leader-elect=false",
            f"--root-ca-file={pki['ca.crt']}",
            f"--service-account-private-key-file={pki['sa.key']}",
            f"--cluster-signing-cert-file={pki['ca.crt']}",
            f"--cluster-signing-key-file={pki['ca.key']}",
            f"--service-cluster-ip-range={self.service_cidr}",
            "--enable-hostpath-provisioner=true",
            f"--pvclaimbinder-sync-period={self.claim_sync_period}",
            "--kube-api-qps=200", "--kube-api-burst=400",
        ])  # fmt: skip
        # The ServiceAccount controller making `default` shows the controllers are running.
        sa = "/api/v1/namespaces/default/serviceaccounts/default"
        self._wait("kube-controller-manager", deadline, lambda: self.request("GET", sa)[0] == 200)
        # With a node, local-path-provisioner's StorageClass is the default (tests/support/node.py).
        self._create_storage_class(default=self.node_ip is None)

    def connect(self, server: str) -> None:
        """Talk to the API server at ``server`` as admin, with the PKI in ``workdir``."""
        self.server = server
        ca = self.pki / "ca.crt"
        self._ssl = ssl.create_default_context(cafile=ca if ca.exists() else None)
        if (self.pki / "admin.crt").exists():
            self._ssl.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")

    def stop(self) -> None:
        """Stop every process (idempotent) and remove the volumes the provisioner made."""
        if self.node is not None:
            self.node.stop()  # first: kubelet and its pods, while the API server still answers
            self.node = None
        if self.local and self.groups:
            with contextlib.suppress(OSError, ControlPlaneError):
                self._remove_hostpath_volumes()
        for client in self._clients:
            close_client(client)
        self._clients.clear()
        if not self.local:
            return
        stopping = [
            (pgid, self._processes.get(name, (None, None))[0]) for name, pgid in self.groups.items()
        ]
        # SIGKILL: nothing is kept, and kube-apiserver's graceful shutdown takes seconds.
        stop_groups(stopping, grace=0)
        self.groups.clear()
        for _, log in self._processes.values():
            log.close()
        self._processes.clear()
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None

    def watch(self, pgid: int) -> None:
        """Have the watchdog kill process group ``pgid`` if this process dies (a node's part)."""
        if self._watchdog is not None:
            self._watchdog.watch(pgid)

    def detach(self) -> None:
        """Let the processes outlive this Python process (``make cluster``): forget them here."""
        for _, log in self._processes.values():
            log.close()
        self._processes.clear()

    def _spawn(self, name: str, args: Sequence[str]) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [str(self.tools[name]), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole
        )
        self._processes[name] = (process, log)
        self.groups[name] = process.pid
        if self._watchdog is not None:
            self._watchdog.watch(process.pid)

    def _wait(self, what: str, deadline: float, ready: Any) -> None:
        while True:
            for name, (process, _) in self._processes.items():
                if process.poll() is not None:
                    raise ControlPlaneError(
                        f"{name} exited ({process.returncode}):\n{self.log_tail(name)}"
                    )
            with contextlib.suppress(OSError, http.client.HTTPException):
                if ready():
                    return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{self.log_tail(n)}" for n in self.groups)
                raise ControlPlaneError(f"timed out waiting for {what}\n{logs}")
            time.sleep(0.1)

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The last lines of a component's log."""
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    # --- talking to it ---------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One admin request to the API server: (HTTP status, decoded JSON or text)."""
        if self._ssl is None:
            raise ControlPlaneError("the control plane is not started")
        url = urllib.parse.urlsplit(self.server)
        conn = http.client.HTTPSConnection(url.netloc, context=self._ssl, timeout=10)
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        response = None
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, url.path.rstrip("/") + path, data, headers)
            response = conn.getresponse()
            raw = response.read().decode()
        finally:
            # The response first: a read that failed (a timeout) leaves its file open on the
            # socket, which then outlives the connection's close until the collector finds it
            # and warns (filterwarnings = error), at whatever point of the session that is.
            if response is not None:
                response.close()
            conn.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster (as admin unless ``kubeconfig`` says otherwise)."""
        argv = [
            str(self.tools["kubectl"]),
            f"--kubeconfig={kubeconfig or self.kubeconfig}",
            f"--cache-dir={self.workdir / 'kubectl-cache'}",
            *args,
        ]
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def helm(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run helm against this cluster as admin, with its caches and config in ``workdir``."""
        argv = [str(self.tools["helm"]), f"--kubeconfig={self.kubeconfig}", *args]
        homes = {
            f"HELM_{kind}_HOME": str(self.workdir / "helm" / kind.lower())
            for kind in ("CACHE", "CONFIG", "DATA")
        }
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, **homes},
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def kube_api(self, kubeconfig: Path | None = None) -> kubernetes.client.ApiClient:
        """A kubernetes client, closed when the cluster stops (or earlier as a context manager)."""
        client: kubernetes.client.ApiClient = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig or self.kubeconfig)
        )
        self._clients.append(client)
        return client

    def write_kubeconfig(
        self,
        path: Path,
        *,
        token: str | None = None,
        cert: Path | None = None,
        key: Path | None = None,
    ) -> Path:
        """A self-contained kubeconfig for this cluster: a bearer token or a client certificate."""
        user: dict[str, str] = {}
        if token is not None:
            user["token"] = token
        if cert is not None and key is not None:
            user["client-certificate-data"] = _b64(cert)
            user["client-key-data"] = _b64(key)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "memspace-test",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": _b64(self.pki / "ca.crt"),
                    },
                }
            ],
            "users": [{"name": "user", "user": user}],
            "contexts": [
                {"name": "memspace-test", "context": {"cluster": "memspace-test", "user": "user"}}
            ],
            "current-context": "memspace-test",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML, and needs no YAML library
        path.chmod(0o600)
        return path

    def service_account_token(self, namespace: str, name: str, *, duration: str = "1h") -> str:
        """A token of the ServiceAccount (``kubectl create token``): its real identity."""
        result = self.kubectl("create", "token", name, "-n", namespace, f"--duration={duration}")
        return result.stdout.strip()

    def service_account_kubeconfig(
        self, namespace: str, name: str, *, duration: str = "1h"
    ) -> Path:
        """A kubeconfig that acts as the ServiceAccount, to test RBAC with a real identity."""
        token = self.service_account_token(namespace, name, duration=duration)
        path = self.workdir / "kubeconfigs" / f"{namespace}.{name}.{uuid.uuid4().hex[:6]}"
        return self.write_kubeconfig(path, token=token)

    def _create_storage_class(self, *, default: bool = True) -> None:
        status, body = self.request("POST", "/apis/storage.k8s.io/v1/storageclasses", {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {
                    "storageclass.kubernetes.io/is-default-class": str(default).lower()
                },
            },
            "provisioner": "kubernetes.io/host-path",
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",  # no scheduler: WaitForFirstConsumer never binds
            "allowVolumeExpansion": True,  # PVCs may grow in the API; nothing resizes a directory
        })  # fmt: skip
        if status not in (201, 409):
            raise ControlPlaneError(f"cannot create StorageClass {STORAGE_CLASS}: {status} {body}")

    def _remove_hostpath_volumes(self) -> None:
        status, body = self.request("GET", "/api/v1/persistentvolumes")
        if status != 200:
            return
        for pv in body.get("items", []):
            path = Path(pv["spec"].get("hostPath", {}).get("path", "/"))
            if path.parent == HOSTPATH_ROOT:
                shutil.rmtree(path, ignore_errors=True)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()
