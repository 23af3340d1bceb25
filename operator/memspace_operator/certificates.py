"""Certificates the operator issues (the `cryptography` package): a CA of its own and the shard
serving certificates it signs. Pure functions on PEM bytes; `certifying` decides when to make
them and where they are kept.

Keys are ECDSA P-256 (fast to make, accepted by every gRPC runtime); a serving certificate
carries the shard Service's DNS names and is valid for server and client authentication.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BACKDATE = datetime.timedelta(minutes=5)
"""Certificates start a little in the past (clocks of the nodes differ): this much, or a tenth
of their lifetime when that is shorter."""


def _backdate(lifetime: datetime.timedelta) -> datetime.timedelta:
    return min(BACKDATE, lifetime / 10)


@dataclasses.dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, both PEM."""

    cert: bytes
    key: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "memspace"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )


def new_ca(common_name: str, lifetime: datetime.timedelta) -> KeyPair:
    """A self-signed CA, valid for `lifetime` from now."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _backdate(lifetime))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(
    ca: KeyPair,
    common_name: str,
    dns_names: Sequence[str],
    lifetime: datetime.timedelta,
    ip_addresses: Iterable[str] = (),
) -> KeyPair:
    """A leaf certificate signed by `ca` for these names (none: a client certificate), valid
    for `lifetime` (capped at the CA's own expiry), for server and client authentication."""
    ca_cert = ca.certificate
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError("the CA key is not an ECDSA key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    end = min(now + lifetime, ca_cert.not_valid_after_utc)
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _backdate(end - now))
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if names:  # a client certificate may name nothing
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def bundle(*certs: bytes) -> bytes:
    """PEM certificates joined into one trust bundle, each once, in order."""
    seen: list[bytes] = []
    for cert in certs:
        for one in x509.load_pem_x509_certificates(cert):
            pem = one.public_bytes(serialization.Encoding.PEM)
            if pem not in seen:
                seen.append(pem)
    return b"".join(seen)


def remaining(cert: bytes, now: datetime.datetime | None = None) -> float:
    """Share of the certificate's lifetime still ahead (1.0 new, 0.0 or below expired)."""
    found = x509.load_pem_x509_certificate(cert)
    start, end = found.not_valid_before_utc, found.not_valid_after_utc
    total = (end - start).total_seconds()
    left = (end - (now or _now())).total_seconds()
    return left / total if total > 0 else 0.0


def dns_names(cert: bytes) -> list[str]:
    found = x509.load_pem_x509_certificate(cert)
    try:
        names = found.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(names.value.get_values_for_type(x509.DNSName))


def signed_by(cert: bytes, ca: bytes) -> bool:
    """Whether `ca`'s key signed `cert`."""
    leaf = x509.load_pem_x509_certificate(cert)
    issuer = x509.load_pem_x509_certificate(ca)
    try:
        leaf.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def matches(pair: KeyPair) -> bool:
    """Whether the key belongs to the certificate."""
    key = serialization.load_pem_private_key(pair.key, password=None)
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*public) == pair.certificate.public_key().public_bytes(
        *public
    )
