"""Seconds from the patch of a MemorySpace's `spec.state` until its shard answers accordingly
(FAILED_PRECONDITION after Inactive, OK after Active), p50 and p99 over alternating changes of
one space; Recall is polled every 20 ms with the tenant's own credentials (target: p99 <= 1 s).
The operator runs as its own process, out of the cluster, in both figures:

- `state_change_effective_s` (`run_on_node`, part of the shard churn bench): on the real node
  (tests/support/node.py), the shard a pod of the image of `make image`, made by the operator
  from its own manifests, its index Secret projected by the real kubelet (refreshed about once
  a minute, so a change reaches the shard through the operator's ApplyIndexEntry call). The
  operator and the client reach the shard through `kubectl port-forward` of its Service (a
  process outside the cluster cannot dial the Service), which adds a few milliseconds a call.
- `state_change_effective_standin_s` (`run`, part of `make bench-operator`): the shard is a local
  `memspace serve` run by the tests' stand-in kubelet (tests/operator/kubelet.py), whose
  projection of the index Secret is stopped once the space is Ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from benchmarks import operator_bench
from memspace_contract import client
from tests.operator.conftest import Kube, condition, endpoint_template, memory_space
from tests.operator.conftest import tenant_credentials as credentials_of
from tests.operator.kubelet import FakeKubelet
from tests.support import controlplane
from tests.support import node as nodes

SERVER_NAMESPACE = "memspace-state"
NODE_SERVER_NAMESPACE = "memspace-state-node"
NODE_LIMIT_S = 240.0
"""The longest the first start of the shard pod may take (volume, pod, image)."""
TENANT = "bench-state"
NAME = "flip"
CUE = [1.0, 0.0, 0.0, 0.0]
POLL_S = 0.02
LIMIT_S = 120.0


def run(
    cluster: controlplane.Cluster, workdir: Path, results: dict[str, object], rounds: int
) -> None:
    for namespace in (SERVER_NAMESPACE, TENANT):
        cluster.kubectl("create", "namespace", namespace)
    token = workdir / "state-admin-token"
    token.write_text("bench-state-admin-token")
    template = endpoint_template()
    kube = Kube(cluster)
    with (
        FakeKubelet(kube, SERVER_NAMESPACE, workdir / "state-node", template, token) as kubelet,
        _operator(cluster, workdir, token, template),
    ):
        kube.apply(memory_space(NAME, TENANT, embeddingDim=len(CUE)))
        _wait_ready(kube)
        kubelet.project_index = False
        creds = credentials_of(kube, TENANT, NAME, SERVER_NAMESPACE)
        times = asyncio.run(_flips(kube, creds, rounds))
    figure = _figure(times)
    print(
        f"   state changes effective (stand-in shard): p50 {figure['p50']:.3f} s, p99 "
        f"{figure['p99']:.3f} s over {len(times)} changes (index projection stopped)",
        flush=True,
    )
    results["state_change_effective_standin_s"] = _figure(times)


def _figure(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    return {"p50": round(statistics.median(times), 3), "p99": round(p99, 3), "changes": len(times)}


def run_on_node(
    cluster: controlplane.Cluster,
    node: nodes.Node,
    image: str,
    workdir: Path,
    results: dict[str, object],
    rounds: int,
) -> None:
    """The state changes of one space served by a shard pod on the real node."""
    crds = str(controlplane.REPO / "crds")
    cluster.kubectl("apply", "--server-side", "-f", crds)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", crds)
    for namespace in (NODE_SERVER_NAMESPACE, TENANT):
        cluster.kubectl("create", "namespace", namespace)
        node.wait_for_service_account(namespace)
    admin = secrets.token_urlsafe(32)
    token = workdir / "state-admin-token"
    token.write_text(admin)
    cluster.kubectl(
        "-n", NODE_SERVER_NAMESPACE, "create", "secret", "generic", "memspace-admin-token",
        f"--from-literal=token={admin}",
    )  # fmt: skip
    template = endpoint_template()
    settings = {
        "MEMSPACE_SERVER_NAMESPACE": NODE_SERVER_NAMESPACE,
        "MEMSPACE_SERVER_IMAGE": image,
        "MEMSPACE_TLS_ENABLED": "false",
        "MEMSPACE_STORAGE_CLASS": nodes.IMMEDIATE_STORAGE_CLASS,
        "MEMSPACE_MOUNT_BATCH_WINDOW": "0.5",
        "MEMSPACE_HEALTH_INTERVAL": "30",
        "MEMSPACE_SHARD_ENDPOINT_TEMPLATE": template,
    }
    kube = Kube(cluster)
    log_path = workdir / "state-node-operator.log"
    try:
        with (
            _PortForward(cluster, template.format(shard=0)),
            operator_bench.operator_process(cluster, log_path, TENANT, settings, token),
        ):
            kube.apply(memory_space(NAME, TENANT, embeddingDim=len(CUE)))
            _wait_ready(kube, limit_s=NODE_LIMIT_S)
            creds = credentials_of(kube, TENANT, NAME, NODE_SERVER_NAMESPACE)
            times = asyncio.run(_flips(kube, creds, rounds))
    finally:
        cluster.kubectl("delete", "namespace", TENANT, NODE_SERVER_NAMESPACE, "--wait=false")
    figure = _figure(times)
    print(
        f"   state changes effective on the real node: p50 {figure['p50']:.3f} s, p99 "
        f"{figure['p99']:.3f} s over {len(times)} changes (shard pod reached through a "
        f"port-forward; load average {os.getloadavg()[0]:.1f})",
        flush=True,
    )
    results["state_change_effective_s"] = figure


class _PortForward:
    """`kubectl port-forward service/memspace-shard-0` to a fixed loopback port, started again
    whenever it ends (there is no pod before the first space, and a restart ends it)."""

    def __init__(self, cluster: controlplane.Cluster, endpoint: str) -> None:
        self.argv = [
            str(cluster.tools["kubectl"]), f"--kubeconfig={cluster.kubeconfig}",
            "-n", NODE_SERVER_NAMESPACE, "port-forward", "service/memspace-shard-0",
            f"{endpoint.rsplit(':', 1)[1]}:50051",
        ]  # fmt: skip
        self._stop = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._keep, name="port-forward", daemon=True)

    def __enter__(self) -> _PortForward:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                self._process.terminate()
        self._thread.join(timeout=30)

    def _keep(self) -> None:
        while not self._stop.is_set():
            self._process = subprocess.Popen(
                self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            self._process.wait()
            self._stop.wait(0.5)


def _wait_ready(kube: Kube, limit_s: float = LIMIT_S) -> None:
    deadline = time.monotonic() + limit_s
    while condition(kube.space(TENANT, NAME), "Ready").get("status") != "True":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{NAME} did not become Ready: {kube.space(TENANT, NAME)}")
        time.sleep(0.2)


async def _flips(kube: Kube, creds: client.Credentials, rounds: int) -> list[float]:
    times = []
    async with client.connect(creds) as memspace:
        for i in range(rounds * 2):
            state, wanted = (
                ("Inactive", grpc.StatusCode.FAILED_PRECONDITION)
                if i % 2 == 0
                else (
                    "Active",
                    grpc.StatusCode.OK,
                )
            )
            await asyncio.to_thread(kube.patch_spec, TENANT, NAME, {"state": state})
            started = time.monotonic()
            while await _code(memspace) is not wanted:
                if time.monotonic() - started > LIMIT_S:
                    raise RuntimeError(f"the shard did not turn {state} within {LIMIT_S:.0f} s")
                await asyncio.sleep(POLL_S)
            times.append(time.monotonic() - started)
    return times


async def _code(memspace: client.Client) -> grpc.StatusCode:
    try:
        await memspace.recall(CUE, k=1)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@contextlib.contextmanager
def _operator(
    cluster: controlplane.Cluster, workdir: Path, token: Path, template: str
) -> Iterator[subprocess.Popen[bytes]]:
    settings = {
        "MEMSPACE_SERVER_NAMESPACE": SERVER_NAMESPACE,
        "MEMSPACE_SERVER_IMAGE": "memspace:bench",
        "MEMSPACE_MOUNT_BATCH_WINDOW": "0.5",
        "MEMSPACE_HEALTH_INTERVAL": "30",
        "MEMSPACE_SHARD_ENDPOINT_TEMPLATE": template,
    }
    log_path = workdir / "state-operator.log"
    with operator_bench.operator_process(cluster, log_path, TENANT, settings, token) as process:
        yield process
