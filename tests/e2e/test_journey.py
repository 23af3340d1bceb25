"""A user's journey with memspace on a real node, as docs/install.md tells it: `helm install` with
the image built from the Dockerfile, MemorySpaces in two tenant namespaces, a client pod in each
calling its shard through the Service's DNS name, then the faults a cluster brings (a shard pod
deleted under write load, the operator killed mid-reconcile, a `helm upgrade` that rolls the
shards), with a ledger of acknowledged writes checked after each: nothing acknowledged is lost.
Then the spaces are deleted (Delete and Retain) and memspace uninstalled, leaving nothing.

Figures (helm install to the first Ready MemorySpace, the whole journey) are printed at the end
and quoted in docs/test-control-plane.md."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    CHART,
    IMAGE_REPOSITORY,
    IMAGE_TAG,
    RELEASE,
    RESTRICTED,
    SYSTEM,
    WAIT_S,
    Journey,
    Manifest,
    condition,
    stop_writers,
    wait_for,
)

pytestmark = pytest.mark.cluster

DIM = 8  # tests/e2e/agent.py's embeddings
TENANTS = {"team-a": "Delete", "team-b": "Retain"}
"""Each tenant's namespace and its space's reclaimPolicy."""
CLIENTS = {"memspace.dev/client": "true"}


def space_id(tenant: str) -> str:
    return f"{tenant}-notes"


def memory_space(tenant: str, name: str, reclaim: str) -> Manifest:
    return {
        "apiVersion": "memspace.dev/v1alpha1",
        "kind": "MemorySpace",
        "metadata": {"name": name, "namespace": tenant},
        "spec": {
            "spaceId": f"{tenant}-{name}",
            "embeddingDim": DIM,
            "storage": {"size": "1Gi", "reclaimPolicy": reclaim},
            "tiers": {"hotCapacity": 1000, "warmCapacity": 10000},
        },
    }


def values(cpu: str = "100m") -> dict[str, Any]:
    """The journey's values: the image from `make image` (never pulled), small requests so that
    everything fits the test node, short intervals so that the journey is quick."""
    return {
        "image": {"repository": IMAGE_REPOSITORY, "tag": IMAGE_TAG, "pullPolicy": "Never"},
        "operator": {
            "healthInterval": 2,
            "resyncInterval": 30,
            "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
        },
        "server": {
            "mountBatchWindow": 2,
            # Shard 0 takes every space of the journey, however slow the machine.
            "intakeWindow": 3600,
            "resources": {"requests": {"cpu": cpu, "memory": "256Mi"}},
        },
        "networkPolicy": {"enabled": True},
    }


@pytest.mark.timeout(1800)
def test_a_user_installs_memspace_uses_it_from_pods_survives_faults_and_uninstalls(
    journey: Journey, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    journey.namespace(SYSTEM, RESTRICTED)
    for tenant in TENANTS:
        journey.namespace(tenant, {**RESTRICTED, **CLIENTS})

    installed = install_and_wait_for_the_first_ready_space(journey)
    tour_both_tenants(journey)
    tenants_are_refused_each_other_s_space(journey)
    kubectl_shows_the_spaces(journey)
    no_memspace_container_crashed(journey)
    ledger = a_shard_pod_deleted_under_write_load_loses_nothing(journey)
    ledger += a_node_drain_evicts_the_shard_within_its_budget_and_loses_nothing(journey)
    ledger += the_operator_killed_mid_reconcile_converges(journey)
    ledger += helm_upgrade_rolls_the_shards_and_loses_nothing(journey)
    an_inactive_space_is_refused_and_comes_back_without_a_shard_restart(journey, ledger)
    ledger += uninstalled_the_shards_keep_serving_and_a_reinstall_resumes(journey)
    for tenant in TENANTS:
        verify(journey, tenant, [i for i in ledger if i.startswith(tenant)])
    no_memspace_container_crashed(journey)
    deleting_the_spaces_does_what_their_reclaim_policy_says(journey)
    uninstalling_as_the_docs_say_leaves_nothing_behind(journey, installed)

    journey.figures["journey_s"] = time.monotonic() - started
    with capsys.disabled():
        print(f"\njourney figures: {json.dumps(journey.figures)}")


# -- install ---------------------------------------------------------------------------------------


def install_and_wait_for_the_first_ready_space(journey: Journey) -> dict[str, Any]:
    """helm install, then a MemorySpace in each tenant namespace, as docs/install.md says."""
    path = journey.write_values(values())
    before = time.monotonic()
    result = journey.helm("install", RELEASE, str(CHART), "-n", SYSTEM, "-f", str(path))
    assert "STATUS: deployed" in result.stdout
    journey.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "customresourcedefinition/memoryspaces.memspace.dev",
    )  # fmt: skip
    journey.apply(*(memory_space(t, "notes", reclaim) for t, reclaim in TENANTS.items()))

    def first_ready() -> str | None:
        for tenant in TENANTS:
            if condition(journey.space(tenant, "notes"), "Ready").get("status") == "True":
                return tenant
        return None

    wait_for("a first Ready MemorySpace", first_ready, interval=0.25)
    journey.figures["helm_install_to_first_ready_s"] = time.monotonic() - before
    spaces = {t: journey.wait_condition(t, "notes", "Ready", "True") for t in TENANTS}
    journey.figures["helm_install_to_all_ready_s"] = time.monotonic() - before
    for tenant, body in spaces.items():
        status = body["status"]
        assert status["spaceId"] == space_id(tenant)
        assert status["endpoint"] == f"memspace-shard-{status['shard']}.{SYSTEM}.svc:50051"
        assert condition(body, "VolumeBound")["status"] == "True"
        assert condition(body, "Mounted")["status"] == "True"
        secret = journey.secret(tenant, "notes-memspace")
        assert secret is not None
        assert secret["space"] == space_id(tenant)
        assert secret["endpoint"] == status["endpoint"]
        journey.agent_pod(tenant, "notes-memspace")
    for tenant in TENANTS:
        journey.wait_pod_ready(tenant, "agent")
    # The shard runs the image with the chart's restrictions, its volumes really mounted.
    pod = journey.shard_pod()
    assert pod is not None
    assert pod["spec"]["containers"][0]["image"] == f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"
    claims = {v["persistentVolumeClaim"]["claimName"] for v in mounted_claims(pod)}
    assert claims == {f"space-{space_id(t)}" for t in TENANTS}
    return {"pvs": {t: pv_of(journey, t) for t in TENANTS}}


def mounted_claims(pod: Manifest) -> list[dict[str, Any]]:
    return [v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]


def host_path(pv: Manifest) -> Path:
    """Where the volume's data is on the node (local-path: a directory of the host)."""
    spec = pv["spec"]
    return Path((spec.get("hostPath") or spec.get("local"))["path"])


def pv_of(journey: Journey, tenant: str) -> Manifest:
    pvc = journey.get("pvc", f"space-{space_id(tenant)}", SYSTEM)
    assert pvc is not None
    assert pvc["status"]["phase"] == "Bound"
    pv = journey.get("pv", pvc["spec"]["volumeName"])
    assert pv is not None
    return pv


# -- a tenant's day --------------------------------------------------------------------------------


def tour_both_tenants(journey: Journey) -> None:
    """Both tenants at once (same shard): each sees its own memories and events, nothing else."""
    import concurrent.futures  # noqa: PLC0415

    with concurrent.futures.ThreadPoolExecutor(len(TENANTS)) as pool:
        tours = dict(
            zip(TENANTS, pool.map(lambda t: journey.agent(t, "tour"), TENANTS), strict=True)
        )
    for tenant, found in tours.items():
        (tour,) = found
        own = space_id(tenant)
        assert tour["space"] == own
        assert tour["endpoint"].startswith("memspace-shard-")
        # TLS when the credentials Secret carries the shards' CA (chart tls.enabled).
        secret = journey.secret(tenant, "notes-memspace") or {}
        assert tour["secure"] == ("ca.crt" in secret)
        assert tour["remembered"] == [f"{own}-0", f"{own}-1", f"{own}-2"]
        assert tour["recalled"][0] == "the sky is blue"
        assert tour["got"] == "grass is green"
        assert tour["forgotten"] is True
        assert tour["after_forget"] == "NOT_FOUND"
        events = tour["events"]
        assert {event["space"] for event in events} == {own}
        assert [(e["type"], e["id"]) for e in events] == [
            ("EVENT_TYPE_REMEMBERED", f"{own}-0"),
            ("EVENT_TYPE_REMEMBERED", f"{own}-1"),
            ("EVENT_TYPE_REMEMBERED", f"{own}-2"),
            ("EVENT_TYPE_FORGOTTEN", f"{own}-2"),
        ]
        lsns = [event["lsn"] for event in events]
        assert lsns == sorted(lsns)


def tenants_are_refused_each_other_s_space(journey: Journey) -> None:
    tenants = list(TENANTS)
    for tenant, other in zip(tenants, reversed(tenants), strict=True):
        token = journey.secret(other, "notes-memspace")
        assert token is not None
        (codes,) = journey.agent(tenant, "trespass", space_id(other), input=token["token"])
        assert codes == {
            "own_token_other_space": "PERMISSION_DENIED",
            "other_token_own_space": "PERMISSION_DENIED",
        }


def kubectl_shows_the_spaces(journey: Journey) -> None:
    """`kubectl get msp` has the printer columns (with the memories the tours left: 2 each),
    `kubectl describe` the operator's Events."""

    def listing() -> str | None:
        shown = journey.kubectl("get", "msp", "-A").stdout
        rows = [line.split() for line in shown.splitlines()]
        ours = [row for row in rows[1:] if row[1] == "notes"]
        return shown if len(ours) == 2 and all(row[5] == "2" for row in ours) else None

    shown = wait_for("kubectl get msp to show 2 memories per space", listing)
    header = shown.splitlines()[0].split()
    assert header == [
        "NAMESPACE", "NAME", "SPACEID", "READY", "REASON", "MEMORIES", "PRESSURE", "WAL-LAG", "AGE"
    ]  # fmt: skip
    for row in (line.split() for line in shown.splitlines()[1:]):
        assert row[2] == space_id(row[0])
        assert row[3:5] == ["True", "Ready"]
    described = journey.kubectl("describe", "msp", "notes", "-n", "team-a").stdout
    events = described.split("Events:", 1)[1]
    for reason in ("ClaimCreated", "CredentialsCreated", "Mounted"):
        assert re.search(rf"Normal\s+{reason}\s", events), described


def no_memspace_container_crashed(journey: Journey) -> None:
    """No shard or operator container was restarted by its kubelet (no CrashLoopBackOff)."""
    assert journey.back_offs() == []
    assert {name: n for name, n in journey.restarts().items() if n} == {}


# -- faults ----------------------------------------------------------------------------------------


def verify(journey: Journey, tenant: str, ledger: list[str]) -> None:
    """Every acknowledged write of the tenant's ledger is there, read back from its pod."""
    (found,) = journey.agent(tenant, "verify", input=json.dumps(ledger))
    assert found == {"checked": len(ledger), "missing": []}


def a_shard_pod_deleted_under_write_load_loses_nothing(journey: Journey) -> list[str]:
    before = journey.shard_pod()
    assert before is not None
    writers = {t: journey.writer(t, f"{t}-pod-deleted") for t in TENANTS}
    try:
        for writer in writers.values():
            writer.wait_acks(20)
        deleted_at = time.time()
        journey.kubectl("delete", "pod", "memspace-shard-0-0", "-n", SYSTEM, "--wait=false")
        after = journey.wait_pod_ready(SYSTEM, "memspace-shard-0-0", before["metadata"]["uid"])
        journey.figures["shard_pod_deleted_to_ready_s"] = time.time() - deleted_at
        # The StatefulSet made a new pod with the same volumes, mounted again.
        assert {v["persistentVolumeClaim"]["claimName"] for v in mounted_claims(after)} == {
            v["persistentVolumeClaim"]["claimName"] for v in mounted_claims(before)
        }
        for writer in writers.values():
            writer.wait_acks(20, since=time.time())
    finally:
        ledgers = stop_writers(writers)
    for tenant, writer in writers.items():
        # The client saw the shard go (UNAVAILABLE while it drained and restarted) and came back.
        assert writer.errors, f"{tenant}'s writer never noticed the shard restart"
        assert writer.acks_since(deleted_at) >= 20
        verify(journey, tenant, ledgers[tenant])
    return [i for ledger in ledgers.values() for i in ledger]


def a_node_drain_evicts_the_shard_within_its_budget_and_loses_nothing(
    journey: Journey,
) -> list[str]:
    """`kubectl drain` of the node (the shards only): the eviction goes through the chart's
    PodDisruptionBudget, the shard drains gracefully; uncordoned, it comes back with its
    volumes and every acknowledged write."""
    node = journey.items("node")[0]["metadata"]["name"]
    before = journey.shard_pod()
    assert before is not None
    writers = {t: journey.writer(t, f"{t}-drained") for t in TENANTS}
    try:
        for writer in writers.values():
            writer.wait_acks(10)
        drained = journey.kubectl(
            "drain", node, "--pod-selector=app.kubernetes.io/component=shard",
            "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=180s", timeout=240,
        )  # fmt: skip
        assert "pod/memspace-shard-0-0 evicted" in drained.stdout + drained.stderr
        journey.kubectl("uncordon", node)
        journey.wait_pod_ready(SYSTEM, "memspace-shard-0-0", before["metadata"]["uid"])
        for writer in writers.values():
            writer.wait_acks(10, since=time.time())
    finally:
        journey.kubectl("uncordon", node, check=False)
        ledgers = stop_writers(writers)
    for tenant in TENANTS:
        verify(journey, tenant, ledgers[tenant])
    return [i for ledger in ledgers.values() for i in ledger]


def operator_pod(journey: Journey) -> Manifest:
    """The leading operator pod: the one its Lease names (holderIdentity `<pod>_<random>`); the
    chart runs two replicas, the other stands by."""

    def leader() -> Manifest | None:
        lease = journey.get("lease", "memspace-operator", SYSTEM)
        holder = str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")
        pod = journey.get("pod", holder.rpartition("_")[0], SYSTEM) if holder else None
        return pod if pod is not None and not pod["metadata"].get("deletionTimestamp") else None

    return wait_for("an operator pod to lead", leader)


def the_operator_killed_mid_reconcile_converges(journey: Journey) -> list[str]:
    """A new space in team-a; the leading operator pod is killed (no grace) while it makes the
    space's children; the standby takes over and finishes the job. team-a writes meanwhile: the
    new space's mount restarts the shard."""
    killed = operator_pod(journey)
    writer = journey.writer("team-a", "team-a-operator-killed")
    try:
        writer.wait_acks(10)
        journey.apply(memory_space("team-a", "extra", "Delete"))
        wait_for(
            "the operator to start on team-a/extra",
            lambda: (journey.space("team-a", "extra") or {}).get("status"),
            interval=0.1,
        )
        assert condition(journey.space("team-a", "extra"), "Ready").get("status") != "True"
        journey.kubectl(
            "delete", "pod", killed["metadata"]["name"], "-n", SYSTEM,
            "--grace-period=0", "--force",
        )  # fmt: skip
        body = journey.wait_condition("team-a", "extra", "Ready", "True")
        assert operator_pod(journey)["metadata"]["uid"] != killed["metadata"]["uid"]
        assert body["status"]["shard"] == 0
        assert journey.secret("team-a", "extra-memspace") is not None
        index = journey.secret(SYSTEM, "memspace-shard-0-spaces") or {}
        assert set(index) == {f"{space_id(t)}.json" for t in TENANTS} | {"team-a-extra.json"}
        pod = journey.wait_pod_ready(SYSTEM, "memspace-shard-0-0")
        assert "space-team-a-extra" in {
            v["persistentVolumeClaim"]["claimName"] for v in mounted_claims(pod)
        }
        writer.wait_acks(10, since=time.time())
    finally:
        ledger = stop_writers({"team-a": writer})["team-a"]
    verify(journey, "team-a", ledger)
    return ledger


def helm_upgrade_rolls_the_shards_and_loses_nothing(journey: Journey) -> list[str]:
    """A new server.resources value: the operator restarts with it and rolls every shard."""
    before = journey.shard_pod()
    operator_before = operator_pod(journey)
    assert before is not None
    writers = {t: journey.writer(t, f"{t}-upgrade") for t in TENANTS}
    try:
        for writer in writers.values():
            writer.wait_acks(10)
        path = journey.write_values(values(cpu="150m"))
        upgraded_at = time.time()
        result = journey.helm("upgrade", RELEASE, str(CHART), "-n", SYSTEM, "-f", str(path))
        assert "STATUS: deployed" in result.stdout

        def rolled() -> Manifest | None:
            pod = journey.shard_pod()
            if pod is None or pod["metadata"]["uid"] == before["metadata"]["uid"]:
                return None
            requests = pod["spec"]["containers"][0].get("resources", {}).get("requests", {})
            return pod if requests.get("cpu") == "150m" else None

        wait_for("the shard to roll with the new resources", rolled)
        journey.wait_pod_ready(SYSTEM, "memspace-shard-0-0", before["metadata"]["uid"])
        journey.figures["helm_upgrade_to_shard_ready_s"] = time.time() - upgraded_at
        assert operator_pod(journey)["metadata"]["uid"] != operator_before["metadata"]["uid"]
        for writer in writers.values():
            writer.wait_acks(10, since=time.time())
    finally:
        ledgers = stop_writers(writers)
    for tenant in TENANTS:
        verify(journey, tenant, ledgers[tenant])
    for tenant in TENANTS:
        journey.wait_condition(tenant, "notes", "Ready", "True")
    return [i for ledger in ledgers.values() for i in ledger]


def probe(journey: Journey, tenant: str) -> str:
    (answer,) = journey.agent(tenant, "probe")
    return str(answer["code"])


def an_inactive_space_is_refused_and_comes_back_without_a_shard_restart(
    journey: Journey, ledger: list[str]
) -> None:
    """State changes travel through the index, never through a shard restart."""
    pod = journey.shard_pod()
    assert pod is not None
    journey.kubectl(
        "patch",
        "msp",
        "notes",
        "-n",
        "team-b",
        "--type=merge",
        "-p",
        '{"spec":{"state":"Inactive"}}',
    )
    # Deactivating until the shard confirms the index entry, then Inactive (statuses.py).
    journey.wait_condition("team-b", "notes", "Ready", "False", reason="Inactive")
    wait_for(
        "team-b's space to be refused", lambda: probe(journey, "team-b") == "FAILED_PRECONDITION"
    )
    assert probe(journey, "team-a") == "OK"
    journey.kubectl(
        "patch", "msp", "notes", "-n", "team-b", "--type=merge", "-p", '{"spec":{"state":"Active"}}'
    )
    journey.wait_condition("team-b", "notes", "Ready", "True")
    wait_for("team-b's space to serve again", lambda: probe(journey, "team-b") == "OK")
    verify(journey, "team-b", [i for i in ledger if i.startswith("team-b")])
    after = journey.shard_pod()
    assert after is not None
    assert after["metadata"]["uid"] == pod["metadata"]["uid"]
    assert not any(journey.restarts().values())


def uninstalled_the_shards_keep_serving_and_a_reinstall_resumes(journey: Journey) -> list[str]:
    """docs/install.md, "Uninstall": without the chart, the shards keep serving with the
    credentials the tenants have, also after a shard restart (its admin token Secret is gone
    then); a reinstall makes a new admin token, which the shard picks up without a restart."""
    old_token = journey.secret(SYSTEM, "memspace-admin-token")
    journey.helm("uninstall", RELEASE, "-n", SYSTEM, "--wait")
    assert journey.secret(SYSTEM, "memspace-admin-token") is None
    before = journey.shard_pod()
    assert before is not None
    journey.kubectl("delete", "pod", "memspace-shard-0-0", "-n", SYSTEM)
    restarted = journey.wait_pod_ready(SYSTEM, "memspace-shard-0-0", before["metadata"]["uid"])
    writers = {t: journey.writer(t, f"{t}-uninstalled") for t in TENANTS}
    try:
        for writer in writers.values():
            writer.wait_acks(10)
    finally:
        ledgers = stop_writers(writers)
    for tenant in TENANTS:
        verify(journey, tenant, ledgers[tenant])

    reinstalled_at = time.monotonic()
    path = journey.write_values(values(cpu="150m"))
    journey.helm("install", RELEASE, str(CHART), "-n", SYSTEM, "-f", str(path), "--wait")
    new_token = journey.secret(SYSTEM, "memspace-admin-token")
    assert new_token is not None
    assert new_token != old_token

    def shard_has(token: str) -> bool:
        (answer,) = journey.agent("team-a", "admin", input=token)
        return bool(answer["code"] == "OK")

    assert old_token is not None
    assert not shard_has(old_token["token"])
    wait_for("the shard to take the new admin token", lambda: shard_has(new_token["token"]))
    for tenant in TENANTS:
        journey.wait_condition(tenant, "notes", "Healthy", "True")
        journey.wait_condition(tenant, "notes", "Ready", "True")
    journey.figures["reinstall_to_admin_token_s"] = time.monotonic() - reinstalled_at
    after = journey.shard_pod()
    assert after is not None
    assert after["metadata"]["uid"] == restarted["metadata"]["uid"]
    return [i for ledger in ledgers.values() for i in ledger]


# -- the end ---------------------------------------------------------------------------------------


def deleting_the_spaces_does_what_their_reclaim_policy_says(journey: Journey) -> None:
    pvs = {t: pv_of(journey, t) for t in TENANTS}
    deleted_data = host_path(pvs["team-a"])
    assert deleted_data.is_dir()
    before = journey.shard_pod()
    assert before is not None
    for tenant in TENANTS:
        journey.kubectl("delete", "msp", "notes", "-n", tenant, "--wait=false")
    for tenant in TENANTS:

        def gone(tenant: str = tenant) -> bool:
            return journey.space(tenant, "notes") is None

        wait_for(f"{tenant}/notes to be deleted", gone)
        assert journey.secret(tenant, "notes-memspace") is None
    index = journey.secret(SYSTEM, "memspace-shard-0-spaces") or {}
    assert set(index) == {"team-a-extra.json"}
    # A deletion restarts no shard: the same pod still mounts both volumes, and team-a's claim
    # (Delete) waits for their unmount, labelled delete-pending.
    pod = journey.shard_pod()
    assert pod is not None
    assert pod["metadata"]["uid"] == before["metadata"]["uid"]
    assert len(mounted_claims(pod)) == len(mounted_claims(before))
    pending = journey.get("pvc", "space-team-a-notes", SYSTEM)
    assert pending is not None
    assert pending["metadata"]["labels"].get("memspace.dev/delete-pending") == "true"
    # The shard restarts for another reason (its pod deleted): the new pod comes without the
    # two volumes (real pods unmounted them).
    journey.kubectl("delete", "pod", "memspace-shard-0-0", "-n", SYSTEM, "--wait=false")

    def restarted_without_them() -> Manifest | None:
        pod = journey.shard_pod()
        ready = pod is not None and condition(pod, "Ready").get("status") == "True"
        if not ready or pod is None or pod["metadata"]["uid"] == before["metadata"]["uid"]:
            return None
        claims = {v["persistentVolumeClaim"]["claimName"] for v in mounted_claims(pod)}
        return pod if claims == {"space-team-a-extra"} else None

    wait_for("the shard to restart without the deleted volumes", restarted_without_them)
    # Delete: the claim, its volume and the data on the node are gone.
    wait_for(
        "team-a's claim to be deleted",
        lambda: journey.get("pvc", "space-team-a-notes", SYSTEM) is None,
    )
    wait_for(
        "team-a's volume to be deleted",
        lambda: journey.get("pv", pvs["team-a"]["metadata"]["name"]) is None,
    )
    wait_for("team-a's data to be deleted from the node", lambda: not deleted_data.exists())
    # Retain: the claim stays, labelled, with its volume bound.
    kept = journey.get("pvc", "space-team-b-notes", SYSTEM)
    assert kept is not None
    assert kept["metadata"]["labels"].get("memspace.dev/retained") == "true"
    assert kept["status"]["phase"] == "Bound"


def uninstalling_as_the_docs_say_leaves_nothing_behind(
    journey: Journey, installed: dict[str, Any]
) -> None:
    """docs/install.md, "Uninstall": the four commands, in that order."""
    journey.kubectl("delete", "memoryspaces", "--all", "-A", "--wait", timeout=WAIT_S)
    journey.helm("uninstall", RELEASE, "-n", SYSTEM, "--wait")
    journey.kubectl(
        "-n", SYSTEM, "delete", "statefulset,service,secret,pvc",
        "-l", "app.kubernetes.io/managed-by=memspace-operator", timeout=WAIT_S,
    )  # fmt: skip
    journey.kubectl("delete", "crd", "memoryspaces.memspace.dev", timeout=WAIT_S)

    def nothing_left() -> bool:
        left = [
            f"{o['kind']}/{o['metadata']['name']}"
            for o in journey.items("all,pvc,secret,configmap,networkpolicy,pdb", SYSTEM)
            if o["metadata"]["name"] != "kube-root-ca.crt"
        ]
        return not left

    wait_for(f"{SYSTEM} to be empty", nothing_left)
    for tenant in TENANTS:
        secrets = [s["metadata"]["name"] for s in journey.items("secret", tenant)]
        assert secrets == []
    pv_names = {pv["metadata"]["name"] for pv in installed["pvs"].values()}
    wait_for(
        "every space's volume to be deleted",
        lambda: not pv_names & {pv["metadata"]["name"] for pv in journey.items("pv")},
    )
    for pv in installed["pvs"].values():
        assert not host_path(pv).exists(), f"{host_path(pv)} is left on the node"
    cluster_wide = journey.kubectl(
        "get", "clusterrole,clusterrolebinding", "-o", "name"
    ).stdout.split()
    assert [name for name in cluster_wide if RELEASE in name.rsplit("/", 1)[1]] == []
    assert journey.get("crd", "memoryspaces.memspace.dev") is None
