"""Tearing the test node down leaves nothing behind, also after a crash (stale PIDs).

This module runs after the other node tests (it restarts the node at its end all the same).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import Any

import pytest

from tests.support import cluster as harness
from tests.support import node as nodes

pytestmark = pytest.mark.cluster


def test_a_crashed_node_is_torn_down_without_a_trace_and_starts_again(
    node_cluster: harness.Cluster, node_namespace: str
) -> None:
    node = node_cluster.node
    assert node.before, "the fixture records the machine before the node starts"
    # Something of everything to clean: a pod with a local-path volume, a Service, their rules.
    manifests: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": node_namespace},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "busy", "namespace": node_namespace, "labels": {"app": "busy"}},
            "spec": {
                "terminationGracePeriodSeconds": 0,
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
                "containers": [
                    {
                        "name": "main",
                        "image": nodes.BUSYBOX_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["sh", "-c", "date > /data/at && exec httpd -f -p 80"],
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }
                ],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "busy", "namespace": node_namespace},
            "spec": {"selector": {"app": "busy"}, "ports": [{"port": 80}]},
        },
    ]
    for manifest in manifests:
        node_cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    node_cluster.kubectl(
        "wait", "--for=condition=Ready", "pod/busy", "-n", node_namespace, "--timeout=120s"
    )
    during = nodes.snapshot()
    for kind in ("links", "mounts", "cgroups", "netns", "iptables", "processes", "routes"):
        assert during[kind] != node.before[kind], f"the node made no {kind}?"

    # A crash: every process of the node killed at once, nothing cleaned up.
    state = json.loads(nodes.STATE_PATH.read_text())
    for pid in state["pids"].values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    shims = nodes.shims_of(state["containerd_socket"])
    assert shims, "runc shims outlive containerd"

    assert nodes.teardown() == []  # from the recorded state, whose PIDs are dead now
    after = nodes.snapshot()
    assert after == node.before
    assert not any(nodes.alive(pid) for pid in shims)

    # The node starts again on the same control plane, and runs pods.
    node.stop()
    node.start()
    node_cluster.kubectl("delete", "pod", "busy", "-n", node_namespace, "--wait=false")
    node_cluster.kubectl("delete", "pvc", "data", "-n", node_namespace, "--wait=false")
    again = dict(manifests[1])
    again["metadata"] = {**manifests[1]["metadata"], "name": "again"}
    again["spec"] = {**manifests[1]["spec"], "volumes": [{"name": "data", "emptyDir": {}}]}
    node_cluster.kubectl("apply", "-f", "-", input=json.dumps(again))
    node_cluster.kubectl(
        "wait", "--for=condition=Ready", "pod/again", "-n", node_namespace, "--timeout=120s"
    )
