"""`offload_roundtrip_s`: seconds for a MemorySpace of 100,000 memories (768 dimensions) to go
Offloaded and come back Active and serving, through the operator, on the local control plane,
with the real MinIO as the target and a real `memspace serve` shard run by the tests' stand-in
kubelet (tests/operator/kubelet.py).

The round trip, timed from the patches of spec.state (the operator runs as its own process):
- `offload_s`: from `state: Offloaded` until Ready says Offloaded (the final backup uploaded
  every file, the shard unloaded the space);
- then the shard pod is deleted (a restart for another reason) so that the claim goes and the
  way back is the real one, not the kept volume;
- `reactivate_s`: from `state: Active` until a Recall with the tenant's own credentials answers
  the memories (a new claim, its mount restarting the shard, RestoreSpace of every file,
  checked by SHA-256, the entry Active again).
`offload_roundtrip_s` is their sum. `--quick`: 10,000 memories.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from benchmarks import operator_bench
from memspace_contract import client
from tests.operator.conftest import Kube, condition, endpoint_template, memory_space
from tests.operator.conftest import tenant_credentials as credentials_of
from tests.operator.kubelet import FakeKubelet
from tests.support import controlplane, minio

SERVER_NAMESPACE = "memspace-offload"
TENANT = "bench-offload"
NAME = "roundtrip"
TARGET = "bench-target"
DIM = 768
BATCH = 2_000
LIMIT_S = 600.0


def run(results: dict[str, object], quick: bool) -> None:
    try:
        controlplane.find_tools()
        minio.find_binary()
    except (controlplane.ToolsMissingError, FileNotFoundError, KeyError) as err:
        print(f"   skipping offload_bench: {err}")
        return
    count = 10_000 if quick else 100_000
    with tempfile.TemporaryDirectory(prefix="memspace-offload-bench-") as tmp:
        workdir = Path(tmp)
        cluster = controlplane.Cluster(workdir / "control-plane")
        try:
            cluster.start()
            with minio.running(workdir / "minio", buckets=("offload",)) as store:
                _bench(cluster, store, workdir, count, results)
        finally:
            cluster.stop()


def _bench(
    cluster: controlplane.Cluster,
    store: minio.Minio,
    workdir: Path,
    count: int,
    results: dict[str, object],
) -> None:
    crds = str(controlplane.REPO / "crds")
    cluster.kubectl("apply", "--server-side", "-f", crds)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", crds)
    for namespace in (SERVER_NAMESPACE, TENANT):
        cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl(
        "-n", SERVER_NAMESPACE, "create", "secret", "generic", "bench-s3",
        f"--from-literal=accessKeyId={store.access_key}",
        f"--from-literal=secretAccessKey={store.secret_key}",
    )  # fmt: skip
    kube = Kube(cluster)
    kube.custom.create_cluster_custom_object(
        "memspace.dev",
        "v1alpha1",
        "memoryspacebackuptargets",
        {
            "apiVersion": "memspace.dev/v1alpha1",
            "kind": "MemorySpaceBackupTarget",
            "metadata": {"name": TARGET},
            "spec": {
                "endpoint": store.endpoint,
                "bucket": "offload",
                "region": store.region,
                "credentialsSecret": {"name": "bench-s3"},
            },
        },
    )
    token = workdir / "offload-admin-token"
    token.write_text("bench-offload-admin-token")
    template = endpoint_template()
    settings = {
        "MEMSPACE_SERVER_NAMESPACE": SERVER_NAMESPACE,
        "MEMSPACE_SERVER_IMAGE": "memspace:bench",
        "MEMSPACE_MOUNT_BATCH_WINDOW": "0.5",
        "MEMSPACE_HEALTH_INTERVAL": "2",
        "MEMSPACE_RESYNC_INTERVAL": "5",
        "MEMSPACE_SHARD_ENDPOINT_TEMPLATE": template,
        "MEMSPACE_BACKUP_DEFAULT_TARGET": TARGET,
    }
    log_path = workdir / "offload-operator.log"
    with (
        FakeKubelet(kube, SERVER_NAMESPACE, workdir / "node", template, token),
        operator_bench.operator_process(cluster, log_path, TENANT, settings, token),
    ):
        kube.apply(
            memory_space(
                NAME, TENANT, embeddingDim=DIM, storage={"size": "4Gi"},
                tiers={"hotCapacity": 20_000},
            )
        )  # fmt: skip
        _wait(kube, "Ready", "True")
        creds = credentials_of(kube, TENANT, NAME, SERVER_NAMESPACE)
        asyncio.run(_fill(creds, count))

        started = time.perf_counter()
        kube.patch_spec(TENANT, NAME, {"state": "Offloaded"})
        _wait(kube, "Ready", "False", "Offloaded")
        offload_s = time.perf_counter() - started
        pod = next(iter(kube.pods(SERVER_NAMESPACE, "app.kubernetes.io/component=shard")))
        kube.core.delete_namespaced_pod(pod["metadata"]["name"], SERVER_NAMESPACE)
        deadline = time.monotonic() + LIMIT_S
        while kube.pvc(SERVER_NAMESPACE, f"space-{NAME}") is not None:
            if time.monotonic() > deadline:
                raise RuntimeError("the offloaded space's claim was not deleted")
            time.sleep(0.2)

        started = time.perf_counter()
        kube.patch_spec(TENANT, NAME, {"state": "Active"})
        served = asyncio.run(_until_served(creds, count))
        reactivate_s = time.perf_counter() - started
    total = offload_s + reactivate_s
    print(
        f"   offload round trip of {count} memories x {DIM}: {total:.1f} s (offload "
        f"{offload_s:.1f} s, back to Active and serving {reactivate_s:.1f} s, {served} "
        f"memories served; load average {os.getloadavg()[0]:.1f})",
        flush=True,
    )
    results["offload_roundtrip_s"] = {
        "total": round(total, 2),
        "offload_s": round(offload_s, 2),
        "reactivate_s": round(reactivate_s, 2),
        "memories": count,
    }


def _wait(kube: Kube, kind: str, status: str, reason: str | None = None) -> None:
    deadline = time.monotonic() + LIMIT_S
    while True:
        found = condition(kube.space(TENANT, NAME), kind)
        if found.get("status") == status and (reason is None or found.get("reason") == reason):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{NAME}: no {kind}={status} {reason or ''}: {found}")
        time.sleep(0.1)


async def _fill(creds: client.Credentials, count: int) -> None:
    rng = np.random.default_rng(7)
    async with client.connect(creds) as memspace:
        for start in range(0, count, BATCH):
            size = min(BATCH, count - start)
            vectors = rng.standard_normal((size, DIM), dtype=np.float32)
            await memspace.remember_batch([f"memory {start + i}" for i in range(size)], vectors)


async def _until_served(creds: client.Credentials, count: int) -> int:
    """Poll until the space answers a Recall and reports every memory (Health through the
    tenant's token); the number it reports."""
    cue = [1.0] + [0.0] * (DIM - 1)
    deadline = time.monotonic() + LIMIT_S
    async with client.connect(creds) as memspace:
        while True:
            try:
                await memspace.recall(cue, k=1)
                health = await memspace.health()
            except grpc.aio.AioRpcError as err:
                if err.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.PERMISSION_DENIED,
                ):
                    raise
            else:
                memories = health.spaces[0].memories if health.spaces else None
                if memories == count:
                    return count
            if time.monotonic() > deadline:
                raise RuntimeError("the space did not serve again in time")
            await asyncio.sleep(0.05)
