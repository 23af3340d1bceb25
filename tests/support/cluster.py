"""A real, local Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager.

As controller-runtime's envtest does, it runs the real binaries (built by ``make k8s-tools`` into
``.cluster/bin``) on free loopback ports, with a throwaway PKI and an admin kubeconfig. There is no
kubelet and no scheduler, so pods never run; the controller-manager binds PVCs of the ``hostpath``
StorageClass (its host-path provisioner makes directories under /tmp/hostpath_pv), collects garbage
and finishes namespace deletion. See docs/test-control-plane.md.

The processes themselves are tests/support/controlplane.py. Used three ways:
- as a pytest plugin (``pytest_plugins = ["tests.support.cluster"]``): the session fixture
  ``cluster`` and the function fixture ``namespace``;
- ``kopf_operator(cluster, ...)`` runs a kopf operator in-process (``kopf.testing.KopfRunner``),
  as cluster admin or as a ServiceAccount (``cluster.service_account_kubeconfig``);
- ``python -m tests.support.cluster up|down|status`` (``make cluster`` / ``make cluster-down``)
  keeps one running in the background with its kubeconfig at ``.cluster/kubeconfig``.
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
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import kopf.testing
import kubernetes.config
import pytest

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
    "cluster",
    "crds",
    "kopf_operator",
    "kubeconfig_in_effect",
    "namespace",
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
    return state if _live_groups(state) == state["groups"] else None


def _up() -> int:
    if (state := _running()) is not None:
        print(f"control plane already running at {state['server']}; KUBECONFIG={_KUBECONFIG}")
        return 0
    _down(quiet=True)
    control_plane = Cluster(STATE_DIR / "run", watchdog=False)
    try:
        control_plane.start()
    except BaseException:
        control_plane.stop()
        raise
    shutil.copyfile(control_plane.kubeconfig, _KUBECONFIG)
    state = {"server": control_plane.server, "groups": control_plane.groups}
    _STATE.write_text(json.dumps({**state, "workdir": str(control_plane.workdir)}, indent=2))
    print(f"control plane {control_plane.version} running at {control_plane.server}")
    print(f"export KUBECONFIG={_KUBECONFIG}   # logs in {control_plane.logs}")
    control_plane.detach()  # the processes outlive this command: `make cluster-down` stops them
    return 0


def _down(*, quiet: bool = False) -> int:
    if _STATE.exists():
        state = json.loads(_STATE.read_text())
        control_plane = Cluster(Path(state["workdir"]), watchdog=False)
        control_plane.groups = _live_groups(state)
        if len(control_plane.groups) == len(state["groups"]):
            control_plane.connect(state["server"])  # to remove the PV directories first
        control_plane.stop()
        shutil.rmtree(state["workdir"], ignore_errors=True)
    _STATE.unlink(missing_ok=True)
    _KUBECONFIG.unlink(missing_ok=True)
    if not quiet:
        print("control plane stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.cluster", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    command = parser.parse_args(argv).command
    try:
        if command == "up":
            return _up()
        if command == "down":
            return _down()
    except (ToolsMissingError, ControlPlaneError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    state = _running()
    print(f"running at {state['server']}; KUBECONFIG={_KUBECONFIG}" if state else "not running")
    return 0 if state else 1


if __name__ == "__main__":
    sys.exit(main())
