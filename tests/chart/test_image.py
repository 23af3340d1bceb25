"""The image (Dockerfile) and what runs it agree: the chart's operator Deployment and the
operator's shard pods use its entry point, its commands, its ports and its user. hadolint lints
the Dockerfile itself (make lint). The image is also built (hack/image.sh, as `make image` does)
and run: its entry points, and a shard container with the operator's arguments and mounts under
the chart's restrictions, serving health, Remember and Recall. requirements.lock, which the image
installs by hash, is checked against pyproject.toml."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memspace_cli import main as cli
from memspace_contract import client, index, models, spaces
from memspace_operator import certificates, naming, shards
from memspace_operator import main as operator_main
from memspace_operator.settings import Settings
from memspace_server import settings as server_settings
from tests.chart.conftest import Helm, one
from tests.support import controlplane, image

DOCKERFILE = controlplane.REPO / "Dockerfile"
PYPROJECT = controlplane.REPO / "pyproject.toml"
LOCK = controlplane.REPO / "requirements.lock"
REPO_IMAGE_HACK = controlplane.REPO / "hack" / "image"


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
    served = {port(settings.listen), port(settings.metrics_listen), port(settings.http_listen)}
    assert served == exposed()
    assert exposed() == {naming.SERVER_PORT, naming.METRICS_PORT, naming.HTTP_PORT}
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
    assert port(served.http_listen) == ports["http"]
    assert served.tls  # the chart's default: TLS, so the kubelet probes the plaintext health port
    assert container["readinessProbe"]["grpc"]["port"] == port(served.health_listen)
    assert container["livenessProbe"]["grpc"]["port"] == port(served.health_listen)
    (user,) = final("USER")
    assert pod["securityContext"]["runAsUser"] == int(user.split(":")[0])
    service = shards.service(settings, 0)
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)


def test_the_base_image_is_pinned_by_digest_and_packages_by_hash() -> None:
    text = DOCKERFILE.read_text()
    # A `# syntax=` line would make BuildKit fetch its frontend from a registry.
    assert not re.search(r"^#\s*syntax=", text, re.MULTILINE)
    (base,) = [i.value for i in instructions() if i.keyword == "ARG" and i.stage == -1]
    name, _, default = base.partition("=")
    assert name == "BASE_IMAGE"
    assert re.fullmatch(r"python:3\.11[\w.-]*-bookworm@sha256:[0-9a-f]{64}", default)
    froms = [i.value.split()[0] for i in instructions() if i.keyword == "FROM"]
    assert froms == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    installs = [i.value for i in instructions() if i.keyword == "RUN" and "pip install" in i.value]
    assert len(installs) == 2
    locked, project = installs
    assert "--require-hashes" in locked.split()
    assert "-r requirements.lock" in locked
    assert {"--no-deps", "--no-build-isolation", "."} <= set(project.split())


def lock_check(tmp_path: Path, pyproject: str, lock: str | None = None) -> str:
    """hack/lockfile.py on a copy of the repository's files with pyproject.toml (and the lock)
    replaced; the problems it reports ('' when the lock is current)."""
    (tmp_path / "hack" / "image").mkdir(parents=True)
    build_requirements = tmp_path / "hack" / "image" / "build-requirements.in"
    build_requirements.write_text((REPO_IMAGE_HACK / "build-requirements.in").read_text())
    (tmp_path / "pyproject.toml").write_text(pyproject)
    (tmp_path / "requirements.lock").write_text(lock or LOCK.read_text())
    result = subprocess.run(
        [
            sys.executable,
            str(controlplane.REPO / "hack" / "lockfile.py"),
            f"--pyproject={tmp_path / 'pyproject.toml'}",
            f"--lock={tmp_path / 'requirements.lock'}",
            f"--build-requirements={build_requirements}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert (result.returncode == 0) == (not result.stderr), result.stderr
    return result.stderr


def test_the_lock_file_is_current_with_pyproject(tmp_path: Path) -> None:
    assert lock_check(tmp_path, PYPROJECT.read_text()) == ""


def test_the_lock_check_sees_a_new_dependency_and_a_raised_minimum(tmp_path: Path) -> None:
    text = PYPROJECT.read_text()
    added = text.replace('"numpy>=2.1",', '"numpy>=2.1",\n  "httpx>=0.27",')
    assert added != text
    assert "runtime dependencies missing from the lock: httpx" in lock_check(tmp_path, added)
    raised = text.replace('"numpy>=2.1",', '"numpy>=99",')
    assert "does not satisfy numpy>=99" in lock_check(tmp_path / "raised", raised)
    dropped = text.replace('  "crc32c>=2.4",\n', "")
    assert "no longer asked for: ['crc32c']" in lock_check(tmp_path / "dropped", dropped)


def test_the_lock_check_refuses_a_package_without_a_hash(tmp_path: Path) -> None:
    lock = LOCK.read_text()
    unhashed = re.sub(r"(zarr==\S+) \\\n(\s+--hash=\S+(?: \\)?\n)+", r"\1\n", lock)
    assert unhashed != lock
    assert "has no hash" in lock_check(tmp_path, PYPROJECT.read_text(), unhashed)


def test_the_build_takes_the_machine_s_pip_settings_but_no_path_of_the_machine(
    tmp_path: Path,
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\nnot a real one\n-----END CERTIFICATE-----\n")
    out = tmp_path / "pip"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PIP_") and key != "VIRTUAL_ENV"
    }
    env |= {
        "PIP_CONFIG_FILE": os.devnull,  # this machine's own files stay out of the test
        "PIP_CERT": str(bundle),
        "PIP_FIND_LINKS": str(tmp_path / "wheels"),
        "PIP_INDEX_URL": "https://index.invalid/simple",
        "PIP_DEFAULT_TIMEOUT": "42",
    }
    subprocess.run(
        [sys.executable, str(REPO_IMAGE_HACK / "host.py"), "pip-config", str(out)],
        env=env,
        check=True,
        timeout=60,
    )
    config = (out / "pip.conf").read_text()
    assert "index-url = https://index.invalid/simple" in config
    assert "default-timeout = 42" in config
    # The CA bundle travels into the build context, named by its path inside the build stage.
    assert "cert = /etc/memspace-build/pip/cert.pem" in config
    assert (out / "cert.pem").read_bytes() == bundle.read_bytes()
    assert "ENV PIP_NO_CACHE_DIR=1" in DOCKERFILE.read_text()
    assert "PIP_CONFIG_FILE=/etc/memspace-build/pip/pip.conf" in DOCKERFILE.read_text()
    # Settings naming places on this machine do not.
    assert "find-links" not in config
    assert str(tmp_path) not in config


def test_debootstrap_reads_the_mirror_apt_uses(tmp_path: Path) -> None:
    sources = tmp_path / "sources.list.d"
    sources.mkdir()
    (sources / "debian.sources").write_text(
        "Types: deb\n"
        "URIs: http://mirror.invalid/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n"
        "\n"
        "# a comment\n"
        "Types: deb deb-src\n"
        "URIs: http://mirror.invalid/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n"
    )
    (tmp_path / "sources.list").write_text(
        "deb [arch=amd64] http://other.invalid/debian trixie main\n"
    )
    code = (
        "import sys, pathlib; sys.path.insert(0, sys.argv[1]); import host; "
        "host.APT = pathlib.Path(sys.argv[2]); sys.exit(host.main(['apt-mirror', sys.argv[3]]))"
    )

    def mirror(suite: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code, str(REPO_IMAGE_HACK), str(tmp_path), suite],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    assert mirror("bookworm").stdout.strip() == "http://mirror.invalid/debian"
    assert mirror("trixie").stdout.strip() == "http://other.invalid/debian"
    missing = mirror("sid")
    assert missing.returncode == 1
    assert "no apt source for suite 'sid'" in missing.stderr


# -- the image, built and run for real --------------------------------------------------------

IMAGE_TIMEOUT_S = 1800
"""For the first test of a run that builds the image cold (the fixture's setup counts)."""
DIM = 4
SPACE = spaces.SpaceId("notes")
SPACE_TOKEN = "space-token-of-notes"
ADMIN_TOKEN = "admin-token-of-the-shard"


@pytest.fixture(scope="module")
def docker() -> Iterator[image.Docker]:
    """The image, built (or reused) and loaded into the build's own dockerd, running until the
    module ends; the daemon and every container are stopped afterwards."""
    tar = image.build()
    # Unchanged inputs: the saved image is reused as it is, not rebuilt.
    built = tar.stat().st_mtime_ns
    assert image.build() == tar
    assert tar.stat().st_mtime_ns == built
    with image.engine() as engine:
        engine("load", "-i", str(tar), timeout=600)
        yield engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def restricted(*, user: str | None = None) -> list[str]:
    """`docker run` options for what the chart's pods get from their securityContext: a numeric
    non-root user (pod runAsUser/runAsGroup, fsGroup as a supplementary group), a read-only root
    filesystem, no capabilities, no privilege escalation; the host's network (loopback only is
    used) instead of a pod network."""
    uid = shards.RUN_AS
    return [
        "--user",
        user or f"{uid}:{uid}",
        "--group-add",
        str(uid),
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--network",
        "host",
    ]


@pytest.mark.timeout(IMAGE_TIMEOUT_S)
def test_the_image_runs_the_operator_s_entry_points_as_non_root_on_a_read_only_root(
    docker: image.Docker,
) -> None:
    (user,) = final("USER")
    configured = json.loads(docker("image", "inspect", image.IMAGE).stdout)[0]["Config"]
    assert configured["User"] == user
    assert configured["Entrypoint"] == exec_form("ENTRYPOINT")
    helped = docker("run", "--rm", *restricted(), image.IMAGE, "--help").stdout
    assert {"serve", "status", "operator"} <= set(helped.split())
    # The operator's own parser answers (the operator and kopf are installed, not just the CLI).
    operator_help = docker("run", "--rm", *restricted(), image.IMAGE, "operator", "--help").stdout
    assert "--liveness" in operator_help
    identity = docker(
        "run", "--rm", *restricted(), "--entrypoint", "id", image.IMAGE
    ).stdout.split()
    assert identity[0] == f"uid={shards.RUN_AS}(memspace)"
    # The root filesystem is read-only for the server's user, as in the chart's pods.
    refused = docker(
        "run",
        "--rm",
        *restricted(),
        "--entrypoint",
        "python",
        image.IMAGE,
        "-c",
        "open('/opt/memspace/written', 'w')",
        check=False,
    )
    assert refused.returncode != 0
    assert "Read-only file system" in refused.stderr


@pytest.mark.timeout(IMAGE_TIMEOUT_S)
def test_the_image_carries_the_embedding_model_and_loads_it_without_a_network(
    docker: image.Docker,
) -> None:
    """The offered model's weights are in the image: loaded on a read-only root with no network
    at all (a shard reaches no model hub), and they embed text."""
    check = (
        "from memspace_contract import models; from memspace_server import embedding\n"
        "for name in models.MODELS:\n"
        "    found = embedding.load(models.MODELS[name]).embed(['a memory', 'another one'])\n"
        "    assert found.shape == (2, models.MODELS[name].dim), found.shape\n"
        "    print(name, found.shape[1])\n"
    )
    options = [o for o in restricted() if o not in ("--network", "host")]
    loaded = docker(
        "run", "--rm", *options, "--network", "none", "--entrypoint", "python", image.IMAGE,
        "-c", check,
    ).stdout  # fmt: skip
    assert loaded.split() == [models.DEFAULT_MODEL, str(models.MODELS[models.DEFAULT_MODEL].dim)]


@pytest.mark.timeout(IMAGE_TIMEOUT_S)
async def test_a_shard_container_serves_health_remember_and_recall(
    docker: image.Docker, tmp_path: Path
) -> None:
    # What the operator mounts into a shard pod: the index Secret, the admin token, the shard's
    # TLS Secret (a certificate from a CA of the test's own, for loopback), one volume per space
    # (fsGroup makes it the server user's).
    index_dir = tmp_path / "index"
    admin_dir = tmp_path / "admin"
    tls_dir = tmp_path / "tls"
    volume = tmp_path / "volumes" / SPACE
    for directory in (index_dir, admin_dir, tls_dir, volume):
        directory.mkdir(parents=True)
    index.write_entry(
        index_dir,
        index.IndexEntry(
            space_id=SPACE,
            embedding_dim=DIM,
            token_sha256=index.token_sha256(SPACE_TOKEN),
        ),
    )
    (admin_dir / "token").write_text(ADMIN_TOKEN)
    day = datetime.timedelta(days=1)
    ca = certificates.new_ca("memspace-image-test", day)
    served = certificates.issue(ca, "shard-0", ["localhost"], day, ip_addresses=["127.0.0.1"])
    (tls_dir / "tls.crt").write_bytes(served.cert)
    (tls_dir / "tls.key").write_bytes(served.key)
    (tls_dir / "ca.crt").write_bytes(ca.cert)
    for path in (tmp_path, tmp_path / "volumes", index_dir, admin_dir, tls_dir):
        path.chmod(0o755)
    for path in (*index_dir.iterdir(), *tls_dir.iterdir(), admin_dir / "token"):
        path.chmod(0o644)
    os.chown(volume, shards.RUN_AS, shards.RUN_AS)
    # The shard's own arguments, as the operator writes them, on loopback ports of the host.
    settings = Settings.from_env({"MEMSPACE_SERVER_IMAGE": image.IMAGE})
    assert settings.tls_enabled
    (container,) = shards.pod_spec(settings, 0, [SPACE])["containers"]
    ports = {flag: free_port() for flag in ("--listen", "--health-listen", "--metrics-listen")}
    args = []
    for arg in container["args"]:
        flag, _, _ = arg.partition("=")
        args.append(f"{flag}=127.0.0.1:{ports[flag]}" if flag in ports else arg)
    assert args != container["args"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert set(mounts) == {
        naming.INDEX_PATH,
        naming.ADMIN_PATH,
        naming.TLS_PATH,
        naming.mount_path(SPACE),
    }
    name = f"memspace-test-{uuid.uuid4().hex[:8]}"
    docker(
        "run",
        "--detach",
        "--name",
        name,
        *restricted(),
        "--volume",
        f"{index_dir}:{naming.INDEX_PATH}:ro",
        "--volume",
        f"{admin_dir}:{naming.ADMIN_PATH}:ro",
        "--volume",
        f"{tls_dir}:{naming.TLS_PATH}:ro",
        "--volume",
        f"{volume}:{naming.mount_path(SPACE)}",
        image.IMAGE,
        *args,
    )
    try:
        address = f"127.0.0.1:{ports['--listen']}"
        # The probes' port: plaintext gRPC health, as the kubelet asks it.
        await serving_health(docker, name, f"127.0.0.1:{ports['--health-listen']}")
        credentials = client.Credentials(
            endpoint=address, space=SPACE, token=SPACE_TOKEN, ca_file=tls_dir / "ca.crt"
        )
        async with client.connect(credentials) as tenant:
            remembered = await tenant.remember("kept in a container", [1.0, 0.0, 0.0, 0.0])
            assert remembered.id
            (hit,) = await tenant.recall([1.0, 0.0, 0.0, 0.0], k=5)
            assert hit.memory.id == remembered.id
            assert hit.memory.content == "kept in a container"
            assert hit.score == pytest.approx(1.0)
        admin = client.Credentials(endpoint=address, token=ADMIN_TOKEN, ca_file=tls_dir / "ca.crt")
        async with client.connect(admin) as operator_view:
            health = await operator_view.health()
        (reported,) = health.spaces
        assert reported.space == SPACE
        assert reported.memories == 1
        # Written as the server's user onto the mounted volume, nowhere else (the root is
        # read-only): the space's identity file is there, owned by uid 10001.
        identity = volume / "space.json"
        assert identity.is_file()
        assert identity.stat().st_uid == shards.RUN_AS
        metrics_url = f"http://127.0.0.1:{ports['--metrics-listen']}/metrics"
        metrics = await asyncio.to_thread(scrape, metrics_url)
        assert "memspace" in metrics
        # A tenant's client container (docs/install.md): the image with the credentials Secret
        # mounted at /var/run/memspace, and no flags or environment of its own.
        secret = tmp_path / "secret"
        secret.mkdir()
        keys = {"space": SPACE, "endpoint": address, "token": SPACE_TOKEN}
        for key, value in keys.items():
            (secret / key).write_text(value)
        (secret / "ca.crt").write_bytes(ca.cert)
        secret.chmod(0o755)
        for path in secret.iterdir():
            path.chmod(0o644)
        mount = ["--volume", f"{secret}:/var/run/memspace:ro"]
        shown = docker("run", "--rm", *restricted(), *mount, image.IMAGE, "status", "-o", "json")
        status = json.loads(shown.stdout)
        assert [(s["space"], s["memories"]) for s in status["spaces"]] == [(SPACE, 1)]
        recalled = docker(
            "run", "--rm", *restricted(), *mount, image.IMAGE,
            "recall", "--cue", "[1, 0, 0, 0]", "-o", "json",
        ).stdout  # fmt: skip
        assert [h["memory"]["id"] for h in json.loads(recalled)] == [remembered.id]
    finally:
        logs = docker("logs", name, check=False)
        docker("rm", "--force", name, check=False)
    assert "Traceback" not in logs.stdout + logs.stderr


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body.decode()


async def serving_health(docker: image.Docker, name: str, address: str) -> None:
    """Wait until the container's gRPC health check (grpc.health.v1, as the chart's probes use it)
    answers SERVING; fail with the container's log if it exits or takes over a minute."""
    deadline = time.monotonic() + 60
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.aio.AioRpcError:
                answer = None
            if answer is not None and answer.status == health_pb2.HealthCheckResponse.SERVING:
                return
            state = json.loads(docker("inspect", name).stdout)[0]["State"]
            if not state["Running"] or time.monotonic() > deadline:
                logs = docker("logs", name, check=False)
                raise AssertionError(
                    f"the container is not serving (state {state['Status']}):\n"
                    f"{logs.stdout}{logs.stderr}"
                )
            await asyncio.sleep(0.2)
