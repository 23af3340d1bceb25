"""A real, local Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager.

As controller-runtime's envtest does, it runs the real binaries (built by ``make k8s-tools`` into
``.cluster/bin``) on free loopback ports, with a throwaway PKI and an admin kubeconfig. In the
``cluster`` fixture there is no kubelet and no scheduler, so pods never run; the
controller-manager binds PVCs of the ``hostpath`` StorageClass (its host-path provisioner makes
directories under /tmp/hostpath_pv), collects garbage and finishes namespace deletion. The
``node_cluster`` fixture adds a real node (tests/support/node.py): pods run. See
docs/test-control-plane.md.

The processes themselves are tests/support/controlplane.py and tests/support/node.py. Used three
ways:
- as a pytest plugin (``pytest_plugins = ["tests.support.cluster"]``): the session fixtures
  ``cluster`` and ``node_cluster``, the function fixtures ``namespace`` and ``node_namespace``;
- ``kopf_operator(cluster, ...)`` runs a kopf operator in-process (``kopf.testing.KopfRunner``),
  as cluster admin or as a ServiceAccount (``cluster.service_account_kubeconfig``);
- ``python -m tests.support.cluster up [--no-node]|down|status`` (``make cluster`` /
  ``make cluster-down``) keeps one, with its node, running in the background with its kubeconfig
  at ``.cluster/kubeconfig``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import json
import os
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import kopf.testing
import kubernetes.config
import pytest

from tests.support import node as nodes
from tests.support.controlplane import (
    HOSTPATH_ROOT,
    REPO,
    STATE_DIR,
    STORAGE_CLASS,
    TOOLS,
    Cluster,
    ControlPlaneError,
    KubectlError,
    ToolsMissingError,
    close_client,
)

__all__ = [
    "HOSTPATH_ROOT",
    "REPO",
    "STORAGE_CLASS",
    "TOOLS",
    "Cluster",
    "ControlPlaneError",
    "KubectlError",
    "ToolsMissingError",
    "close_client",
    "cluster",
    "crds",
    "import_image",
    "kopf_operator",
    "kubeconfig_in_effect",
    "namespace",
    "node_cluster",
    "node_namespace",
]

CRDS_DIR = REPO / "crds"


@contextlib.contextmanager
def kubeconfig_in_effect(path: Path) -> Iterator[None]:
    """Make ``path`` the kubeconfig that kubernetes clients and kopf load by default.

    The kubernetes package reads $KUBECONFIG once, at import, into KUBE_CONFIG_DEFAULT_LOCATION;
    kopf's login calls ``load_kube_config()``, which uses it. Both are set and then restored.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KUBECONFIG", str(path))
        patch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
        yield


@contextlib.contextmanager
def kopf_operator(
    cluster: Cluster,
    *args: str,
    namespaces: Sequence[str] = (),
    kubeconfig: Path | None = None,
    env: Mapping[str, str] | None = None,
    registry: Any = None,
    settings: Any = None,
    timeout: float = 60,
) -> Iterator[kopf.testing.KopfRunner]:
    """Run a kopf operator in-process against ``cluster`` (``kopf run --standalone``).

    ``args`` go to ``kopf run`` (``-m package.module`` or file paths); ``namespaces`` restricts it,
    else it runs cluster-wide. ``kubeconfig`` is its identity: admin by default, or a
    ServiceAccount's from ``cluster.service_account_kubeconfig`` to test the chart's RBAC.
    ``env`` sets operator settings (MEMSPACE_*) for the run. On exit the operator stops and
    its exceptions re-raise.
    """
    scope = [f"--namespace={ns}" for ns in namespaces] or ["--all-namespaces"]
    argv = ["run", "--standalone", *scope, *args]
    with pytest.MonkeyPatch.context() as patch:
        for key, value in (env or {}).items():
            patch.setenv(key, value)
        try:
            with (
                kubeconfig_in_effect(kubeconfig or cluster.kubeconfig),
                kopf.testing.KopfRunner(
                    argv, timeout=timeout, registry=registry, settings=settings
                ) as runner,
            ):
                yield runner
        finally:
            # kopf's event loop ends with sockets of its cancelled watch streams unclosed; they
            # warn when collected, at any later point of the session (filterwarnings = error).
            # Collect them now, and only their ResourceWarnings are ignored.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                gc.collect()


# --- pytest ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The session's control plane; $KUBECONFIG points at it while it runs.

    With $MEMSPACE_TEST_KUBECONFIG set, the tests use that cluster (kind, for one) instead.
    """
    workdir = tmp_path_factory.mktemp("control-plane")
    external = os.environ.get("MEMSPACE_TEST_KUBECONFIG")
    try:
        control_plane = Cluster.attach(Path(external), workdir) if external else Cluster(workdir)
    except ToolsMissingError as err:
        pytest.fail(str(err), pytrace=False)
    atexit.register(control_plane.stop)
    try:
        if control_plane.local:
            control_plane.start()
        with kubeconfig_in_effect(control_plane.kubeconfig):
            yield control_plane
    finally:
        control_plane.stop()
        atexit.unregister(control_plane.stop)


@pytest.fixture(scope="session")
def node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A control plane with a real node: pods run (docs/test-control-plane.md, "The node").

    Its ``node`` attribute is the Node: ``node.import_image(tar)`` loads an image, ``node.ip`` is
    the address the API server listens on. CoreDNS serves ``cluster.local``; the default
    StorageClass is ``local-path`` (volumes writable by any uid). $KUBECONFIG points at it while
    it runs. Needs root; one node per machine (tests elsewhere wait for the lock).
    """
    workdir = tmp_path_factory.mktemp("node-cluster")
    try:
        control_plane = Cluster(workdir, node_ip=nodes.NODE_IP)
        node = nodes.Node(control_plane, workdir / "node")
    except ToolsMissingError as err:
        pytest.fail(str(err), pytrace=False)
    atexit.register(control_plane.stop)
    try:
        # Another run's node may hold the machine: wait for it, by default within pytest's 300 s
        # timeout (with $MEMSPACE_NODE_LOCK_TIMEOUT and a larger --timeout, longer).
        node.start(lock_timeout=float(os.environ.get("MEMSPACE_NODE_LOCK_TIMEOUT", "180")))
        control_plane.node = node
        with kubeconfig_in_effect(control_plane.kubeconfig):
            yield control_plane
    finally:
        control_plane.node = node
        control_plane.stop()  # the node first, then the control plane
        atexit.unregister(control_plane.stop)
    if node.before and node.after != node.before:
        changed = {k: v for k, v in node.after.items() if v != node.before.get(k)}
        pytest.fail(f"the test node left something behind: {changed}", pytrace=False)


@pytest.fixture
def node_namespace(node_cluster: Cluster) -> Iterator[str]:
    """A fresh namespace of the node cluster, whose ``default`` ServiceAccount exists (pods need
    it); deleted (in the background) afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    node_cluster.kubectl("create", "namespace", name)
    node_cluster.node.wait_for_service_account(name)
    yield name
    node_cluster.kubectl("delete", "namespace", name, "--wait=false")


def import_image(cluster: Cluster, tar: Path) -> list[str]:
    """Import a `docker save`-format tar into the node of ``cluster``; the names it brought.

    E.g. ``import_image(node_cluster, Path.home() / ".cache/memspace/images/memspace-dev.tar")``,
    then ``image: memspace:dev`` with ``imagePullPolicy: Never``.
    """
    if cluster.node is None:
        raise ControlPlaneError("this cluster has no node: use the node_cluster fixture")
    names: list[str] = cluster.node.import_image(tar)
    return names


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> list[str]:
    """Every CRD in crds/, applied to the session's cluster and Established."""
    cluster.kubectl("apply", "--server-side", "-f", str(CRDS_DIR))
    names = cluster.kubectl("get", "-f", str(CRDS_DIR), "-o", "name").stdout.split()
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names)
    return names


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace for one test, deleted (in the background) afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")


# --- make cluster / make cluster-down -------------------------------------------------------------

_STATE = STATE_DIR / "state.json"
_KUBECONFIG = STATE_DIR / "kubeconfig"


def _live_groups(state: dict[str, Any]) -> dict[str, int]:
    """The recorded components whose process still runs (and is still that component)."""
    live = {}
    for name, pgid in state["groups"].items():
        with contextlib.suppress(OSError):
            if Path(os.readlink(f"/proc/{pgid}/exe")).name == name:  # else the PID was reused
                live[name] = pgid
    return live


def _running() -> dict[str, Any] | None:
    """The state of a `make cluster` control plane whose processes all still run, if any."""
    if not _STATE.exists():
        return None
    state: dict[str, Any] = json.loads(_STATE.read_text())
    return state if _live_groups(state) == state["groups"] and _node_alive(state) else None


def _node_alive(state: dict[str, Any]) -> bool:
    """A cluster started without a node needs none; else its node's processes must all run."""
    if not state.get("node"):
        return True
    node_state = nodes.own_state(Path(state["workdir"]) / "node")
    return node_state is not None and _live_groups(
        {"groups": {name: pid for name, pid in node_state["pids"].items() if name != "lock-holder"}}
    ) == {name: pid for name, pid in node_state["pids"].items() if name != "lock-holder"}


def _up(*, with_node: bool = True) -> int:
    if (state := _running()) is not None:
        print(f"cluster already running at {state['server']}; KUBECONFIG={_KUBECONFIG}")
        return 0
    _down(quiet=True)
    workdir = STATE_DIR / "run"
    control_plane = Cluster(workdir, watchdog=False, node_ip=nodes.NODE_IP if with_node else None)
    node = nodes.Node(control_plane, workdir / "node") if with_node else None
    started = time.monotonic()
    try:
        if node is not None:
            node.start()  # the machine first (blackholes, the node address), then everything
        else:
            control_plane.start()
    except BaseException:
        if node is not None:
            node.stop()
        control_plane.stop()
        raise
    shutil.copyfile(control_plane.kubeconfig, _KUBECONFIG)
    state = {"server": control_plane.server, "groups": control_plane.groups}
    _STATE.write_text(json.dumps({**state, "workdir": str(workdir), "node": with_node}, indent=2))
    what = f"cluster with node {nodes.NODE_NAME} ({nodes.NODE_IP})" if node else "control plane"
    print(f"{what} {control_plane.version} running at {control_plane.server}, "
          f"ready in {time.monotonic() - started:.0f} s")  # fmt: skip
    print(f"export KUBECONFIG={_KUBECONFIG}   # logs in {control_plane.logs}")
    if node is not None:
        print("node start-up, seconds: " + ", ".join(f"{k} {v}" for k, v in node.timings.items()))
    if node is not None:
        node.detach()
    control_plane.detach()  # the processes outlive this command: `make cluster-down` stops them
    return 0


def _down(*, quiet: bool = False) -> int:
    notes: list[str] = []
    if _STATE.exists():
        state = json.loads(_STATE.read_text())
        if state.get("node"):
            notes = nodes.teardown_own(Path(state["workdir"]) / "node")
        control_plane = Cluster(Path(state["workdir"]), watchdog=False)
        control_plane.groups = _live_groups(state)
        if len(control_plane.groups) == len(state["groups"]):
            control_plane.connect(state["server"])  # to remove the PV directories first
        control_plane.stop()
        shutil.rmtree(state["workdir"], ignore_errors=True)
    _STATE.unlink(missing_ok=True)
    _KUBECONFIG.unlink(missing_ok=True)
    if not quiet:
        print("cluster stopped" + "".join(f"\nwarning: {note}" for note in notes))
    return 1 if notes else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.cluster", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--no-node", action="store_true", help="up: the control plane alone")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            return _up(with_node=not args.no_node)
        if args.command == "down":
            return _down()
    except (ToolsMissingError, ControlPlaneError, nodes.NodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    state = _running()
    print(f"running at {state['server']}; KUBECONFIG={_KUBECONFIG}" if state else "not running")
    return 0 if state else 1


if __name__ == "__main__":
    sys.exit(main())
