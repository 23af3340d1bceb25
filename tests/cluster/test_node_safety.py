"""No packet for or from the test node's pods and Services can leave the machine; one node a time.

Only routes are looked up here (``ip route get`` sends nothing): no test sends traffic anywhere
but to the node's own pods and Services.
"""

from __future__ import annotations

import ipaddress
import json

import pytest

from tests.support import cluster as harness
from tests.support import controlplane
from tests.support import node as nodes

pytestmark = pytest.mark.cluster

# Addresses of the node's ranges that nothing uses: the pods' range outside the bridge's subnet,
# a Service address no Service has, and a TEST-NET-2 address that is not the node's.
UNUSED = ("10.244.200.7", "10.0.0.250", "198.51.100.99")


def route_of(address: str) -> str:
    return nodes.run("ip", "-4", "-o", "route", "get", address, check=False).strip()


def default_gateway() -> str:
    words = nodes.run("ip", "-4", "route", "show", "default").split()
    return words[words.index("via") + 1] if "via" in words else "(none)"


@pytest.mark.parametrize("address", UNUSED)
def test_an_unused_cluster_address_is_routed_to_a_blackhole(
    node_cluster: harness.Cluster, address: str
) -> None:
    route = route_of(address)
    assert route.startswith("blackhole") or route == "", route
    assert default_gateway() not in route.split()
    assert " dev " not in f" {route} "


def test_the_blackholes_cover_every_range_of_the_node(node_cluster: harness.Cluster) -> None:
    table = nodes.run("ip", "-4", "route", "show", "type", "blackhole")
    assert {line.split()[1] for line in table.splitlines()} >= set(nodes.BLACKHOLES)
    covered = [ipaddress.ip_network(cidr) for cidr in nodes.BLACKHOLES]
    for address in (nodes.NODE_IP, nodes.DNS_IP, "10.0.0.1", nodes.POD_GATEWAY):
        assert any(ipaddress.ip_address(address) in net for net in covered), address


def test_the_node_address_is_local_and_pods_are_on_the_bridge(
    node_cluster: harness.Cluster,
) -> None:
    assert route_of(nodes.NODE_IP).startswith(f"local {nodes.NODE_IP} dev lo")
    assert f"dev {nodes.BRIDGE}" in route_of("10.244.0.77")


@pytest.mark.parametrize("binary", ["iptables", "ip6tables"])
def test_the_host_forwards_nothing_between_the_bridge_and_other_interfaces(
    node_cluster: harness.Cluster, binary: str
) -> None:
    # mangle's FORWARD runs before filter's, where kube-proxy and the CNI put their ACCEPTs.
    forward = nodes.run(binary, "-w", "-t", "mangle", "-S", "FORWARD").splitlines()
    assert forward[1] == f"-A FORWARD -j {nodes.FORWARD_CHAIN}"
    guard = nodes.run(binary, "-w", "-t", "mangle", "-S", nodes.FORWARD_CHAIN)
    assert f"-A {nodes.FORWARD_CHAIN} -i {nodes.BRIDGE} ! -o {nodes.BRIDGE} -j DROP" in guard
    assert f"-A {nodes.FORWARD_CHAIN} ! -i {nodes.BRIDGE} -o {nodes.BRIDGE} -j DROP" in guard


def test_a_pod_has_routes_to_the_cluster_only(
    node_cluster: harness.Cluster, node_namespace: str
) -> None:
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "routes", "namespace": node_namespace},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "main",
                    "image": nodes.BUSYBOX_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["sleep", "3600"],
                }
            ],
        },
    }
    node_cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    node_cluster.kubectl(
        "wait", "--for=condition=Ready", "pod/routes", "-n", node_namespace, "--timeout=120s"
    )
    routes = node_cluster.kubectl(
        "exec", "routes", "-n", node_namespace, "--", "ip", "-4", "route"
    ).stdout
    assert "default" not in routes
    destinations = {line.split()[0] for line in routes.splitlines()}
    assert destinations == {
        nodes.CLUSTER_CIDR,
        controlplane.SERVICE_CIDR,
        nodes.NODE_IP,
        nodes.POD_SUBNET,
    }
    resolv = node_cluster.kubectl(
        "exec", "routes", "-n", node_namespace, "--", "cat", "/etc/resolv.conf"
    ).stdout
    assert [line.split()[1] for line in resolv.splitlines() if line.startswith("nameserver")] == [
        nodes.DNS_IP
    ]


def test_node_ports_listen_on_the_node_address_only(node_cluster: harness.Cluster) -> None:
    config = json.loads((node_cluster.node.workdir / "conf" / "kube-proxy.json").read_text())
    assert config["nodePortAddresses"] == [f"{nodes.NODE_IP}/32"]


def test_a_second_node_cannot_start_while_one_runs(node_cluster: harness.Cluster) -> None:
    with pytest.raises(nodes.NodeError, match="another test node runs"), nodes.machine_lock(0):
        pass


def test_ranges_that_shadow_the_machine_are_refused(
    node_cluster: harness.Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = default_gateway()
    if gateway == "(none)":
        pytest.fail("this machine has no default route to test against")
    monkeypatch.setattr(nodes, "BLACKHOLES", (f"{gateway}/32",))
    with pytest.raises(nodes.NodeError, match="overlaps this machine"):
        nodes.check_ranges()
