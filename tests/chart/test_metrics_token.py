"""The chart's metrics token, end to end through the real parts: the chart renders the token
Secret and the operator's setting; the operator turns that setting into the shard pod's mount and
flag; a real `memspace serve`, run with that pod's arguments and volumes, answers the scrape the
ServiceMonitor makes (with the Secret's token) and refuses one without it."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from memspace_contract import spaces
from memspace_operator import naming, shards
from memspace_operator.settings import Settings
from tests.api.conftest import memspace_serve
from tests.api.test_metrics_auth import scrape
from tests.chart.conftest import Helm, env_of, one


def _as_local(args: list[str], volumes: dict[str, Path]) -> list[str]:
    """The pod's arguments with its mount paths moved to local directories (what the kubelet
    does with volumes) and its addresses moved to loopback ports of the system's choosing."""
    local = []
    for arg in args:
        moved = arg
        if moved.startswith(
            ("--listen=", "--metrics-listen=", "--health-listen=", "--http-listen=")
        ):
            moved = moved.split("=", 1)[0] + "=127.0.0.1:0"
        for mount, directory in volumes.items():
            moved = moved.replace(f"={mount}", f"={directory}")
        local.append(moved)
    return local


def test_the_shards_metrics_port_answers_only_the_service_monitor_s_token(
    helm: Helm, tmp_path: Path
) -> None:
    # TLS on the gRPC port is beside the point here (tests/api/test_tls.py covers it).
    monitored = {"metrics": {"serviceMonitor": {"enabled": True}}, "tls": {"enabled": False}}
    objects = helm.template(monitored, namespace="memspace-system")
    monitor = one(objects, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    reference = endpoint["authorization"]["credentials"]
    secret = one(objects, "Secret", reference["name"])
    assert secret["metadata"]["namespace"] == monitor["metadata"]["namespace"]
    token = base64.b64decode(secret["data"][reference["key"]]).decode()

    settings = Settings.from_env(env_of(one(objects, "Deployment")))
    pod = shards.pod_spec(settings, 0, [spaces.SpaceId("notes")])
    (container,) = pod["containers"]
    mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == "metrics-token")
    # The pod mounts the Secret the ServiceMonitor reads (the shards' copy, same namespace).
    assert volume["secret"]["secretName"] == reference["name"]

    volumes = {
        naming.VOLUMES_PATH: tmp_path / "spaces",
        naming.INDEX_PATH: tmp_path / "index",
        naming.ADMIN_PATH: tmp_path / "admin",
        mounted["metrics-token"]: tmp_path / "metrics",
    }
    for directory in volumes.values():
        directory.mkdir()
    (tmp_path / "admin" / "token").write_text("admin-token")
    (tmp_path / "metrics" / reference["key"]).write_text(token)
    assert container["command"] == ["memspace"]
    assert container["args"][0] == "serve"
    args = _as_local(list(container["args"][1:]), volumes)
    with memspace_serve(args, tmp_path / "serve.log") as process:
        found = re.search(r"metrics on :(\d+)", process.output())
        assert found, process.output()
        port = int(found.group(1))
        assert scrape(port, None)[0] == 401
        assert scrape(port, "admin-token")[0] == 401
        status, body = scrape(port, token)
        assert status == 200
        assert "memspace_" in body
