"""End to end: the operator, real server shards (local `memspace serve` processes on the
projected index and the linked volumes) and a client that has only the credentials Secret."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import grpc
import pytest

from memspace_contract import client
from memspace_contract.v1 import memspace_pb2 as pb
from tests.operator.conftest import Deployment, tenant_credentials, wait_for
from tests.operator.kubelet import FakeKubelet

pytestmark = pytest.mark.cluster

DIM = 4
IDLE_S = 3.0
"""Six health rounds at MEMSPACE_HEALTH_INTERVAL=0.5."""


def credentials(deployment: Deployment, name: str) -> client.Credentials:
    return tenant_credentials(
        deployment.kube, deployment.namespace, name, deployment.server_namespace
    )


def version(deployment: Deployment, name: str) -> str:
    return str((deployment.space(name) or {})["metadata"]["resourceVersion"])


def status(deployment: Deployment, name: str) -> dict[str, Any]:
    return dict((deployment.space(name) or {}).get("status") or {})


async def test_a_client_with_only_its_secret_stores_and_recalls_and_status_follows(
    deployment: Deployment, kubelet: FakeKubelet
) -> None:
    with deployment.running():
        deployment.apply("alpha", embeddingDim=DIM, tiers={"hotCapacity": 10})
        deployment.apply("beta", embeddingDim=DIM)
        for name in ("alpha", "beta"):
            await asyncio.to_thread(deployment.wait_condition, name, "Ready", "True", "Ready")
        body = deployment.space("alpha") or {}
        assert body["status"]["memories"] == 0

        alpha = credentials(deployment, "alpha")
        async with client.connect(alpha) as memspace:
            sky = await memspace.remember("the sky is blue", [1.0, 0.0, 0.0, 0.0])
            await memspace.remember("grass is green", [0.0, 1.0, 0.0, 0.0])
            await memspace.remember("the sea is blue too", [0.9, 0.1, 0.0, 0.0])
            hits = await memspace.recall([1.0, 0.0, 0.0, 0.0], k=2)
        assert [hit.memory.content for hit in hits] == ["the sky is blue", "the sea is blue too"]
        assert hits[0].memory.id == sky.id

        # Another space's token does not open this space, whether asked by header or field.
        stranger = dataclasses.replace(alpha, token=credentials(deployment, "beta").token)
        async with client.connect(stranger) as memspace:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await memspace.recall([1.0, 0.0, 0.0, 0.0], k=1)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # beta is empty and stays so.
        async with client.connect(credentials(deployment, "beta")) as memspace:
            assert await memspace.recall([1.0, 0.0, 0.0, 0.0], k=3) == []

        found = await asyncio.to_thread(
            wait_for,
            "status.memories to reach 3",
            lambda: status(deployment, "alpha").get("memories") == 3,
        )
        assert found
        alpha_status = status(deployment, "alpha")
        assert alpha_status["tierMemories"]["hot"] == 3
        assert alpha_status["pressure"] == pytest.approx(0.3)
        assert alpha_status["lastHealthTime"]
        assert status(deployment, "beta")["memories"] == 0

        # At rest nothing is written, though every shard is asked for health twice a second.
        async with client.connect(alpha) as memspace:
            await memspace.memories.Consolidate(pb.ConsolidateRequest())
        await asyncio.to_thread(
            wait_for, "the WAL lag to show 0", lambda: status(deployment, "alpha")["walLagMs"] == 0
        )
        assert "walOldestRecordTime" not in status(deployment, "alpha")  # WAL-Lag shows empty
        before = {name: version(deployment, name) for name in ("alpha", "beta")}
        await asyncio.sleep(IDLE_S)
        assert {name: version(deployment, name) for name in ("alpha", "beta")} == before


async def test_inactive_unloads_the_space_and_active_serves_it_again(
    deployment: Deployment, kubelet: FakeKubelet
) -> None:
    with deployment.running():
        deployment.apply("sleepy", embeddingDim=DIM)
        await asyncio.to_thread(deployment.wait_condition, "sleepy", "Ready", "True")
        creds = credentials(deployment, "sleepy")
        async with client.connect(creds) as memspace:
            await memspace.remember("remember me", [1.0, 0.0, 0.0, 0.0])
        starts = kubelet.shards[0].starts

        deployment.kube.patch_spec(deployment.namespace, "sleepy", {"state": "Inactive"})
        await asyncio.to_thread(deployment.wait_condition, "sleepy", "Ready", "False", "Inactive")
        await asyncio.to_thread(
            wait_for,
            "the shard to refuse the Inactive space",
            lambda: deployment.index(0)["sleepy.json"]["state"] == "Inactive",
        )

        async def refused() -> bool:
            async with client.connect(creds) as memspace:
                try:
                    await memspace.recall([1.0, 0.0, 0.0, 0.0], k=1)
                except grpc.aio.AioRpcError as err:
                    return err.code() == grpc.StatusCode.FAILED_PRECONDITION
            return False

        for _ in range(100):
            if await refused():
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("the Inactive space kept serving")

        deployment.kube.patch_spec(deployment.namespace, "sleepy", {"state": "Active"})
        await asyncio.to_thread(deployment.wait_condition, "sleepy", "Ready", "True")
        for _ in range(100):
            try:
                async with client.connect(creds) as memspace:
                    hits = await memspace.recall([1.0, 0.0, 0.0, 0.0], k=1)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
        else:
            pytest.fail("the space did not come back")
        assert [hit.memory.content for hit in hits] == ["remember me"]
        # State changes travel through the index: the shard was never restarted for them.
        assert kubelet.shards[0].starts == starts
