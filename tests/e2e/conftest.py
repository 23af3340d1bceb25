"""Fixtures of the journey: the node cluster (tests/support/cluster.py, `node_cluster`) with the
memspace image (`make image`, tests/support/image.py) imported into its containerd, and
`Journey`, the chart installed as docs/install.md tells and driven as a user would: helm,
kubectl, MemorySpaces, and a client pod per tenant namespace (tests/e2e/agent.py)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support import cluster as harness
from tests.support import controlplane
from tests.support import image as images

CHART = controlplane.REPO / "charts" / "memspace"
AGENT = Path(__file__).with_name("agent.py")
IMAGE_REPOSITORY, IMAGE_TAG = images.IMAGE.split(":")
RELEASE = "memspace"
SYSTEM = "memspace-system"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
WAIT_S = 240.0
T = TypeVar("T")

Manifest = dict[str, Any]


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = WAIT_S, interval: float = 0.5
) -> T:
    """Poll `probe` until it returns something truthy; fail saying `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


def condition(body: Mapping[str, Any] | None, kind: str) -> dict[str, Any]:
    for found in ((body or {}).get("status") or {}).get("conditions") or []:
        if found.get("type") == kind:
            return dict(found)
    return {}


def lines(stdout: str) -> list[dict[str, Any]]:
    """The agent's JSON lines."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


class Writer:
    """`agent.py write` running in a tenant's pod: the ledger of acknowledged writes, read live."""

    def __init__(self, journey: Journey, tenant: str, prefix: str) -> None:
        self.journey = journey
        self.tenant = tenant
        self.stop_file = f"/work/stop-{prefix}"
        self.acked: list[str] = []
        self.errors: list[dict[str, Any]] = []
        self.events: list[tuple[float, str]] = []  # (time, "ack" | error code), in order
        self.done: int | None = None
        self.stderr_text = ""
        argv = journey.kubectl_argv(
            "exec", "-n", tenant, "agent", "--",
            "python", "/agent/agent.py", "write", prefix, self.stop_file,
        )  # fmt: skip
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  # closed in stop()
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if not line.startswith("{"):
                continue
            entry = json.loads(line)
            if "ack" in entry:
                self.acked.append(entry["ack"])
                self.events.append((time.time(), "ack"))
            elif "error" in entry:
                self.errors.append(entry)
                self.events.append((time.time(), entry["error"]))
            elif "done" in entry:
                self.done = entry["done"]

    def acks_since(self, moment: float) -> int:
        return sum(1 for at, what in self.events if at >= moment and what == "ack")

    def wait_acks(self, count: int, since: float = 0.0, timeout: float = WAIT_S) -> None:
        wait_for(
            f"{count} acknowledged writes in {self.tenant}",
            lambda: self.acks_since(since) >= count or None,
            timeout,
        )

    def stop(self) -> None:
        """Stop writing (the agent finishes its current write and says how many it made)."""
        try:
            self.journey.kubectl("exec", "-n", self.tenant, "agent", "--", "touch", self.stop_file)
            self.process.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait()
            self._reader.join(timeout=10)
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.stderr.seek(0)
            self.stderr_text = self.stderr.read()
            self.stderr.close()

    def ledger(self) -> list[str]:
        """Every acknowledged ID, once the writer stopped cleanly."""
        assert self.process.returncode == 0, self.stderr_text
        assert self.done == len(self.acked), (self.done, len(self.acked))
        return list(self.acked)


def stop_writers(writers: Mapping[str, Writer]) -> dict[str, list[str]]:
    """Stop every writer (also when one fails to stop); their ledgers by tenant."""
    problems = []
    for writer in writers.values():
        try:
            writer.stop()
        except Exception as err:  # the others must stop too; raised below
            problems.append(err)
    if problems:
        raise problems[0]
    return {tenant: writer.ledger() for tenant, writer in writers.items()}


class Journey:
    """The chart on the node cluster, and the user's tools."""

    def __init__(self, cluster: harness.Cluster, workdir: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.values_path = workdir / "values.json"
        self.figures: dict[str, float] = {}

    # -- tools -----------------------------------------------------------------------------------

    def kubectl_argv(self, *args: str) -> list[str]:
        return [
            str(self.cluster.tools["kubectl"]),
            f"--kubeconfig={self.cluster.kubeconfig}",
            *args,
        ]

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(*args, input=input, check=check, timeout=timeout)

    def helm(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return self.cluster.helm(*args, timeout=timeout)

    def apply(self, *objects: Manifest) -> None:
        self.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(o) for o in objects))

    def get(self, kind: str, name: str, namespace: str | None = None) -> Manifest | None:
        scope = ["-n", namespace] if namespace else []
        found = self.kubectl("get", kind, name, *scope, "-o", "json", check=False)
        if found.returncode != 0:
            if "NotFound" in found.stderr:
                return None
            raise controlplane.KubectlError(found.returncode, [kind, name], "", found.stderr)
        body: Manifest = json.loads(found.stdout)
        return body

    def items(self, kind: str, namespace: str | None = None, *selector: str) -> list[Manifest]:
        scope = ["-n", namespace] if namespace else ["-A"]
        found = self.kubectl("get", kind, *scope, *selector, "-o", "json")
        items: list[Manifest] = json.loads(found.stdout)["items"]
        return items

    def secret(self, namespace: str, name: str) -> dict[str, str] | None:
        import base64  # noqa: PLC0415

        body = self.get("secret", name, namespace)
        if body is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (body.get("data") or {}).items()}

    # -- the chart -------------------------------------------------------------------------------

    def write_values(self, values: Mapping[str, Any]) -> Path:
        self.values_path.write_text(json.dumps(values))
        return self.values_path

    def namespace(self, name: str, labels: Mapping[str, str]) -> None:
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": dict(labels)},
            }
        )
        self.cluster.node.wait_for_service_account(name)

    # -- spaces ----------------------------------------------------------------------------------

    def space(self, namespace: str, name: str) -> Manifest | None:
        return self.get("memoryspace", name, namespace)

    def wait_condition(
        self,
        namespace: str,
        name: str,
        kind: str,
        status: str,
        timeout: float = WAIT_S,
        reason: str | None = None,
    ) -> Manifest:
        """The space once its condition `kind` has `status` (and `reason`, when given: a
        status can be reached through passing reasons, as Ready=False is through Deactivating
        on its way to Inactive)."""

        def probe() -> Manifest | None:
            body = self.space(namespace, name)
            found = condition(body, kind)
            if found.get("status") != status:
                return None
            return body if reason is None or found.get("reason") == reason else None

        wanted = f"{kind}={status}" + (f" ({reason})" if reason else "")
        return wait_for(f"{namespace}/{name}: {wanted}", probe, timeout)

    # -- pods ------------------------------------------------------------------------------------

    def shard_pod(self, shard: int = 0) -> Manifest | None:
        return self.get("pod", f"memspace-shard-{shard}-0", SYSTEM)

    def wait_pod_ready(self, namespace: str, name: str, other_than: str | None = None) -> Manifest:
        """The pod, Ready (a new one, when `other_than` names the UID of the one before)."""

        def probe() -> Manifest | None:
            pod = self.get("pod", name, namespace)
            if pod is None or pod["metadata"]["uid"] == other_than:
                return None
            if pod["metadata"].get("deletionTimestamp"):
                return None
            ready = [
                c for c in pod.get("status", {}).get("conditions") or [] if c["type"] == "Ready"
            ]
            return pod if ready and ready[0]["status"] == "True" else None

        return wait_for(f"pod {namespace}/{name} to be Ready", probe)

    def agent_pod(self, tenant: str, secret: str) -> None:
        """A client pod in the tenant's namespace: the memspace image, the tenant's credentials
        Secret mounted where the client library looks (MEMSPACE_CREDENTIALS_DIR), the agent
        script from a ConfigMap; restricted like the shards."""
        config_map = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "journey-agent", "namespace": tenant},
            "data": {"agent.py": AGENT.read_text()},
        }
        restricted = {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "agent", "namespace": tenant, "labels": {"app": "agent"}},
            "spec": {
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "terminationGracePeriodSeconds": 1,
                "securityContext": {"runAsUser": 10001, "runAsGroup": 10001},
                "containers": [
                    {
                        "name": "agent",
                        "image": images.IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["sleep", "infinity"],
                        "env": [{"name": "MEMSPACE_CREDENTIALS_DIR", "value": "/var/run/memspace"}],
                        "securityContext": restricted,
                        "volumeMounts": [
                            {
                                "name": "credentials",
                                "mountPath": "/var/run/memspace",
                                "readOnly": True,
                            },
                            {"name": "agent", "mountPath": "/agent", "readOnly": True},
                            {"name": "work", "mountPath": "/work"},
                        ],
                    }
                ],
                "volumes": [
                    {"name": "credentials", "secret": {"secretName": secret}},
                    {"name": "agent", "configMap": {"name": "journey-agent"}},
                    {"name": "work", "emptyDir": {"sizeLimit": "16Mi"}},
                ],
            },
        }
        self.apply(config_map, pod)

    def agent(
        self, tenant: str, *args: str, input: str | None = None, timeout: float = 300
    ) -> list[dict[str, Any]]:
        """Run agent.py in the tenant's pod; its JSON lines."""
        exec_args = ["exec", "-n", tenant, "agent"] + (["-i"] if input is not None else [])
        result = self.kubectl(
            *exec_args, "--", "python", "/agent/agent.py", *args, input=input, timeout=timeout
        )
        return lines(result.stdout)

    def writer(self, tenant: str, prefix: str) -> Writer:
        return Writer(self, tenant, prefix)

    def restarts(self) -> dict[str, int]:
        """Container restarts of every memspace pod (shards and operator) there is now."""
        counts = {}
        for pod in self.items("pod", SYSTEM):
            for status in pod.get("status", {}).get("containerStatuses") or []:
                counts[pod["metadata"]["name"]] = status.get("restartCount", 0)
        return counts

    def back_offs(self) -> list[str]:
        """Events of containers the kubelet restarted after a crash (CrashLoopBackOff)."""
        events = self.items("event", SYSTEM)
        return [
            f"{e['involvedObject']['name']}: {e.get('message', '')}"
            for e in events
            if e.get("reason") == "BackOff"
        ]

    def diagnostics(self) -> str:
        """What to look at when the journey failed: pods, events, the memspace pods' logs."""
        parts = []
        for args in (
            ("get", "pods,pvc", "-A", "-o", "wide"),
            ("get", "events", "-A", "--sort-by=.lastTimestamp"),
        ):
            parts.append(self.kubectl(*args, check=False).stdout)
        for pod in self.items("pod", SYSTEM):
            name = pod["metadata"]["name"]
            for previous in ("--previous", ""):
                logs = self.kubectl(
                    "logs", "-n", SYSTEM, name, "--tail=60", *filter(None, [previous]), check=False
                )
                parts.append(f"--- logs {name} {previous}\n{logs.stdout}{logs.stderr}")
        return "\n".join(parts)


@pytest.fixture(scope="session")
def memspace_image(node_cluster: harness.Cluster) -> str:
    """memspace:dev in the node's containerd (built by `make image` when its inputs changed)."""
    try:
        tar = images.build()
    except images.ImageBuildError as err:
        pytest.fail(str(err), pytrace=False)
    names = harness.import_image(node_cluster, tar)
    assert any(name.endswith(images.IMAGE) for name in names), names
    return images.IMAGE


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


FAILED = pytest.StashKey[bool]()


@pytest.fixture
def journey(
    node_cluster: harness.Cluster,
    memspace_image: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Journey]:
    journey = Journey(node_cluster, tmp_path)
    yield journey
    if request.node.stash.get(FAILED, False):
        print(journey.diagnostics())
