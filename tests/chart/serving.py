"""A space served end to end through an installed chart: the same steps on the local control
plane (operator out of cluster, shards as local processes) and on kind (hack/e2e-kind.sh: the
image's operator and shards as pods, reached through a port-forward).

Apply a MemorySpace, wait for VolumeBound and Ready, store and recall with nothing but its
credentials Secret, check another token is refused, delete it, check everything is cleaned up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import secrets
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from memspace_contract import client
from tests.operator.conftest import Kube, condition, memory_space, wait_for
from tests.support import cluster as harness

DIM = 4
Reach = Callable[[client.Credentials], AbstractAsyncContextManager[client.Credentials]]
"""How the test reaches the endpoint of a credentials Secret: the same credentials with an
endpoint this process can dial."""
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Space:
    kube: Kube
    server_namespace: str
    namespace: str
    name: str

    def body(self) -> dict[str, Any] | None:
        return self.kube.space(self.namespace, self.name)

    def wait_condition(self, kind: str, status: str, timeout: float) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            body = self.body()
            return body if condition(body, kind).get("status") == status else None

        return wait_for(f"{self.name}: {kind}={status}", probe, timeout, interval=0.5)

    def index(self, shard: int) -> Mapping[str, str]:
        return self.kube.secret(self.server_namespace, f"memspace-shard-{shard}-spaces") or {}


def credentials_from(
    secret: Mapping[str, str], server_namespace: str, shard: int
) -> client.Credentials:
    """What a tenant makes of its Secret: TLS with its `ca.crt`, checked for the shard Service's
    name (the endpoint may be a port-forward or a loopback stand-in here)."""
    ca = secret.get("ca.crt")
    return client.Credentials(
        endpoint=secret["endpoint"],
        space=secret["space"],
        token=secret["token"],
        ca=ca.encode() if ca else None,
        server_name=f"memspace-shard-{shard}.{server_namespace}.svc" if ca else None,
    )


@contextlib.asynccontextmanager
async def directly(credentials: client.Credentials) -> AsyncIterator[client.Credentials]:
    """The endpoint is dialable as it is (shards on loopback)."""
    yield credentials


def port_forward(cluster: harness.Cluster, server_namespace: str) -> Reach:
    """Reach a shard from outside the cluster: `kubectl port-forward svc/memspace-shard-N`."""

    @contextlib.asynccontextmanager
    async def reach(credentials: client.Credentials) -> AsyncIterator[client.Credentials]:
        host, _, port = credentials.endpoint.rpartition(":")
        service = host.split(".", 1)[0]  # memspace-shard-N.<namespace>.svc
        assert re.fullmatch(r"memspace-shard-\d+", service), credentials.endpoint
        process = await asyncio.create_subprocess_exec(
            str(cluster.tools["kubectl"]), f"--kubeconfig={cluster.kubeconfig}",
            "-n", server_namespace, "port-forward", f"service/{service}", f":{port}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            found = re.search(rb"Forwarding from 127\.0\.0\.1:(\d+)", line)
            assert found, f"kubectl port-forward said {line!r}"
            yield dataclasses.replace(credentials, endpoint=f"127.0.0.1:{found.group(1).decode()}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            await process.wait()

    return reach


async def retrying(call: Callable[[], Awaitable[T]], within_s: float) -> T:
    """`call` again while the shard answers UNAVAILABLE (mounting, restarting, loading)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            if asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(1)


async def serve_a_space_end_to_end(
    space: Space,
    reach: Reach,
    wait_s: float = 90,
    on_ready: Callable[[Mapping[str, Any], Mapping[str, str]], None] | None = None,
) -> None:
    """The whole life of one space through the installed chart; `wait_s` bounds each wait.
    `on_ready(status, secret)` runs once the space is Ready, with its credentials Secret."""
    timeout = wait_s
    kube = space.kube
    kube.apply(
        memory_space(
            space.name,
            space.namespace,
            embeddingDim=DIM,
            storage={"size": "1Gi", "reclaimPolicy": "Delete"},
        )
    )
    body = await asyncio.to_thread(space.wait_condition, "VolumeBound", "True", timeout)
    assert condition(body, "VolumeBound")["reason"] == "Bound"
    body = await asyncio.to_thread(space.wait_condition, "Ready", "True", timeout)
    status = body["status"]
    shard = status["shard"]
    assert status["claimName"] == f"space-{space.name}"
    assert status["credentialsSecret"] == f"{space.name}-memspace"

    secret = kube.secret(space.namespace, status["credentialsSecret"])
    assert secret is not None
    assert set(secret) == {"space", "endpoint", "token", "ca.crt"}  # the chart's default: TLS
    if on_ready is not None:
        on_ready(status, secret)
    assert secret["endpoint"] == status["endpoint"]
    tenant = credentials_from(secret, space.server_namespace, shard)
    async with reach(tenant) as credentials:

        async def store_and_recall() -> list[str]:
            async with client.connect(credentials) as memspace:
                await memspace.remember("the sky is blue", [1.0, 0.0, 0.0, 0.0], memory_id="sky")
                await memspace.remember("grass is green", [0.0, 1.0, 0.0, 0.0], memory_id="grass")
                hits = await memspace.recall([0.9, 0.1, 0.0, 0.0], k=2)
            return [hit.memory.content for hit in hits]

        assert await retrying(store_and_recall, timeout) == ["the sky is blue", "grass is green"]
        plaintext = dataclasses.replace(credentials, secure=False, ca=None, server_name=None)
        async with client.connect(plaintext) as memspace:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await memspace.recall([1.0, 0.0, 0.0, 0.0], k=1)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        stranger = dataclasses.replace(credentials, token=secrets.token_urlsafe(32))
        async with client.connect(stranger) as memspace:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await memspace.recall([1.0, 0.0, 0.0, 0.0], k=1)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

    kube.delete_space(space.namespace, space.name)
    await asyncio.to_thread(
        wait_for, f"{space.name} to be deleted", lambda: space.body() is None, timeout
    )
    assert kube.secret(space.namespace, f"{space.name}-memspace") is None
    await asyncio.to_thread(
        wait_for,
        "the space's claim to be deleted (reclaimPolicy Delete)",
        lambda: kube.pvc(space.server_namespace, f"space-{space.name}") is None,
        timeout,
    )
    assert f"{space.name}.json" not in space.index(shard)


def check_notes(notes: str, server_namespace: str) -> None:
    """The install's NOTES tell how to create a first space and read its credentials."""
    assert "kind: MemorySpace" in notes
    assert "kubectl -n team-a wait memoryspace/notes --for=condition=Ready" in notes
    assert "kubectl label namespace team-a memspace.dev/client=true" in notes
    assert "unique in the whole cluster" in notes
    # The space, token and shard are read, never assumed (notes_variables runs these lines).
    assert "notes" not in notes.split("x-memory-space:", 1)[1].split("\n", 1)[0]
    assert f"kubectl -n {server_namespace} port-forward svc/memspace-shard-$SHARD" in notes
    # TLS by default: the CA comes from the Secret, and the shard's name is checked.
    assert "jsonpath='{.data.ca\\.crt}' | base64 -d > ca.crt" in notes
    assert (
        f"grpcurl -cacert ca.crt -servername memspace-shard-$SHARD.{server_namespace}.svc" in notes
    )
    assert "docs/troubleshooting.md" in notes


NOTES_VARIABLES = ("SPACE", "TOKEN", "SHARD")


def notes_variables(
    notes: str, namespace: str, name: str, kubectl: Path, kubeconfig: Path
) -> dict[str, str]:
    """Run the NOTES' lines that read a space's ID, token and shard (written for MemorySpace
    `notes` in `team-a`) for the MemorySpace `name` in `namespace`, as a user would in bash."""
    lines = [
        line.strip()
        for line in notes.splitlines()
        if line.strip().startswith(tuple(f"{v}=$(" for v in NOTES_VARIABLES))
    ]
    assert len(lines) == len(NOTES_VARIABLES), notes
    script = "\n".join(
        line.replace("-n team-a ", f"-n {namespace} ")
        .replace("notes-memspace", f"{name}-memspace")
        .replace("msp notes ", f"msp {name} ")
        for line in lines
    )
    script += "\n" + "\n".join(f'echo "{v}=${v}"' for v in NOTES_VARIABLES)
    ran = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={**os.environ, "PATH": f"{kubectl.parent}:{os.environ['PATH']}",
             "KUBECONFIG": str(kubeconfig)},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return dict(line.split("=", 1) for line in ran.stdout.splitlines())


def e2e_image() -> tuple[str, str] | None:
    """The image hack/e2e-kind.sh built and loaded (MEMSPACE_E2E_IMAGE, repository:tag)."""
    image = os.environ.get("MEMSPACE_E2E_IMAGE", "")
    repository, _, tag = image.rpartition(":")
    if not repository or "/" in tag:
        return None
    return repository, tag


def e2e_storage_class() -> str:
    """A StorageClass whose volumes a non-root pod can write: kind's local-path `standard`."""
    return os.environ.get("MEMSPACE_E2E_STORAGE_CLASS", "standard")
