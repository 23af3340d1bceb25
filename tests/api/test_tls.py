"""TLS on the gRPC port, against real servers: encrypted when asked for, plaintext refused,
client certificates required with a client CA, certificate files re-read when they rotate, and
no open non-loopback port without --insecure."""

from __future__ import annotations

import dataclasses
import datetime
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memspace_contract import client
from memspace_contract.v1 import memspace_pb2 as pb
from memspace_contract.v1 import memspace_pb2_grpc as pb_grpc
from memspace_operator import certificates
from memspace_server import settings
from tests.api.conftest import (
    ADMIN_TOKEN,
    DIM,
    Running,
    Start,
    eventually,
    failure,
    memspace_serve,
    vec,
)

DAY = datetime.timedelta(days=1)
NAMES = ("localhost",)


@dataclasses.dataclass(frozen=True)
class Pki:
    """A CA and a server certificate it signed, written to files."""

    directory: Path
    ca: certificates.KeyPair

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def cert_file(self) -> Path:
        return self.directory / "tls.crt"

    @property
    def key_file(self) -> Path:
        return self.directory / "tls.key"

    def issue(self, common_name: str = "server") -> certificates.KeyPair:
        return certificates.issue(self.ca, common_name, NAMES, DAY, ip_addresses=["127.0.0.1"])

    def write(self, pair: certificates.KeyPair, cert: Path, key: Path) -> None:
        cert.write_bytes(pair.cert)
        key.write_bytes(pair.key)


def make_pki(directory: Path, name: str = "test-ca") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory, certificates.new_ca(name, DAY))
    pki.ca_file.write_bytes(pki.ca.cert)
    pki.write(pki.issue(), pki.cert_file, pki.key_file)
    return pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def other_pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "other-pki", "another-ca")


async def serve_tls(start: Start, pki: Pki, **overrides: object) -> Running:
    return await start(tls_cert_file=pki.cert_file, tls_key_file=pki.key_file, **overrides)


async def recall_code(credentials: client.Credentials) -> grpc.StatusCode:
    """The status of one Recall of the default space with these credentials."""
    async with client.connect(credentials) as memspace:
        try:
            await memspace.recall(vec(1), k=1)
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


async def test_a_tls_server_serves_a_client_that_trusts_its_ca(start: Start, pki: Pki) -> None:
    running = await serve_tls(start, pki)
    credentials = client.Credentials(endpoint=running.address, ca_file=pki.ca_file)
    assert credentials.secure
    async with client.connect(credentials) as memspace:
        done = await memspace.remember("over tls", vec(1))
        hits = await memspace.recall(vec(1), k=1)
    assert [hit.memory.id for hit in hits] == [done.id]


async def test_a_plaintext_client_is_refused_by_a_tls_server(start: Start, pki: Pki) -> None:
    running = await serve_tls(start, pki)
    async with grpc.aio.insecure_channel(running.address) as channel:
        refused = await failure(
            pb_grpc.MemoryServiceStub(channel).Recall(pb.RecallRequest(cue=vec(1), k=1), timeout=30)
        )
    assert refused.code() is grpc.StatusCode.UNAVAILABLE


async def test_a_client_that_trusts_another_ca_is_refused(
    start: Start, pki: Pki, other_pki: Pki
) -> None:
    running = await serve_tls(start, pki)
    stranger = client.Credentials(endpoint=running.address, ca_file=other_pki.ca_file)
    assert await recall_code(stranger) is grpc.StatusCode.UNAVAILABLE


async def test_with_a_client_ca_a_client_needs_a_certificate_it_signed(
    start: Start, pki: Pki, other_pki: Pki, tmp_path: Path
) -> None:
    running = await serve_tls(start, pki, tls_client_ca_file=pki.ca_file)
    base = client.Credentials(endpoint=running.address, ca_file=pki.ca_file)
    assert await recall_code(base) is grpc.StatusCode.UNAVAILABLE  # no client certificate

    forged = other_pki.issue("forged-client")
    forged_cert, forged_key = tmp_path / "forged.crt", tmp_path / "forged.key"
    other_pki.write(forged, forged_cert, forged_key)
    with_forged = dataclasses.replace(base, cert_file=forged_cert, key_file=forged_key)
    assert await recall_code(with_forged) is grpc.StatusCode.UNAVAILABLE

    mine = pki.issue("client")
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    pki.write(mine, cert, key)
    assert await recall_code(dataclasses.replace(base, cert_file=cert, key_file=key)) is (
        grpc.StatusCode.OK
    )


async def test_rotated_certificate_files_are_used_by_the_next_connection(
    start: Start, pki: Pki, other_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    running = await serve_tls(start, pki)
    old_ca = client.Credentials(endpoint=running.address, ca_file=pki.ca_file)
    new_ca = client.Credentials(endpoint=running.address, ca_file=other_pki.ca_file)
    assert await recall_code(old_ca) is grpc.StatusCode.OK
    assert await recall_code(new_ca) is grpc.StatusCode.UNAVAILABLE

    # A half-done rotation (the new certificate, the old key) is not used: the old one stays.
    rotated = other_pki.issue()
    pki.cert_file.write_bytes(rotated.cert)
    with caplog.at_level("WARNING"):
        for _ in range(3):
            assert await recall_code(old_ca) is grpc.StatusCode.OK
    assert running.server.tls is not None
    assert running.server.tls.reloads == 0
    assert caplog.text.count("cannot be used") == 1  # once per unusable set, not per handshake

    pki.key_file.write_bytes(rotated.key)

    async def rotated_in() -> bool:
        return await recall_code(new_ca) is grpc.StatusCode.OK

    await eventually(rotated_in)
    assert await recall_code(old_ca) is grpc.StatusCode.UNAVAILABLE
    assert running.server.tls.reloads == 1


async def test_a_rotation_through_a_projected_secret_volume_is_picked_up(
    start: Start, pki: Pki, other_pki: Pki, tmp_path: Path
) -> None:
    """Kubernetes swaps a Secret volume's `..data` symlink: the files' own paths never change."""
    volume = tmp_path / "volume"
    first = volume / "..one"
    first.mkdir(parents=True)
    pki.write(pki.issue(), first / "tls.crt", first / "tls.key")
    (volume / "..data").symlink_to("..one")
    for key in ("tls.crt", "tls.key"):
        (volume / key).symlink_to(f"..data/{key}")
    running = await start(tls_cert_file=volume / "tls.crt", tls_key_file=volume / "tls.key")
    new_ca = client.Credentials(endpoint=running.address, ca_file=other_pki.ca_file)
    assert await recall_code(new_ca) is grpc.StatusCode.UNAVAILABLE

    second = volume / "..two"
    second.mkdir()
    other_pki.write(other_pki.issue(), second / "tls.crt", second / "tls.key")
    (volume / "..data_tmp").symlink_to("..two")
    os.replace(volume / "..data_tmp", volume / "..data")

    async def rotated_in() -> bool:
        return await recall_code(new_ca) is grpc.StatusCode.OK

    await eventually(rotated_in)


async def test_the_health_port_answers_plaintext_probes_beside_a_tls_port(
    start: Start, pki: Pki
) -> None:
    running = await serve_tls(start, pki, health_listen="127.0.0.1:0")
    assert running.server.health_port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.server.health_port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=30
        )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        # Only health: the memory API is not on the plaintext port.
        refused = await failure(
            pb_grpc.MemoryServiceStub(channel).Recall(pb.RecallRequest(cue=vec(1), k=1), timeout=30)
        )
    assert refused.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_certificate_files_that_do_not_fit_stop_the_start(
    start: Start, pki: Pki, other_pki: Pki
) -> None:
    with pytest.raises(settings.SettingsError, match="does not match"):
        await start(tls_cert_file=pki.cert_file, tls_key_file=other_pki.key_file)
    with pytest.raises(settings.SettingsError, match="no PEM certificate"):
        await start(tls_cert_file=pki.key_file, tls_key_file=pki.key_file)


# -- who may listen where ------------------------------------------------------------------------


def check(tmp_path: Path, **values: object) -> None:
    settings.validate(settings.ServerSettings(data_root=tmp_path, **values))  # type: ignore[arg-type]


def test_a_non_loopback_address_needs_tls_and_an_admin_token(tmp_path: Path) -> None:
    token = tmp_path / "token"
    tls = {"tls_cert_file": tmp_path / "c", "tls_key_file": tmp_path / "k"}
    with pytest.raises(settings.SettingsError, match=r"without TLS .* and without an admin token"):
        check(tmp_path, listen="0.0.0.0:50051")
    with pytest.raises(settings.SettingsError, match=r"without an admin token.*--insecure"):
        check(tmp_path, listen="0.0.0.0:50051", **tls)
    with pytest.raises(settings.SettingsError, match=r"without TLS \(--tls-cert-file"):
        check(tmp_path, listen="10.1.2.3:50051", admin_token_file=token)
    check(tmp_path, listen="0.0.0.0:50051", admin_token_file=token, **tls)
    check(tmp_path, listen="0.0.0.0:50051", insecure=True)
    check(tmp_path, listen="127.0.0.1:50051")
    check(tmp_path, listen="[::1]:50051")


def test_tls_flags_go_together(tmp_path: Path) -> None:
    with pytest.raises(settings.SettingsError, match="give both or neither"):
        check(tmp_path, tls_cert_file=tmp_path / "c")
    with pytest.raises(settings.SettingsError, match="needs TLS"):
        check(tmp_path, tls_client_ca_file=tmp_path / "ca")


def test_memspace_serve_refuses_an_open_port_with_a_clear_message(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "memspace_cli.main", "serve", "--data-root", str(tmp_path),
         "--listen", "0.0.0.0:0", "--metrics-listen", "off"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "refusing to listen on 0.0.0.0:0 without TLS" in done.stderr
    assert "--insecure" in done.stderr


def test_insecure_and_tls_come_from_flags_and_the_environment(tmp_path: Path) -> None:
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    flags = vars(parser.parse_args(["--data-root", str(tmp_path), "--insecure"]))
    assert settings.load(flags, {"MEMSPACE_LISTEN": "0.0.0.0:1"}).insecure
    environ = {
        "MEMSPACE_LISTEN": "0.0.0.0:1",
        "MEMSPACE_INSECURE": "false",
        "MEMSPACE_TLS_CERT_FILE": "/c",
        "MEMSPACE_TLS_KEY_FILE": "/k",
        "MEMSPACE_ADMIN_TOKEN_FILE": "/t",
    }
    loaded = settings.load(vars(parser.parse_args(["--data-root", str(tmp_path)])), environ)
    assert (loaded.tls, loaded.insecure) == (True, False)
    with pytest.raises(settings.SettingsError, match="allowed: true, false"):
        settings.load(
            vars(parser.parse_args(["--data-root", str(tmp_path)])), {"MEMSPACE_INSECURE": "maybe"}
        )


async def test_an_insecure_open_server_starts_and_warns(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        await start(listen="0.0.0.0:0", insecure=True)
    assert "without TLS (--insecure)" in caplog.text
    assert "without token checks (--insecure)" in caplog.text


async def test_an_open_port_with_tls_and_tokens_serves_over_tls(
    start: Start, pki: Pki, admin_token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        running = await serve_tls(start, pki, listen="0.0.0.0:0", admin_token_file=admin_token_file)
    assert "--insecure" not in caplog.text
    credentials = client.Credentials(
        endpoint=f"127.0.0.1:{running.server.port}", ca_file=pki.ca_file, token=ADMIN_TOKEN
    )
    async with client.connect(credentials) as admin:
        listed = await admin.spaces.ListSpaces(pb.ListSpacesRequest())
    assert [space.space for space in listed.spaces] == ["default"]


# -- the command line --------------------------------------------------------------------------


def test_memspace_status_speaks_tls(tmp_path: Path, pki: Pki, admin_token_file: Path) -> None:
    args = [
        f"--data-root={tmp_path / 'data'}", "--listen=127.0.0.1:0", "--metrics-listen=off",
        f"--tls-cert-file={pki.cert_file}", f"--tls-key-file={pki.key_file}",
        f"--admin-token-file={admin_token_file}", f"--default-embedding-dim={DIM}",
    ]  # fmt: skip
    with memspace_serve(args, tmp_path / "serve.log") as process:
        base = [sys.executable, "-m", "memspace_cli.main", "status", "--endpoint",
                process.address, "--token-file", str(admin_token_file), "-o", "json"]  # fmt: skip
        plain = subprocess.run(base, capture_output=True, text=True, timeout=60, check=False)
        secure = subprocess.run(
            [*base, "--ca-file", str(pki.ca_file)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert plain.returncode == 1
    assert "UNAVAILABLE" in plain.stderr
    assert secure.returncode == 0, secure.stderr
    assert '"space": "default"' in secure.stdout


def test_a_mounted_secret_with_a_ca_turns_tls_on(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    for key, value in {"space": "team-a", "endpoint": "h:1", "token": "t", "ca.crt": "PEM"}.items():
        (secret / key).write_text(value)
    found = client.Credentials.from_env({"MEMSPACE_CREDENTIALS_DIR": str(secret)})
    assert found.secure
    assert found.ca_file == secret / "ca.crt"
    overridden = client.Credentials.from_env(
        {
            "MEMSPACE_CREDENTIALS_DIR": str(secret),
            "MEMSPACE_CERT_FILE": "/c.crt",
            "MEMSPACE_KEY_FILE": "/c.key",
            "MEMSPACE_SERVER_NAME": "memspace-shard-0.ns.svc",
        }
    )
    assert (overridden.cert_file, overridden.key_file) == (Path("/c.crt"), Path("/c.key"))
    assert overridden.channel_options() == [
        ("grpc.ssl_target_name_override", "memspace-shard-0.ns.svc")
    ]
    assert not client.Credentials.from_env({}).secure
    for key in ("tls.crt", "tls.key"):
        (secret / key).write_text("PEM")
    mutual = client.Credentials.from_directory(secret)
    assert (mutual.cert_file, mutual.key_file) == (secret / "tls.crt", secret / "tls.key")
    with pytest.raises(client.CredentialsError, match="both cert_file and key_file"):
        client.Credentials(cert_file=Path("/c.crt"))
