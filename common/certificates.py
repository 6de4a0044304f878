"""Self-signed X.509 certificates, made the one way Control, the gateway and the tests
all need them: an ECDSA P-256 key, the first name as the subject, every name in the
subject alternative names (IP addresses as such), valid from five minutes ago."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """Subject alternative names for ``names``: IP addresses as such, the rest DNS."""
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    return alt


def self_signed(
    key: ec.EllipticCurvePrivateKey, names: Sequence[str], days: int
) -> x509.Certificate:
    """A self-signed leaf certificate for ``names`` (at least one), signed by ``key``."""
    if not names:
        raise ValueError("a certificate needs at least one name")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def self_signed_pem(key: ec.EllipticCurvePrivateKey, names: Sequence[str], days: int) -> str:
    """:func:`self_signed` as PEM text."""
    return self_signed(key, names, days).public_bytes(serialization.Encoding.PEM).decode()
