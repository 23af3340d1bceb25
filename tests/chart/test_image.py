"""The image (Dockerfile) and what runs it agree: the chart's operator Deployment and the
operator's shard pods use its entry point, its commands, its ports and its user. hadolint lints
the Dockerfile itself (make lint)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from urllib.parse import urlsplit

import pytest

from memspace_cli import main as cli
from memspace_contract import spaces
from memspace_operator import main as operator_main
from memspace_operator import naming, shards
from memspace_operator.settings import Settings
from memspace_server import settings as server_settings
from tests.chart.conftest import Helm, one
from tests.support import controlplane

DOCKERFILE = controlplane.REPO / "Dockerfile"


@dataclasses.dataclass(frozen=True)
class Instruction:
    stage: int
    keyword: str
    value: str


def instructions() -> list[Instruction]:
    """The Dockerfile's instructions (continuation lines joined, comments dropped), each with
    the number of the build stage it belongs to."""
    found: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, value = line.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        found.append(Instruction(stage, keyword.upper(), value.strip()))
    return found


def final(keyword: str) -> list[str]:
    """The values of `keyword` in the last stage (the image that ships)."""
    every = instructions()
    last = every[-1].stage
    return [i.value for i in every if i.stage == last and i.keyword == keyword]


def exec_form(keyword: str) -> list[str]:
    (value,) = final(keyword)
    parsed = json.loads(value)  # exec form: no shell between the runtime and memspace
    assert isinstance(parsed, list)
    return [str(item) for item in parsed]


def exposed() -> set[int]:
    return {int(port.split("/")[0]) for value in final("EXPOSE") for port in value.split()}


def serve_settings(args: list[str]) -> server_settings.ServerSettings:
    """What `memspace serve` makes of these arguments (given after `memspace`)."""
    parsed = cli.parser().parse_args(args)
    assert parsed.command == "serve"
    return server_settings.load(vars(parsed), {})


def port(address: str) -> int:
    return server_settings.split_address(address)[1]


def test_the_image_is_multi_stage_and_runs_as_a_numeric_non_root_user() -> None:
    every = instructions()
    froms = [i for i in every if i.keyword == "FROM"]
    assert len(froms) >= 2
    build_stage = froms[0].value.split()[-1]
    assert any(f"--from={build_stage}" in i.value for i in every if i.keyword == "COPY"), (
        "the final stage copies the build stage's output"
    )
    # No compiler or build cache ships: the final stage runs no pip install.
    assert not any("pip install" in value for value in final("RUN"))
    (user,) = final("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), "USER must be numeric for runAsNonRoot"
    assert gid.isdigit()
    assert int(uid) != 0
    assert int(gid) != 0
    assert int(uid) == shards.RUN_AS


def test_the_default_command_is_a_managed_shard_on_the_exposed_ports() -> None:
    assert exec_form("ENTRYPOINT") == ["memspace"]
    settings = serve_settings(exec_form("CMD"))
    assert settings.managed
    assert str(settings.data_root) == naming.VOLUMES_PATH
    assert str(settings.index_dir) == naming.INDEX_PATH
    assert {port(settings.listen), port(settings.metrics_listen)} == exposed()
    assert exposed() == {naming.SERVER_PORT, naming.METRICS_PORT}
    (healthcheck,) = final("HEALTHCHECK")
    assert f"127.0.0.1:{naming.SERVER_PORT}" in healthcheck
    # The directories the pods mount over exist in the image, owned by the user.
    setup = " ".join(final("RUN"))
    assert naming.VOLUMES_PATH in setup
    assert naming.INDEX_PATH in setup


def test_the_chart_s_operator_runs_the_image_s_entry_point(
    helm: Helm, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = one(helm.template(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == exec_form("ENTRYPOINT")
    # `memspace operator ARGS` hands ARGS, options included, to the operator's own parser.
    handed: list[list[str]] = []

    def operator(argv: Sequence[str] | None = None) -> int:
        handed.append(list(argv or []))
        return 0

    monkeypatch.setattr(operator_main, "main", operator)
    assert cli.main(container["args"]) == 0
    assert handed == [container["args"][1:]]
    assert container["args"][0] == "operator"
    options = operator_main.parser().parse_args(handed[0])
    assert options.log_format == "json"
    liveness = urlsplit(options.liveness)
    assert liveness.port == container["ports"][0]["containerPort"]
    assert liveness.path == container["livenessProbe"]["httpGet"]["path"]
    (user,) = final("USER")
    assert pod["securityContext"]["runAsUser"] == int(user.split(":")[0])
    assert pod["securityContext"]["runAsGroup"] == int(user.split(":")[1])


def test_the_operator_s_shard_pods_run_the_image_as_it_is_built(helm: Helm) -> None:
    env = {
        item["name"]: item["value"]
        for item in one(helm.template(), "Deployment")["spec"]["template"]["spec"]["containers"][0][
            "env"
        ]
        if "value" in item
    }
    settings = Settings.from_env(env)
    statefulset = shards.statefulset(settings, 0, [spaces.SpaceId("notes")], "")
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == settings.server_image
    assert container["command"] == exec_form("ENTRYPOINT")
    served = serve_settings(container["args"])
    assert served.managed
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(ports.values()) == exposed()
    assert port(served.listen) == ports["grpc"]
    assert port(served.metrics_listen) == ports["metrics"]
    assert served.tls  # the chart's default: TLS, so the kubelet probes the plaintext health port
    assert container["readinessProbe"]["grpc"]["port"] == port(served.health_listen)
    assert container["livenessProbe"]["grpc"]["port"] == port(served.health_listen)
    (user,) = final("USER")
    assert pod["securityContext"]["runAsUser"] == int(user.split(":")[0])
    service = shards.service(settings, 0)
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
