"""TLS made by the operator, on the real control plane: its own CA and a certificate per shard
(or cert-manager's Secret), `ca.crt` in the tenant's Secret, shard pods that serve TLS, health
checks over TLS against the shards the kubelet stand-in runs, and rotation without restarts."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import socket
import ssl

import grpc
import kubernetes.client
import kubernetes.config
import pytest
from cryptography import x509

from memspace_contract import client
from memspace_operator import certificates, certifying
from memspace_operator import kube as operator_kube
from memspace_operator.settings import Settings
from tests.operator.conftest import Deployment, Kube, tenant_credentials, wait_for
from tests.operator.kubelet import FakeKubelet
from tests.support import cluster as harness

pytestmark = pytest.mark.cluster

DIM = 4


def names(shard: int, namespace: str) -> list[str]:
    base = f"memspace-shard-{shard}"
    return [
        base,
        f"{base}.{namespace}",
        f"{base}.{namespace}.svc",
        f"{base}.{namespace}.svc.cluster.local",
    ]


def pem(data: dict[str, str], key: str) -> bytes:
    return data[key].encode()


def served_certificate(port: int, ca: bytes, server_name: str) -> x509.Certificate:
    """The certificate a shard presents to a new connection (verified against `ca`)."""
    context = ssl.create_default_context(cadata=ca.decode())
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as wrapped,
    ):
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def recall_code(credentials: client.Credentials) -> grpc.StatusCode:
    async with client.connect(credentials) as memspace:
        try:
            await memspace.recall([1.0, 0.0, 0.0, 0.0], k=1)
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def test_the_operator_makes_a_ca_a_certificate_per_shard_and_gives_tenants_the_ca(
    deployment: Deployment,
) -> None:
    kube, ns, server_ns = deployment.kube, deployment.namespace, deployment.server_namespace
    with deployment.running():
        deployment.apply("secured", embeddingDim=DIM)
        deployment.wait_condition("secured", "Mounted", "True")

        ca = kube.secret(server_ns, "memspace-ca")
        assert ca is not None
        assert {"ca.crt", "ca.key", "next.crt", "next.key", "trust.crt"} <= set(ca)
        authority = certificates.KeyPair(pem(ca, "ca.crt"), pem(ca, "ca.key"))
        assert certificates.matches(authority)
        assert authority.certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value.ca
        trust = pem(ca, "trust.crt")
        assert trust == pem(ca, "ca.crt") + pem(ca, "next.crt")

        shard_secret = kube.secret_object(server_ns, "memspace-shard-0-tls")
        assert shard_secret is not None
        assert shard_secret["type"] == "kubernetes.io/tls"
        served = kube.secret(server_ns, "memspace-shard-0-tls") or {}
        pair = certificates.KeyPair(pem(served, "tls.crt"), pem(served, "tls.key"))
        assert certificates.matches(pair)
        assert certificates.signed_by(pair.cert, authority.cert)
        assert certificates.dns_names(pair.cert) == names(0, server_ns)
        assert pem(served, "ca.crt") == trust

        tenant = kube.secret(ns, "secured-memspace") or {}
        assert pem(tenant, "ca.crt") == trust
        assert set(tenant) == {"space", "endpoint", "token", "ca.crt"}

        statefulset = kube.statefulset(server_ns, "memspace-shard-0") or {}
        pod = statefulset["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        tls = {v["name"]: v.get("secret", {}).get("secretName") for v in pod["volumes"]}
        assert tls["tls"] == "memspace-shard-0-tls"
        assert "--tls-cert-file=/etc/memspace/tls/tls.crt" in container["args"]
        assert "--tls-key-file=/etc/memspace/tls/tls.key" in container["args"]
        assert "--insecure" not in container["args"]
        assert container["readinessProbe"]["grpc"]["port"] == 50052
        assert "--health-listen=0.0.0.0:50052" in container["args"]

    # A second run finds what the first made and keeps it: the CA is made once.
    with deployment.running():
        deployment.apply("second", embeddingDim=DIM)
        deployment.wait_condition("second", "Mounted", "True")
        assert kube.secret(server_ns, "memspace-ca") == ca
        assert (kube.secret(server_ns, "memspace-shard-0-tls") or {})["tls.crt"] == served[
            "tls.crt"
        ]
        assert pem(kube.secret(ns, "second-memspace") or {}, "ca.crt") == trust


async def test_health_checks_and_tenants_speak_tls_to_the_shards(
    deployment: Deployment, kubelet: FakeKubelet
) -> None:
    with deployment.running():
        deployment.apply("secured", embeddingDim=DIM)
        body = await asyncio.to_thread(deployment.wait_condition, "secured", "Healthy", "True")
        assert body["status"]["conditions"]
        await asyncio.to_thread(deployment.wait_condition, "secured", "Ready", "True")

        credentials = tenant_credentials(
            deployment.kube, deployment.namespace, "secured", deployment.server_namespace
        )
        assert credentials.secure
        async with client.connect(credentials) as memspace:
            await memspace.remember("over tls", [1.0, 0.0, 0.0, 0.0])
            hits = await memspace.recall([1.0, 0.0, 0.0, 0.0], k=1)
        assert [hit.memory.content for hit in hits] == ["over tls"]

        plaintext = dataclasses.replace(credentials, secure=False, ca=None, server_name=None)
        assert await recall_code(plaintext) is grpc.StatusCode.UNAVAILABLE
        stranger_ca = certificates.new_ca("stranger", datetime.timedelta(days=1))
        assert await recall_code(dataclasses.replace(credentials, ca=stranger_ca.cert)) is (
            grpc.StatusCode.UNAVAILABLE
        )
        # The certificate names the shard's Service, not whatever address is dialled.
        wrong_name = dataclasses.replace(credentials, server_name="memspace-shard-9.elsewhere.svc")
        assert await recall_code(wrong_name) is grpc.StatusCode.UNAVAILABLE
    shard_log = kubelet.shards[0].log()
    assert "TLS" in shard_log


async def test_the_next_ca_takes_over_and_running_shards_serve_its_certificates(
    deployment: Deployment, kubelet: FakeKubelet
) -> None:
    """CA lifetime 45 s: at a third left the next CA takes over, the shard's certificate is
    re-issued by it and reaches the running shard (no restart); a tenant's ca.crt written
    before the rotation still verifies the shard."""
    server_ns = deployment.server_namespace
    with deployment.running(
        MEMSPACE_TLS_CA_DAYS=str(45 / 86400),
        MEMSPACE_TLS_CERT_DAYS="1",
        MEMSPACE_TLS_CHECK_INTERVAL="1",
    ):
        deployment.apply("rotating", embeddingDim=DIM)
        await asyncio.to_thread(deployment.wait_condition, "rotating", "Healthy", "True")
        before = deployment.kube.secret(server_ns, "memspace-ca") or {}
        credentials = tenant_credentials(
            deployment.kube, deployment.namespace, "rotating", server_ns
        )
        starts = kubelet.shards[0].starts
        port = kubelet.port(0)
        server_name = f"memspace-shard-0.{server_ns}.svc"
        first = served_certificate(port, pem(before, "trust.crt"), server_name)

        after = await asyncio.to_thread(
            wait_for,
            "the next CA to take over",
            lambda: (
                found
                if (found := deployment.kube.secret(server_ns, "memspace-ca") or {}).get("ca.crt")
                == before["next.crt"]
                else None
            ),
            90,
        )
        next_ca = x509.load_pem_x509_certificate(pem(after, "ca.crt"))

        def reissued() -> x509.Certificate | None:
            found = served_certificate(port, pem(before, "trust.crt"), server_name)
            return found if found.issuer == next_ca.subject else None

        second = await asyncio.to_thread(wait_for, "the shard to serve the new CA's", reissued, 60)
        assert second.serial_number != first.serial_number
        assert kubelet.shards[0].starts == starts  # re-read, not restarted
        # The tenant's ca.crt from before the rotation still opens the space.
        async with client.connect(credentials) as memspace:
            await memspace.remember("after the rotation", [1.0, 0.0, 0.0, 0.0])
        body = await asyncio.to_thread(deployment.wait_condition, "rotating", "Healthy", "True")
        assert body


async def test_with_mutual_tls_only_clients_with_a_certificate_of_the_ca_get_in(
    deployment: Deployment, kubelet: FakeKubelet
) -> None:
    kube, ns, server_ns = deployment.kube, deployment.namespace, deployment.server_namespace
    with deployment.running(MEMSPACE_TLS_CLIENT_AUTH="true"):
        deployment.apply("mutual", embeddingDim=DIM)
        # The health checks present the operator's own client certificate.
        await asyncio.to_thread(deployment.wait_condition, "mutual", "Healthy", "True")
        statefulset = kube.statefulset(server_ns, "memspace-shard-0") or {}
        (container,) = statefulset["spec"]["template"]["spec"]["containers"]
        assert "--tls-client-ca-file=/etc/memspace/tls/ca.crt" in container["args"]

        tenant = kube.secret(ns, "mutual-memspace") or {}
        assert set(tenant) == {"space", "endpoint", "token", "ca.crt", "tls.crt", "tls.key"}
        ca = kube.secret(server_ns, "memspace-ca") or {}
        pair = certificates.KeyPair(pem(tenant, "tls.crt"), pem(tenant, "tls.key"))
        assert certificates.matches(pair)
        # Signed by the next CA, and valid as long: it outlives the next rotation.
        assert certificates.signed_by(pair.cert, pem(ca, "next.crt"))
        next_ca = x509.load_pem_x509_certificate(pem(ca, "next.crt"))
        assert pair.certificate.not_valid_after_utc == next_ca.not_valid_after_utc

        credentials = tenant_credentials(kube, ns, "mutual", server_ns)
        assert await recall_code(credentials) is grpc.StatusCode.OK
        without = dataclasses.replace(credentials, cert=None, key=None)
        assert await recall_code(without) is grpc.StatusCode.UNAVAILABLE
        stranger_ca = certificates.new_ca("stranger", datetime.timedelta(days=1))
        forged = certificates.issue(stranger_ca, "forged", [], datetime.timedelta(days=1))
        with_forged = dataclasses.replace(credentials, cert=forged.cert, key=forged.key)
        assert await recall_code(with_forged) is grpc.StatusCode.UNAVAILABLE


def test_with_tls_off_shards_run_insecure_and_tenants_get_no_ca(deployment: Deployment) -> None:
    kube, server_ns = deployment.kube, deployment.server_namespace
    with deployment.running(MEMSPACE_TLS_ENABLED="false"):
        deployment.apply("open", embeddingDim=DIM)
        deployment.wait_condition("open", "Mounted", "True")
        assert set(kube.secret(deployment.namespace, "open-memspace") or {}) == {
            "space",
            "endpoint",
            "token",
        }
        assert kube.secret(server_ns, "memspace-ca") is None
        assert kube.secret(server_ns, "memspace-shard-0-tls") is None
        statefulset = kube.statefulset(server_ns, "memspace-shard-0") or {}
        (container,) = statefulset["spec"]["template"]["spec"]["containers"]
        assert "--insecure" in container["args"]
        assert not [arg for arg in container["args"] if arg.startswith("--tls-")]


async def test_with_cert_manager_every_shard_serves_its_secret_and_tenants_get_its_ca(
    deployment: Deployment, kubelet: FakeKubelet
) -> None:
    """cert-manager cannot run here: the test issues the Secret a Certificate would make (the
    chart's Certificate is checked in tests/chart), after the operator has started waiting."""
    kube, server_ns = deployment.kube, deployment.server_namespace
    with deployment.running(MEMSPACE_TLS_SECRET="memspace-shard-tls"):
        deployment.apply("managed", embeddingDim=DIM)
        waiting = await asyncio.to_thread(
            wait_for,
            "the operator to wait for cert-manager",
            lambda: [
                e
                for e in kube.events(deployment.namespace, "managed")
                if "memspace-shard-tls" in (e.get("message") or "")
            ],
        )
        assert "cert-manager" in waiting[0]["message"]
        assert kube.secret(deployment.namespace, "managed-memspace") is None

        issuer = certificates.new_ca("cert-manager stand-in", datetime.timedelta(days=1))
        # The names the chart's Certificate asks for: a wildcard over the server namespace.
        leaf = certificates.issue(
            issuer,
            "memspace-shard",
            [f"*.{server_ns}.svc", f"*.{server_ns}.svc.cluster.local"],
            datetime.timedelta(days=1),
        )
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "memspace-shard-tls", "namespace": server_ns},
            "type": "kubernetes.io/tls",
            "data": {
                key: base64.b64encode(value).decode()
                for key, value in {
                    "tls.crt": leaf.cert,
                    "tls.key": leaf.key,
                    "ca.crt": issuer.cert,
                }.items()
            },
        }
        kube.apply(secret)

        await asyncio.to_thread(deployment.wait_condition, "managed", "Healthy", "True")
        assert pem(kube.secret(deployment.namespace, "managed-memspace") or {}, "ca.crt") == (
            issuer.cert
        )
        assert kube.secret(server_ns, "memspace-ca") is None  # the operator made no CA
        statefulset = kube.statefulset(server_ns, "memspace-shard-0") or {}
        volumes = statefulset["spec"]["template"]["spec"]["volumes"]
        assert any(v.get("secret", {}).get("secretName") == "memspace-shard-tls" for v in volumes)
        credentials = tenant_credentials(kube, deployment.namespace, "managed", server_ns)
        assert await recall_code(credentials) is grpc.StatusCode.OK


async def test_the_spaces_of_a_new_shard_issue_its_certificate_once_without_retries(
    cluster: harness.Cluster, kube: Kube, namespace: str
) -> None:
    """Twenty reconciles of a new shard's spaces ask for its certificate at once: one issues
    it, the others wait for it (no AlreadyExists retry, no key pair made for nothing)."""
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(cluster.kubeconfig), client_configuration=configuration
    )
    api = await operator_kube.Kube.open(configuration=configuration)
    try:
        certifier = certifying.Certifier(api, Settings(server_namespace=namespace))
        await certifier.ensure_shard(0)  # the CA, and shard 0's certificate
        # Connections open, as in a running operator: the requests race for real.
        missing = operator_kube.secrets(namespace, "missing")
        await asyncio.gather(*(api.get_or_none(missing) for _ in range(20)))
        posted = api.requests["POST"]
        await asyncio.gather(*(certifier.ensure_shard(1) for _ in range(20)))
        assert api.requests["POST"] - posted == 1  # shard 1's certificate, once
    finally:
        await api.close()
    assert kube.secret_object(namespace, "memspace-shard-1-tls") is not None
