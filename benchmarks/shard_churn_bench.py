"""Tenants coming and going, and what a shard restart costs (issue 14, item 2).

- `restarts_seen_by_sealed_shard_tenants` (target 0): the operator (its own process) on the
  local control plane takes CHURN creates and as many deletes of MemorySpaces (Delete reclaim
  policy, a sliding set of LIVE spaces), with small shards (10 spaces) and a short intake window
  (15 s), so that shards open, fill, seal, empty and go during the run. A watcher notes each
  shard's pod template whenever it is seen; a template seen on a sealed shard that differs from
  the one it had when first seen sealed is a restart its tenants saw. Also reported: shards
  opened and removed, and template changes (restarts of intake shards) per space created. No
  node runs the shard pods here: the tests' PodStatuses stand-in reports them Ready.
- `shard_restart_unavailable_s` (target <= 3): on the real node (tests/support/node.py), a
  shard made from the operator's own StatefulSet manifest (its probes, drain and grace period;
  no spaces, TLS off) runs the image of `make image`; its pod is deleted ROUNDS times, each
  time SETTLE_S after it turned Ready, and the seconds with no ready endpoint in its Service's
  EndpointSlices are measured (polled every 50 ms), with when each step of the restart was
  first seen (`shard_restart_phases_s`: the old container exited, the old pod gone, the new one
  made, running, started, Ready, its endpoint ready). Skipped (said so) where the node cannot
  run (not root, tools or image missing).
- `state_change_effective_s` (target p99 <= 1 s): on the same node, the operator (its own
  process) serves one space from a shard pod it made, and its `spec.state` is flipped
  STATE_ROUNDS times each way (benchmarks/state_changes.py, `run_on_node`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, cast

import kubernetes.client

from benchmarks import operator_bench, state_changes
from memspace_operator import shards
from memspace_operator.settings import Settings
from tests.operator.conftest import Kube
from tests.operator.kubelet import PodStatuses
from tests.support import controlplane
from tests.support import image as images
from tests.support import node as nodes

GROUP, VERSION, PLURAL = "memspace.dev", "v1alpha1", "memoryspaces"
SERVER_NAMESPACE = "memspace-churn"
TENANT = "churn"
CHURN = 200
LIVE = 25
CREATE_EVERY_S = 0.2
SETTINGS = {
    "MEMSPACE_SERVER_NAMESPACE": SERVER_NAMESPACE,
    "MEMSPACE_SERVER_IMAGE": "memspace:bench",
    "MEMSPACE_MAX_SPACES_PER_SHARD": "10",
    "MEMSPACE_SHARD_INTAKE_WINDOW": "15",
    "MEMSPACE_MOUNT_BATCH_WINDOW": "1",
    "MEMSPACE_HEALTH_INTERVAL": "30",
    "MEMSPACE_RESYNC_INTERVAL": "300",
    "MEMSPACE_SHARD_ENDPOINT_TEMPLATE": "127.0.0.1:9",
}
SETTLE_LIMIT_S = 180.0
ROUNDS = 3
SETTLE_S = 5.0
"""How long a shard pod serves before it is deleted: a restart hits a pod that has served for a
while, not one the kubelet has just synced (a deletion right after a sync of the pod waits up
to a second more, for the kubelet's next look at its containers)."""
STATE_ROUNDS = 25
"""Inactive-then-Active changes of one space on the real node (state_change_effective_s)."""
NODE_NAMESPACE = "memspace-restart"


def run(results: dict[str, object], quick: bool) -> None:
    try:
        controlplane.find_tools()
    except controlplane.ToolsMissingError as err:
        print(f"   skipping shard_churn_bench: {err}")
        return
    with tempfile.TemporaryDirectory(prefix="memspace-churn-bench-") as tmp:
        workdir = Path(tmp)
        cluster = controlplane.Cluster(workdir / "control-plane")
        try:
            cluster.start()
            _churn(cluster, workdir, results, CHURN // 4 if quick else CHURN)
        finally:
            cluster.stop()
    _restart_cost(results, rounds=1 if quick else ROUNDS)


# -- churn on the control plane ------------------------------------------------------------------


class _ShardWatcher(threading.Thread):
    """Polls the shard StatefulSets: per StatefulSet (by uid), the template first seen sealed
    and every template seen after it."""

    def __init__(self, apps: kubernetes.client.AppsV1Api) -> None:
        super().__init__(name="churn-shard-watcher", daemon=True)
        self.apps = apps
        self.sealed_template: dict[str, str] = {}
        self.restarts_after_seal: dict[str, int] = {}
        self.seen: set[str] = set()
        self.errors: list[str] = []
        self._last: dict[str, str] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.look()
            except Exception as err:  # keep watching; reported at the end
                self.errors.append(repr(err))
            self._stop_event.wait(0.2)

    def look(self) -> None:
        listed = self.apps.list_namespaced_stateful_set(SERVER_NAMESPACE)
        for item in listed.items:
            body: dict[str, Any] = self.apps.api_client.sanitize_for_serialization(item)
            uid = str(body["metadata"]["uid"])
            self.seen.add(uid)
            template = json.dumps(body["spec"]["template"], sort_keys=True)
            sealed = (body["metadata"].get("annotations") or {}).get(shards.SEALED_AT)
            if sealed and uid not in self.sealed_template:
                self.sealed_template[uid] = template
                self._last[uid] = template
            elif uid in self.sealed_template and template != self._last[uid]:
                self.restarts_after_seal[uid] = self.restarts_after_seal.get(uid, 0) + 1
                self._last[uid] = template

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


def _space(i: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MemorySpace",
        "metadata": {"name": f"churn-{i:04d}", "namespace": TENANT},
        "spec": {"embeddingDim": 8, "storage": {"size": "1Gi", "reclaimPolicy": "Delete"}},
    }


def _churn(
    cluster: controlplane.Cluster, workdir: Path, results: dict[str, object], count: int
) -> None:
    crds = str(controlplane.REPO / "crds")
    cluster.kubectl("apply", "--server-side", "-f", crds)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", crds)
    for namespace in (SERVER_NAMESPACE, TENANT):
        cluster.kubectl("create", "namespace", namespace)
    token = workdir / "admin-token"
    token.write_text("churn-admin-token")
    log_path = workdir / "operator.log"
    with (
        operator_bench.operator_process(cluster, log_path, TENANT, SETTINGS, token),
        cluster.kube_api() as api,
        PodStatuses(Kube(cluster), SERVER_NAMESPACE),
    ):
        custom = kubernetes.client.CustomObjectsApi(api)
        apps = kubernetes.client.AppsV1Api(api)
        watcher = _ShardWatcher(apps)
        watcher.start()
        started = time.monotonic()
        live: deque[int] = deque()
        try:
            for i in range(count):
                custom.create_namespaced_custom_object(GROUP, VERSION, TENANT, PLURAL, _space(i))
                live.append(i)
                if len(live) > LIVE:
                    _delete(custom, live.popleft())
                time.sleep(CREATE_EVERY_S)
            while live:
                _delete(custom, live.popleft())
            _wait_empty(custom, apps)
        finally:
            watcher.stop()
        churn_s = time.monotonic() - started
        changes = _template_changes(log_path)
    restarts = sum(watcher.restarts_after_seal.values())
    print(
        f"   {count} creates and {count} deletes in {churn_s:.0f} s: {len(watcher.seen)} shards "
        f"opened, {len(watcher.sealed_template)} sealed, all removed at the end; "
        f"{changes} template changes (intake restarts); restarts seen by sealed shards' "
        f"tenants: {restarts}",
        flush=True,
    )
    if watcher.errors:
        print(f"   watcher errors: {watcher.errors[:3]}", flush=True)
    results["restarts_seen_by_sealed_shard_tenants"] = restarts
    results["churn_shards_opened"] = len(watcher.seen)
    results["churn_template_changes_per_space"] = round(changes / max(count, 1), 3)
    results["churn_s"] = round(churn_s, 1)


def _delete(custom: kubernetes.client.CustomObjectsApi, i: int) -> None:
    custom.delete_namespaced_custom_object(GROUP, VERSION, TENANT, PLURAL, f"churn-{i:04d}")


def _wait_empty(
    custom: kubernetes.client.CustomObjectsApi, apps: kubernetes.client.AppsV1Api
) -> None:
    """Every MemorySpace gone and every shard removed."""
    deadline = time.monotonic() + SETTLE_LIMIT_S
    while True:
        listed = cast(
            "dict[str, Any]", custom.list_namespaced_custom_object(GROUP, VERSION, TENANT, PLURAL)
        )
        spaces_left = len(listed.get("items") or [])
        shards_left = len(apps.list_namespaced_stateful_set(SERVER_NAMESPACE).items)
        if not spaces_left and not shards_left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"after the churn, {spaces_left} MemorySpaces and {shards_left} shards are left"
            )
        time.sleep(0.5)


def _template_changes(log_path: Path) -> int:
    """Template writes the operator logged: StatefulSets created, templates changed."""
    text = log_path.read_text(errors="replace")
    return text.count("pod template now mounts") + text.count(": created /apis/apps/v1")


# -- a restart on the real node ------------------------------------------------------------------


def _restart_cost(results: dict[str, object], rounds: int) -> None:
    if os.geteuid() != 0:
        print("   skipping shard_restart_unavailable_s: the node needs root", flush=True)
        return
    try:
        tar = images.build()
    except Exception as err:  # no image engine here: say so, measure the rest
        print(f"   skipping shard_restart_unavailable_s: no image ({err})", flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="memspace-restart-bench-") as tmp:
        workdir = Path(tmp)
        try:
            cluster = controlplane.Cluster(workdir, node_ip=nodes.NODE_IP)
            node = nodes.Node(cluster, workdir / "node")
        except controlplane.ToolsMissingError as err:
            print(f"   skipping shard_restart_unavailable_s: {err}", flush=True)
            return
        try:
            node.start(lock_timeout=600)
            cluster.node = node
            (image,) = [name for name in node.import_image(tar) if "memspace" in name][:1]
            _measure_restarts(cluster, node, image, results, rounds)
            state_changes.run_on_node(
                cluster, node, image, workdir, results, rounds=5 if rounds == 1 else STATE_ROUNDS
            )
        finally:
            cluster.node = node
            cluster.stop()


def _measure_restarts(
    cluster: controlplane.Cluster,
    node: nodes.Node,
    image: str,
    results: dict[str, object],
    rounds: int,
) -> None:
    cluster.kubectl("create", "namespace", NODE_NAMESPACE)
    node.wait_for_service_account(NODE_NAMESPACE)
    settings = Settings.from_env(
        {
            "MEMSPACE_SERVER_NAMESPACE": NODE_NAMESPACE,
            "MEMSPACE_SERVER_IMAGE": image,
            "MEMSPACE_TLS_ENABLED": "false",
        }
    )
    with cluster.kube_api() as api:
        core = kubernetes.client.CoreV1Api(api)
        apps = kubernetes.client.AppsV1Api(api)
        discovery = kubernetes.client.DiscoveryV1Api(api)
        index = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "memspace-shard-0-spaces", "namespace": NODE_NAMESPACE},
        }
        manifests = [index, shards.service(settings, 0), shards.statefulset(settings, 0, [], "")]
        for manifest in manifests:
            cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        pod = _wait_ready_pod(core, None)
        gaps, timelines = [], []
        for _ in range(rounds):
            time.sleep(SETTLE_S)
            old = pod["metadata"]["uid"]
            with _ServerLog(cluster) as old_log:
                deleted, deleted_at = time.monotonic(), time.time()
                core.delete_namespaced_pod(pod["metadata"]["name"], NODE_NAMESPACE)
                gap, timeline = _unready_gap(core, discovery, deleted, old)
                pod = _wait_ready_pod(core, old)
            # The servers' own log: when the old one began and ended its drain, and when the
            # new one served (their clocks are this machine's).
            new_log = cluster.kubectl("-n", NODE_NAMESPACE, "logs", POD).stdout
            for phase, text, marker in (
                ("old server draining", old_log.text, "draining:"),
                ("old server drained", old_log.text, "drained in"),
                ("new server serving", new_log, "serving "),
            ):
                if (at := _logged_at(text, marker)) is not None:
                    timeline[phase] = at - deleted_at
            gaps.append(gap)
            timelines.append(timeline)
        apps.delete_namespaced_stateful_set("memspace-shard-0", NODE_NAMESPACE)
    cluster.kubectl("delete", "namespace", NODE_NAMESPACE, "--wait=false")
    phases = {
        phase: round(statistics.median(t[phase] for t in timelines), 2)
        for phase in PHASES
        if all(phase in t for t in timelines)
    }
    print(
        f"   shard pod deleted: no ready endpoint for {statistics.median(gaps):.2f} s (median; "
        f"max {max(gaps):.2f}) over {rounds} restarts; seconds from the deletion (median): "
        + ", ".join(f"{phase} {at:.2f}" for phase, at in phases.items())
        + f" (load average {os.getloadavg()[0]:.1f})",
        flush=True,
    )
    results["shard_restart_unavailable_s"] = {
        "median": round(statistics.median(gaps), 2),
        "max": round(max(gaps), 2),
        "restarts": rounds,
    }
    results["shard_restart_phases_s"] = phases
    if "endpoint ready" in phases:
        results["shard_restart_to_ready_s"] = phases["endpoint ready"]
    if "old pod gone" in phases:
        results["shard_restart_old_pod_gone_s"] = phases["old pod gone"]


PHASES = (
    "endpoint not ready",
    "old server draining",
    "old server drained",
    "old container exited",
    "old pod gone",
    "new pod made",
    "new container running",
    "new server serving",
    "new container started",
    "new pod ready",
    "endpoint ready",
)
"""What a restart goes through, each timed from the pod's deletion: polled every 50 ms, or
(the servers' steps) from their log."""
POD = "memspace-shard-0-0"


class _ServerLog:
    """`kubectl logs -f` of the shard pod while it lives: its log once it has ended."""

    def __init__(self, cluster: controlplane.Cluster) -> None:
        self.argv = [
            str(cluster.tools["kubectl"]), f"--kubeconfig={cluster.kubeconfig}",
            "-n", NODE_NAMESPACE, "logs", "-f", POD,
        ]  # fmt: skip
        self.text = ""

    def __enter__(self) -> _ServerLog:
        self._process = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self._process.stdout is not None
        # Following once its first line is in (the server logged at its start).
        self.text = self._process.stdout.readline()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.text += self._process.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            self._process.kill()
            self.text += self._process.communicate()[0]


def _logged_at(text: str, marker: str) -> float | None:
    """The time (epoch seconds) of the first JSON log line whose message has `marker`."""
    for line in text.splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            entry = json.loads(line)
            if marker in entry["message"]:
                return datetime.datetime.fromisoformat(entry["time"]).timestamp()
    return None


def _wait_ready_pod(core: kubernetes.client.CoreV1Api, other_than: str | None) -> dict[str, Any]:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        with contextlib.suppress(kubernetes.client.ApiException):
            pod = core.read_namespaced_pod(POD, NODE_NAMESPACE)
            body: dict[str, Any] = core.api_client.sanitize_for_serialization(pod)
            conditions = (body.get("status") or {}).get("conditions") or []
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
            fresh = body["metadata"]["uid"] != other_than
            if ready and fresh and not body["metadata"].get("deletionTimestamp"):
                return body
        time.sleep(0.1)
    raise RuntimeError("the shard pod did not become Ready")


def _ready_endpoints(discovery: kubernetes.client.DiscoveryV1Api) -> int:
    slices = discovery.list_namespaced_endpoint_slice(
        NODE_NAMESPACE, label_selector="kubernetes.io/service-name=memspace-shard-0"
    )
    return sum(
        1
        for item in slices.items
        for endpoint in item.endpoints or []
        if endpoint.conditions is not None and endpoint.conditions.ready
    )


def _unready_gap(
    core: kubernetes.client.CoreV1Api,
    discovery: kubernetes.client.DiscoveryV1Api,
    since: float,
    old: str,
) -> tuple[float, dict[str, float]]:
    """Seconds without a ready endpoint after the deletion at `since` (monotonic), and when
    (seconds after `since`) each of PHASES was first seen."""
    seen: dict[str, float] = {}
    went: float | None = None
    deadline = since + 240
    while time.monotonic() < deadline:
        ready = _ready_endpoints(discovery)
        now = time.monotonic()
        for phase in _phases(core, old):
            seen.setdefault(phase, now - since)
        if not ready and went is None:
            went = now
            seen["endpoint not ready"] = now - since
        if ready and went is not None:
            seen["endpoint ready"] = now - since
            return now - went, seen
        time.sleep(0.05)
    raise RuntimeError("the shard's endpoint did not come back")


def _phases(core: kubernetes.client.CoreV1Api, old: str) -> list[str]:
    """The PHASES the shard pod shows now."""
    try:
        pod = core.read_namespaced_pod(POD, NODE_NAMESPACE)
    except kubernetes.client.ApiException:
        return ["old pod gone"]
    body: dict[str, Any] = core.api_client.sanitize_for_serialization(pod)
    status = body.get("status") or {}
    containers = status.get("containerStatuses") or []
    if body["metadata"]["uid"] == old:
        exited = any("terminated" in (c.get("state") or {}) for c in containers)
        return ["old container exited"] if exited else []
    found = ["old pod gone", "new pod made"]
    if any("running" in (c.get("state") or {}) for c in containers):
        found.append("new container running")
    if any(c.get("started") for c in containers):
        found.append("new container started")
    conditions = status.get("conditions") or []
    if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
        found.append("new pod ready")
    return found
