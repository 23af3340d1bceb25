"""`make bench-operator`: the operator at scale on the local control plane (design section 7).

N MemorySpaces are created at once (16 concurrent API clients) against a fresh control plane
with `memspace operator` running as its own process. N is 1,000 in `make bench` (the design's
figure: all VolumeBound within 120 s), 10,000 in `make bench-operator`, 100 with `--quick`, or
$MEMSPACE_BENCH_SPACES. The figures, with N in their names:

- operator_N_volumebound_s: seconds from the first create until every space reports
  VolumeBound=True (the hostpath provisioner binds the claims; target for 1,000: 120 s);
- operator_N_volumebound_p50_s / _p99_s: the same per space, its median and 99th percentile;
- operator_N_created_s: how long the creates themselves took (the API server's share);
- operator_N_mounted_s: until every space is Mounted, when they all are within a minute of the
  last VolumeBound (context: the shards' templates change at most once per batch window);
- operator_N_rss_mib: the operator's resident memory at rest, and _peak_rss_mib its peak;
- operator_idle_writes_per_min: API writes (POST, PUT, PATCH, DELETE; dry runs excluded) to the
  resources the operator reconciles (MemorySpaces and their status, PVCs, Secrets, StatefulSets,
  Services, Events), per minute, once everything has settled, counted by the API server itself
  (`apiserver_request_total`) over a window holding twelve health rounds and a full re-check
  of every space (target: 0; nothing else writes those resources at rest here). Lease writes
  are counted apart (operator_idle_lease_writes_per_min): the operator's renewals, 30 a minute
  with the default 2 s retry period, and the API server's own identity Lease, about 6.

Timing is watch-based: one watch of the MemorySpaces notes when each space first reports each
condition; nothing lists the 10,000 objects while the operator works (a list of them costs the
API server more than the operator's own requests).

- state_change_effective_standin_s: p50/p99 seconds from a `spec.state` patch to the shard
  answering accordingly, with a real shard process run by the tests' stand-in kubelet (see
  benchmarks/state_changes.py; the figure on the real node, state_change_effective_s, is the
  shard churn bench's; target p99 <= 1 s).

For the scale figures no shard runs (there is no kubelet): health is polled against a closed
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
from typing import Any

import kubernetes.client
import kubernetes.watch

from benchmarks import state_changes
from tests.operator.conftest import Kube
from tests.operator.kubelet import PodStatuses
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
    # A Lease of a minute: while 10,000 spaces were created on the shared 2-core test machine,
    # a Lease write took the control plane more than 10 s and the operator, alone here (no
    # standby to take over, no Deployment to restart it), stepped down at the default
    # 15/10/2 s and the run stalled.
    "MEMSPACE_LEASE_DURATION": "60",
    "MEMSPACE_LEASE_RENEW_DEADLINE": "45",
    "MEMSPACE_LEASE_RETRY_PERIOD": "5",
}
CLAIM_SYNC_PERIOD = "30s"
"""kube-controller-manager's claim-binder period here (the tests use 2 s). Binding follows the
claims' and volumes' events; each period re-queues every claim and volume, and each pending claim
scans every volume of its class (O(n^2) per period): at thousands of pending claims a 2 s period
kept the binder's single worker busy with re-checks. A claim whose provisioning failed (an update
conflict) waits at most this long for its retry."""
SERVICE_CIDR = "10.0.0.0/16"
"""The Service range here (the tests' /24 holds 254): every shard has a Service with a cluster
IP, and 10,000 spaces make 500 shards; with the /24, the shards past the 250th never got a
Service or a StatefulSet, their spaces never Mounted, and the operator's retries (Service
creates refused "range is full") were the only writes at rest."""
TIMEOUT_S = 900.0
"""The longest a 1,000-space run may take to converge; scaled by the number of spaces."""


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
        cluster = controlplane.Cluster(
            workdir / "control-plane",
            claim_sync_period=CLAIM_SYNC_PERIOD,
            service_cidr=SERVICE_CIDR,
        )
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
    _warm_up(cluster)
    token = workdir / "admin-token"
    token.write_text("bench-admin-token")
    settings = {
        **SETTINGS,
        # Room for every space: 20 a shard.
        "MEMSPACE_MAX_SHARDS": str(max(50, count // 20 + 1)),
    }
    with (
        _operator(cluster, workdir, token, settings) as operator,
        cluster.kube_api() as api,
        # No node runs the shard pods here: the stand-in reports them Ready (Mounted waits
        # for that).
        PodStatuses(Kube(cluster), SERVER_NAMESPACE),
    ):
        custom = kubernetes.client.CustomObjectsApi(api)
        with _Tracker(cluster) as tracker:
            started = time.monotonic()
            _create(custom, count)
            created_s = time.monotonic() - started
            print(f"   created {count} MemorySpaces in {created_s:.1f} s", flush=True)
            tracker.operator = operator
            bound = tracker.wait(count, "VolumeBound", started)
            bound_s = max(bound) - started
            print(f"   all VolumeBound after {bound_s:.1f} s", flush=True)
            mounted_s = tracker.wait_mounted(count, started)
            print(
                f"   all Mounted after {mounted_s:.1f} s"
                if mounted_s is not None
                else "   not every space Mounted (no progress for 60 s); not reported",
                flush=True,
            )
            pids = {"operator": operator.pid, **cluster.groups}
            usage = ", ".join(f"{name} {_cpu_seconds(pid):.0f}" for name, pid in pids.items())
            print(f"   CPU seconds used so far: {usage}", flush=True)
            print(f"   API requests so far: {_request_mix(cluster)}", flush=True)
            tracker.settle()
            before, leases_before = _writes(cluster), _writes(cluster, frozenset({"leases"}))
            tracker.mark()
            time.sleep(idle_s)
            writes = _writes(cluster) - before
            lease_writes = _writes(cluster, frozenset({"leases"})) - leases_before
            changed = tracker.changed_since_mark()
        rss, peak = _memory_mib(operator.pid)
    per_min = writes * 60.0 / idle_s
    print(
        f"   at rest: {writes} writes in {idle_s:.0f} s ({per_min:.1f}/min); "
        f"{changed} MemorySpaces changed; {lease_writes} Lease renewals; "
        f"operator RSS {rss:.0f} MiB (peak {peak:.0f} MiB)",
        flush=True,
    )
    latencies = sorted(at - started for at in bound)
    results[f"operator_{count}_created_s"] = round(created_s, 1)
    results[f"operator_{count}_volumebound_s"] = round(bound_s, 1)
    results[f"operator_{count}_volumebound_p50_s"] = round(_quantile(latencies, 0.5), 1)
    results[f"operator_{count}_volumebound_p99_s"] = round(_quantile(latencies, 0.99), 1)
    if mounted_s is not None:
        results[f"operator_{count}_mounted_s"] = round(mounted_s, 1)
    results[f"operator_{count}_rss_mib"] = round(rss, 1)
    results[f"operator_{count}_peak_rss_mib"] = round(peak, 1)
    results["operator_idle_writes_per_min"] = round(per_min, 2)
    results["operator_idle_lease_writes_per_min"] = round(lease_writes * 60.0 / idle_s, 2)


def _warm_up(cluster: controlplane.Cluster) -> None:
    """Wait until the controller-manager binds a claim (its volume controllers start some 30 s
    after the control plane is ready), so that the figures time the operator, not that start."""
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "warm-up", "namespace": "default"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": controlplane.STORAGE_CLASS,
            "resources": {"requests": {"storage": "1Mi"}},
        },
    }
    started = time.monotonic()
    cluster.kubectl("apply", "-f", "-", input=json.dumps(claim))
    cluster.kubectl(
        "wait", "-n", "default", "--for=jsonpath={.status.phase}=Bound", "pvc/warm-up",
        "--timeout=300s", timeout=320,
    )  # fmt: skip
    cluster.kubectl("delete", "-n", "default", "pvc/warm-up", "--wait=false")
    print(f"   the control plane binds claims ({time.monotonic() - started:.0f} s)", flush=True)


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _memory_mib(pid: int) -> tuple[float, float]:
    """(resident, peak resident) memory of a process, MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return int(fields["VmRSS"][0]) / 1024, int(fields["VmHWM"][0]) / 1024


@contextlib.contextmanager
def _operator(
    cluster: controlplane.Cluster, workdir: Path, token: Path, settings: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    log_path = workdir / "operator.log"
    with operator_process(cluster, log_path, TENANT, settings, token) as process:
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
            "metadata": {"name": f"space-{i:05d}", "namespace": TENANT},
            "spec": {"embeddingDim": 384, "storage": {"size": "1Gi"}},
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, TENANT, PLURAL, body)

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(one, range(count)))


def _true(space: dict[str, Any], kind: str) -> bool:
    for condition in (space.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return bool(condition.get("status") == "True")
    return False


class _Tracker:
    """Watches the MemorySpaces (a watch costs the API server far less than lists of thousands
    of objects) and notes when each first reported VolumeBound and Mounted, and when any last
    changed."""

    def __init__(self, cluster: controlplane.Cluster) -> None:
        self._api = cluster.kube_api()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-watch", daemon=True)
        self._lock = threading.Lock()
        self.first: dict[str, dict[str, float]] = {"VolumeBound": {}, "Mounted": {}}
        self.last_event = time.monotonic()
        self._changed: set[str] | None = None
        self.operator: subprocess.Popen[bytes] | None = None
        """The operator's process, once running: a wait fails at once when it has exited."""

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
            self.last_event = now
            if self._changed is not None:
                self._changed.add(name)
            for kind, seen in self.first.items():
                if name not in seen and _true(space, kind):
                    seen[name] = now

    def _count(self, kind: str) -> int:
        with self._lock:
            return len(self.first[kind])

    def _check_operator(self) -> None:
        """Fail at once when the operator process has exited: nothing would converge."""
        if self.operator is not None and (code := self.operator.poll()) is not None:
            raise RuntimeError(f"the operator exited (status {code}); see its log")

    def wait(self, count: int, kind: str, started: float) -> list[float]:
        """When each of `count` spaces first reported `kind` True."""
        shown = time.monotonic()
        while True:
            with self._lock:
                seen = list(self.first[kind].values())
            now = time.monotonic()
            if len(seen) >= count:
                return seen
            if now - started > _timeout(count):
                raise RuntimeError(f"only {len(seen)} of {count} spaces {kind} by now")
            self._check_operator()
            if now - shown >= 10:
                shown = now
                print(
                    f"   {now - started:5.0f} s: {len(seen)} {kind}, "
                    f"{self._count('Mounted')} Mounted",
                    flush=True,
                )
            time.sleep(0.5)

    def wait_mounted(self, count: int, started: float, patience_s: float = 60.0) -> float | None:
        """When the last of `count` spaces first reported Mounted; None when that stops
        progressing for `patience_s` first."""
        progress, at = self._count("Mounted"), time.monotonic()
        while (found := self._count("Mounted")) < count:
            if found != progress:
                progress, at = found, time.monotonic()
            elif time.monotonic() - at > patience_s or time.monotonic() - started > _timeout(count):
                return None
            self._check_operator()
            time.sleep(0.5)
        with self._lock:
            return max(self.first["Mounted"].values()) - started

    def settle(self, quiet_s: float = 15.0) -> None:
        """Wait until no MemorySpace changed for `quiet_s` (the last health conditions landed)."""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with self._lock:
                quiet = time.monotonic() - self.last_event
            if quiet >= quiet_s:
                return
            time.sleep(1.0)

    def mark(self) -> None:
        """Start counting the spaces that change."""
        with self._lock:
            self._changed = set()

    def changed_since_mark(self) -> int:
        with self._lock:
            return len(self._changed or ())


def _timeout(count: int) -> float:
    return TIMEOUT_S * max(1.0, count / 1000)


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and its reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


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


def _writes(cluster: controlplane.Cluster, resources: frozenset[str] = OPERATOR_RESOURCES) -> int:
    """Writes to `resources` so far, from the API server's own counters."""
    return sum(
        count
        for labels, count in _requests(cluster)
        if labels.get("verb") in WRITE_VERBS
        and labels.get("dry_run") == ""
        and labels.get("resource") in resources
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
