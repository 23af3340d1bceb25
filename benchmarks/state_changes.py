"""state_change_effective_s (part of `make bench-operator`): seconds from the patch of a
MemorySpace's `spec.state` until its shard answers accordingly (FAILED_PRECONDITION after
Inactive, OK after Active), p50 and p99 over alternating changes of one space.

The operator runs as its own process; its shard is a local `memspace serve` run by the tests'
stand-in kubelet (tests/operator/kubelet.py) whose projection of the index Secret is stopped once
the space is Ready, as a real kubelet's about-once-a-minute refresh would be for a change: every
change measured here reached the shard through the operator's ApplyIndexEntry call. Recall is
polled every 20 ms with the tenant's own credentials (target: p99 <= 1 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
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

SERVER_NAMESPACE = "memspace-state"
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
    times.sort()
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    print(
        f"   state changes effective: p50 {statistics.median(times):.3f} s, p99 {p99:.3f} s "
        f"over {len(times)} changes (index projection stopped)",
        flush=True,
    )
    results["state_change_effective_s"] = {
        "p50": round(statistics.median(times), 3),
        "p99": round(p99, 3),
        "changes": len(times),
    }


def _wait_ready(kube: Kube) -> None:
    deadline = time.monotonic() + LIMIT_S
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
