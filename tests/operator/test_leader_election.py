"""Leader election (memspace_operator.electing) against the real API server: replicas of the
operator racing for one Lease, a leader that stops renewing, one that releases it, and one that
can no longer reach the API server. Short timings keep it quick; the rules are the same."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import AsyncIterator

import kubernetes.client
import kubernetes.config
import pytest

from memspace_operator import electing, kube
from tests.support import cluster as harness

pytestmark = pytest.mark.cluster

TIMING = electing.Timing(duration_s=6, renew_deadline_s=4.0, retry_period_s=2.0)
SLACK_S = 1.5
"""What a takeover may add to the lease duration: a read, a write (an etcd commit), the event
loop's wake-up, on a loaded machine. Less than a retry period, so that a takeover a poll period
late still fails the test."""


@contextlib.asynccontextmanager
async def client(cluster: harness.Cluster) -> AsyncIterator[kube.Kube]:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(cluster.kubeconfig), client_configuration=configuration
    )
    opened = await kube.Kube.open(concurrency=4, configuration=configuration)
    try:
        yield opened
    finally:
        await opened.close()


def renewed(lease: dict[str, object]) -> float:
    """The Lease's renewTime, as seconds since the epoch."""
    spec = lease["spec"]
    assert isinstance(spec, dict)
    stamp = datetime.datetime.strptime(str(spec["renewTime"]), "%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.replace(tzinfo=datetime.UTC).timestamp()


async def holder(client: kube.Kube, namespace: str, name: str = "memspace-operator") -> str:
    lease = await client.get(kube.leases(namespace, name))
    return electing.Record.of(lease).holder


async def test_of_replicas_racing_for_the_lease_exactly_one_leads(
    cluster: harness.Cluster, namespace: str
) -> None:
    async with client(cluster) as api:
        electors = [
            electing.Elector(api, namespace, "memspace-operator", f"replica-{i}", TIMING)
            for i in range(5)
        ]
        tasks = [asyncio.create_task(e.acquire()) for e in electors]
        done, pending = await asyncio.wait(tasks, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        assert done, "no replica took the Lease"
        # The others read it (each at least once) before the checks below.
        deadline = asyncio.get_running_loop().time() + 60
        while not all(e.leader for e in electors):
            assert asyncio.get_running_loop().time() < deadline, "a replica never read the Lease"
            await asyncio.sleep(0.1)
        leaders = [e for e in electors if e.leading]
        assert len(done) == 1
        assert len(leaders) == 1, [e.identity for e in leaders]
        (leader,) = leaders
        assert await holder(api, namespace) == leader.identity
        assert all(e.leader == leader.identity for e in electors)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        lease = await api.get(kube.leases(namespace, "memspace-operator"))
        assert lease["spec"]["leaseDurationSeconds"] == TIMING.duration_s
        assert lease["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "memspace-operator"


async def test_a_standby_takes_over_a_lease_duration_after_the_last_renewal(
    cluster: harness.Cluster, namespace: str
) -> None:
    async with client(cluster) as api:
        leader = electing.Elector(api, namespace, "memspace-operator", "leader", TIMING)
        standby = electing.Elector(api, namespace, "memspace-operator", "standby", TIMING)
        await leader.acquire()
        keeping = asyncio.create_task(leader.keep())
        waiting = asyncio.create_task(standby.acquire())
        await asyncio.sleep(TIMING.duration_s * 2)  # renewed all along: no takeover
        assert not waiting.done()
        assert not keeping.done()
        assert await holder(api, namespace) == "leader"

        # The leader dies (no release): its last renewal is the one the Lease holds.
        keeping.cancel()
        await asyncio.gather(keeping, return_exceptions=True)
        lease = await api.get(kube.leases(namespace, "memspace-operator"))
        await asyncio.wait_for(waiting, TIMING.duration_s * 3)
        took_s = time.time() - renewed(lease)
        assert standby.leading
        lease = await api.get(kube.leases(namespace, "memspace-operator"))
        assert lease["spec"]["holderIdentity"] == "standby"
        assert lease["spec"]["leaseTransitions"] == 1
        # Not before the lease ran out, and not a poll period or more later.
        assert TIMING.duration_s - 0.1 <= took_s <= TIMING.duration_s + SLACK_S, took_s


async def test_a_released_lease_is_taken_at_once(cluster: harness.Cluster, namespace: str) -> None:
    async with client(cluster) as api:
        leader = electing.Elector(api, namespace, "memspace-operator", "leader", TIMING)
        standby = electing.Elector(api, namespace, "memspace-operator", "standby", TIMING)
        await leader.acquire()
        waiting = asyncio.create_task(standby.acquire())
        await asyncio.sleep(TIMING.retry_period_s * 2)
        loop = asyncio.get_running_loop()
        released = loop.time()
        await leader.release()
        assert not leader.leading
        await asyncio.wait_for(waiting, TIMING.duration_s)
        assert loop.time() - released <= TIMING.retry_period_s + SLACK_S
        assert await holder(api, namespace) == "standby"


async def test_a_leader_whose_lease_is_taken_steps_down_at_its_next_renewal(
    cluster: harness.Cluster, namespace: str
) -> None:
    async with client(cluster) as api:
        leader = electing.Elector(api, namespace, "memspace-operator", "leader", TIMING)
        await leader.acquire()
        keeping = asyncio.create_task(leader.keep())
        url = kube.leases(namespace, "memspace-operator")
        lease = await api.get(url)
        lease["spec"]["holderIdentity"] = "intruder"
        await api.replace(url, lease)
        await asyncio.wait_for(keeping, TIMING.retry_period_s * 4)
        assert not leader.leading
        assert leader.leader == "intruder"
        await leader.release()  # no longer its own: left alone
        assert await holder(api, namespace) == "intruder"


async def test_a_leader_cut_off_from_the_api_steps_down_before_a_standby_may_take_over(
    cluster: harness.Cluster, namespace: str
) -> None:
    async with client(cluster) as api:
        leader = electing.Elector(api, namespace, "memspace-operator", "leader", TIMING)
        await leader.acquire()
        # From now on its requests go nowhere (a closed loopback port).
        configuration = kubernetes.client.Configuration()
        configuration.host = "http://127.0.0.1:9"
        cut_off = await kube.Kube.open(configuration=configuration)
        try:
            leader._kube = cut_off
            lease = await api.get(kube.leases(namespace, "memspace-operator"))
            keeping = asyncio.create_task(leader.keep())
            await asyncio.wait_for(keeping, TIMING.duration_s * 2)
            stepped_down = time.time() - renewed(lease)
        finally:
            await cut_off.close()
        assert not leader.leading
        # It stopped at its renew deadline, before the lease ran out for anyone else.
        assert TIMING.renew_deadline_s - 0.1 <= stepped_down < TIMING.duration_s, stepped_down
