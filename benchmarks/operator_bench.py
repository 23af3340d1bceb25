"""`make bench-operator`: the operator at scale on the local control plane (design section 7).

1,000 MemorySpaces are created at once (16 concurrent API clients) against a fresh control plane
with `memspace operator` running as its own process; the figures are

- operator_1000_volumebound_s: seconds from the first create until every space reports
  VolumeBound=True (the hostpath provisioner binds the claims; target: within 120 s);
- operator_1000_mounted_s: the same until every space is Mounted (context: the shards' templates
  change at most once per 10 s batch window);
- operator_idle_writes_per_min: API writes (POST, PUT, PATCH, DELETE; dry runs excluded) to the
  resources the operator writes (MemorySpaces and their status, PVCs, Secrets, StatefulSets,
  Services, Events), per minute, once everything has settled, counted by the API server itself
  (`apiserver_request_total`) over a window holding twelve health rounds and a full re-check
  of every space (target: 0; nothing else writes those resources at rest here).

- state_change_effective_s: p50/p99 seconds from a `spec.state` patch to the shard answering
  accordingly, with a real shard process (see benchmarks/state_changes.py; target p99 <= 1 s).

For the first three no shard runs (there is no kubelet): health is polled against a closed
loopback port, so every space sits at Healthy=False ShardUnreachable, which must not cause writes
either. `--quick` uses 100 spaces, a 20 s window and 10 state changes each way. Skipped, with a
note, when the control plane is not built.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import kubernetes.client
import kubernetes.watch

from benchmarks import state_changes
from tests.support import controlplane

GROUP, VERSION, PLURAL = "memspace.dev", "v1alpha1", "memoryspaces"
SERVER_NAMESPACE = "memspace-system"
TENANT = "bench"
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE", "APPLY"})
OPERATOR_RESOURCES = frozenset(
    {"memoryspaces", "persistentvolumeclaims", "secrets", "statefulsets", "services", "events"}
)
SETTINGS = {
    "MEMSPACE_SERVER_NAMESPACE": SERVER_NAMESPACE,
    "MEMSPACE_SERVER_IMAGE": "memspace:bench",
    "MEMSPACE_HEALTH_INTERVAL": "5",
    "MEMSPACE_RESYNC_INTERVAL": "60",
    # Nothing listens there: every Health RPC fails at once.
    "MEMSPACE_SHARD_ENDPOINT_TEMPLATE": "127.0.0.1:9",
}
TIMEOUT_S = 900.0


def run(results: dict[str, object], quick: bool) -> None:
    try:
        controlplane.find_tools()
    except controlplane.ToolsMissingError as err:
        print(f"   skipping operator_bench: {err}")
        return
    count = int(os.environ.get("MEMSPACE_BENCH_SPACES", "100" if quick else "1000"))
    idle_s = 20.0 if quick else 60.0
    with tempfile.TemporaryDirectory(prefix="memspace-operator-bench-") as tmp:
        workdir = Path(tmp)
        cluster = controlplane.Cluster(workdir / "control-plane")
        try:
            cluster.start()
            _bench(cluster, workdir, count, idle_s, results)
            state_changes.run(cluster, workdir, results, rounds=10 if quick else 50)
        finally:
            cluster.stop()


def _bench(
    cluster: controlplane.Cluster,
    workdir: Path,
    count: int,
    idle_s: float,
    results: dict[str, object],
) -> None:
    crds = str(controlplane.REPO / "crds")
    cluster.kubectl("apply", "--server-side", "-f", crds)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", crds)
    for namespace in (SERVER_NAMESPACE, TENANT):
        cluster.kubectl("create", "namespace", namespace)
    token = workdir / "admin-token"
    token.write_text("bench-admin-token")
    with (
        _operator(cluster, workdir, token) as operator,
        cluster.kube_api() as api,
    ):
        custom = kubernetes.client.CustomObjectsApi(api)
        with _Tracker(cluster) as tracker:
            started = time.monotonic()
            _create(custom, count)
            created_s = time.monotonic() - started
            print(f"   created {count} MemorySpaces in {created_s:.1f} s", flush=True)
            bound_s = tracker.wait(count, "VolumeBound", started) - started
            print(f"   all VolumeBound after {bound_s:.1f} s", flush=True)
            mounted_s = tracker.wait(count, "Mounted", started) - started
            print(f"   all Mounted after {mounted_s:.1f} s", flush=True)
        pids = {"operator": operator.pid, **cluster.groups}
        usage = ", ".join(f"{name} {_cpu_seconds(pid):.0f}" for name, pid in pids.items())
        print(f"   CPU seconds used so far: {usage}", flush=True)
        print(f"   API requests so far: {_request_mix(cluster)}", flush=True)
        _settle(custom)
        before = _writes(cluster)
        versions = _versions(custom)
        time.sleep(idle_s)
        writes = _writes(cluster) - before
        changed = sum(1 for k, v in _versions(custom).items() if versions.get(k) != v)
    per_min = writes * 60.0 / idle_s
    print(
        f"   at rest: {writes} writes in {idle_s:.0f} s ({per_min:.1f}/min); "
        f"{changed} MemorySpaces changed",
        flush=True,
    )
    results[f"operator_{count}_volumebound_s"] = round(bound_s, 1)
    results[f"operator_{count}_mounted_s"] = round(mounted_s, 1)
    results["operator_idle_writes_per_min"] = round(per_min, 2)


@contextlib.contextmanager
def _operator(
    cluster: controlplane.Cluster, workdir: Path, token: Path
) -> Iterator[subprocess.Popen[bytes]]:
    log_path = workdir / "operator.log"
    with operator_process(cluster, log_path, TENANT, {**SETTINGS}, token) as process:
        yield process


@contextlib.contextmanager
def operator_process(
    cluster: controlplane.Cluster,
    log_path: Path,
    namespace: str,
    settings: dict[str, str],
    token: Path,
) -> Iterator[subprocess.Popen[bytes]]:
    """`memspace operator` watching `namespace`, a process of its own with `settings` in its
    environment, waited for until ready and stopped (TERM, then KILL) when the block ends."""
    env = {
        **os.environ,
        **settings,
        "MEMSPACE_ADMIN_TOKEN_FILE": str(token),
        "KUBECONFIG": str(cluster.kubeconfig),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "memspace_operator.main", "--namespace", namespace],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "operator ready" not in log_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the operator did not start:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _create(custom: kubernetes.client.CustomObjectsApi, count: int) -> None:
    def one(i: int) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MemorySpace",
            "metadata": {"name": f"space-{i:04d}", "namespace": TENANT},
            "spec": {"embeddingDim": 384, "storage": {"size": "1Gi"}},
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, TENANT, PLURAL, body)

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(one, range(count)))


def _spaces(custom: kubernetes.client.CustomObjectsApi) -> list[dict[str, Any]]:
    listed = cast(
        "dict[str, Any]", custom.list_namespaced_custom_object(GROUP, VERSION, TENANT, PLURAL)
    )
    return cast("list[dict[str, Any]]", listed.get("items") or [])


def _true(space: dict[str, Any], kind: str) -> bool:
    for condition in (space.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return bool(condition.get("status") == "True")
    return False


class _Tracker:
    """Watches the MemorySpaces (a watch costs the API server far less than lists of 1,000
    objects) and notes when each first reported VolumeBound and Mounted."""

    def __init__(self, cluster: controlplane.Cluster) -> None:
        self._cluster = cluster
        self._api = cluster.kube_api()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-watch", daemon=True)
        self._lock = threading.Lock()
        self.first: dict[str, dict[str, float]] = {"VolumeBound": {}, "Mounted": {}}

    def __enter__(self) -> _Tracker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=70)

    def _run(self) -> None:
        custom = kubernetes.client.CustomObjectsApi(self._api)
        watch = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
        version = ""
        while not self._stop.is_set():
            try:
                for event in watch.stream(  # type: ignore[no-untyped-call]
                    custom.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    TENANT,
                    PLURAL,
                    resource_version=version,
                    timeout_seconds=5,
                ):
                    space = event["object"]
                    version = space["metadata"]["resourceVersion"]
                    self._note(space)
            except kubernetes.client.ApiException:
                version = ""  # expired: start again from a fresh list

    def _note(self, space: dict[str, Any]) -> None:
        now = time.monotonic()
        name = space["metadata"]["name"]
        with self._lock:
            for kind, seen in self.first.items():
                if name not in seen and _true(space, kind):
                    seen[name] = now

    def wait(self, count: int, kind: str, started: float) -> float:
        """When the last of `count` spaces first reported `kind` True."""
        shown = time.monotonic()
        while True:
            with self._lock:
                seen = dict(self.first[kind])
            now = time.monotonic()
            if len(seen) >= count:
                return max(seen.values())
            if now - started > TIMEOUT_S:
                raise RuntimeError(f"only {len(seen)} of {count} spaces {kind} by now")
            if now - shown >= 10:
                shown = now
                claims, bound = _claims(self._cluster)
                print(
                    f"   {now - started:5.0f} s: {len(seen)} {kind}; "
                    f"{claims} claims, {bound} bound",
                    flush=True,
                )
            time.sleep(0.5)


def _claims(cluster: controlplane.Cluster) -> tuple[int, int]:
    """(claims, bound claims) in the server namespace."""
    status, body = cluster.request(
        "GET", f"/api/v1/namespaces/{SERVER_NAMESPACE}/persistentvolumeclaims"
    )
    items = body["items"] if status == 200 else []
    return len(items), sum(1 for c in items if (c.get("status") or {}).get("phase") == "Bound")


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and its reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _versions(custom: kubernetes.client.CustomObjectsApi) -> dict[str, str]:
    return {s["metadata"]["name"]: str(s["metadata"]["resourceVersion"]) for s in _spaces(custom)}


def _settle(custom: kubernetes.client.CustomObjectsApi, quiet_s: float = 15.0) -> None:
    """Wait until no MemorySpace changed for `quiet_s` (the last health conditions landed)."""
    deadline = time.monotonic() + 300
    versions = _versions(custom)
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet_s and time.monotonic() < deadline:
        time.sleep(1.0)
        now = _versions(custom)
        if now != versions:
            versions, quiet_since = now, time.monotonic()


def _requests(cluster: controlplane.Cluster) -> list[tuple[dict[str, str], int]]:
    """The API server's request counters (`apiserver_request_total`): (labels, count)."""
    status, body = cluster.request("GET", "/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}")
    found = []
    prefix = "apiserver_request_total{"
    for line in str(body).splitlines():
        if not line.startswith(prefix):
            continue
        labels_text, _, value = line.rpartition(" ")
        pairs = (pair.split("=", 1) for pair in labels_text[len(prefix) : -1].split(","))
        found.append(({k: json.loads(v) for k, v in pairs}, int(float(value))))
    return found


def _writes(cluster: controlplane.Cluster) -> int:
    """Writes to the operator's resources so far, from the API server's own counters."""
    return sum(
        count
        for labels, count in _requests(cluster)
        if labels.get("verb") in WRITE_VERBS
        and labels.get("dry_run") == ""
        and labels.get("resource") in OPERATOR_RESOURCES
    )


def _request_mix(cluster: controlplane.Cluster, top: int = 12) -> str:
    """The most frequent requests so far, by verb, resource and subresource."""
    mix: dict[str, int] = {}
    for labels, count in _requests(cluster):
        key = " ".join(
            filter(None, (labels.get("verb"), labels.get("resource"), labels.get("subresource")))
        )
        mix[key] = mix.get(key, 0) + count
    ranked = sorted(mix.items(), key=lambda item: -item[1])[:top]
    return ", ".join(f"{key} {count}" for key, count in ranked)


if __name__ == "__main__":
    figures: dict[str, object] = {}
    run(figures, quick="--quick" in sys.argv)
    print(json.dumps(figures, indent=2))
