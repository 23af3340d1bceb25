"""State changes take effect at once: the operator hands each changed index entry to its shard
(ApplyIndexEntry) instead of waiting for the kubelet to project the index Secret (about once a
minute on a real node). Here the stand-in kubelet's projection is stopped for the change, so
only the direct call can bring it; Ready, Inactive and a deletion follow what the shard
confirmed, so a client sees the new state as soon as the status says so."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import grpc
import pytest

from memspace_contract import client
from tests.operator.conftest import Deployment, condition, tenant_credentials, wait_for
from tests.operator.kubelet import FakeKubelet

pytestmark = pytest.mark.cluster

DIM = 4
CUE = [1.0, 0.0, 0.0, 0.0]


async def recall_code(creds: client.Credentials) -> grpc.StatusCode:
    async with client.connect(creds) as memspace:
        try:
            await memspace.recall(CUE, k=1)
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def projected_state(kubelet: FakeKubelet, name: str) -> str:
    return str(json.loads((kubelet.shards[0].index / f"{name}.json").read_text())["state"])


async def test_inactive_and_active_take_effect_when_ready_says_so_without_the_projection(
    deployment: Deployment, kubelet: FakeKubelet
) -> None:
    with deployment.running():
        deployment.apply("sleepy", embeddingDim=DIM)
        await asyncio.to_thread(deployment.wait_condition, "sleepy", "Ready", "True")
        creds = tenant_credentials(
            deployment.kube, deployment.namespace, "sleepy", deployment.server_namespace
        )
        async with client.connect(creds) as memspace:
            await memspace.remember("remember me", CUE)
        kubelet.project_index = False  # from here on only the operator's call reaches the shard
        starts = kubelet.shards[0].starts

        deployment.kube.patch_spec(deployment.namespace, "sleepy", {"state": "Inactive"})
        body = await asyncio.to_thread(
            deployment.wait_condition, "sleepy", "Ready", "False", "Inactive"
        )
        # Ready says Inactive only once the shard confirmed it: the very next call is refused.
        assert await recall_code(creds) is grpc.StatusCode.FAILED_PRECONDITION
        assert body["status"]["indexGeneration"] == body["metadata"]["generation"]
        assert projected_state(kubelet, "sleepy") == "Active"  # the projection never came

        deployment.kube.patch_spec(deployment.namespace, "sleepy", {"state": "Active"})
        body = await asyncio.to_thread(deployment.wait_condition, "sleepy", "Ready", "True")
        assert await recall_code(creds) is grpc.StatusCode.OK
        async with client.connect(creds) as memspace:
            hits = await memspace.recall(CUE, k=1)
        assert [hit.memory.content for hit in hits] == ["remember me"]
        assert body["status"]["indexGeneration"] == body["metadata"]["generation"]
        assert kubelet.shards[0].starts == starts


async def test_a_deleted_space_is_refused_while_the_node_does_nothing(
    deployment: Deployment, kubelet: FakeKubelet
) -> None:
    with deployment.running():
        deployment.apply("leaving", embeddingDim=DIM)
        await asyncio.to_thread(deployment.wait_condition, "leaving", "Ready", "True")
        creds = tenant_credentials(
            deployment.kube, deployment.namespace, "leaving", deployment.server_namespace
        )
        assert await recall_code(creds) is grpc.StatusCode.OK
        # No projection and no restart: the shard keeps running with the volume and the index
        # it has. Only the operator's call can make it stop serving the space.
        kubelet.paused = True
        deployment.kube.delete_space(deployment.namespace, "leaving")

        async def refused() -> bool:
            return await recall_code(creds) is grpc.StatusCode.PERMISSION_DENIED

        await wait_until("the shard to refuse the deleted space", refused)
        assert projected_state(kubelet, "leaving") == "Active"
        kubelet.paused = False
        await asyncio.to_thread(deployment.wait_gone, "leaving")


async def test_a_shard_that_cannot_be_told_keeps_ready_false_until_its_health_confirms(
    deployment: Deployment, kubelet: FakeKubelet
) -> None:
    with deployment.running():
        deployment.apply("later", embeddingDim=DIM)
        await asyncio.to_thread(deployment.wait_condition, "later", "Ready", "True")
        shard = kubelet.shards[0]
        kubelet.paused = True
        shard.stop()  # the shard is down: the direct call fails
        deployment.kube.patch_spec(deployment.namespace, "later", {"state": "Inactive"})
        body = await asyncio.to_thread(
            deployment.wait_condition, "later", "Ready", "False", "Deactivating"
        )
        assert "has not yet confirmed" in condition(body, "Ready")["message"]
        # The shard comes back and reads the index Secret (as a restarted pod does): its
        # Health reports the new generation, which turns Ready into the confirmed Inactive.
        kubelet.paused = False
        await asyncio.to_thread(deployment.wait_condition, "later", "Ready", "False", "Inactive")
        await asyncio.to_thread(
            wait_for, "the shard to run again", lambda: shard.process is not None
        )


async def wait_until(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(120):
        if await check():
            return
        await asyncio.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}")
