"""Certificates Control stores: checked once, the same way, whoever sends them.

An admin uploads one over the REST API; a gateway reports one it obtained with ACME
over the hub.  Either way it is stored only if the PEM chain parses, the private key
is an unencrypted PEM key that matches the leaf, the leaf covers the domain (exactly
or by a one-label wildcard) and it is valid now.  The expiry stored is the leaf's,
never a number the sender claims.
"""

from __future__ import annotations

import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["CertificateError", "verify"]


class CertificateError(ValueError):
    """Why a certificate and key cannot be stored (safe to show the sender)."""


def verify(domain: str, certificate: str, private_key: str, now: float | None = None) -> float:
    """Check a PEM chain and key for ``domain``; the leaf's expiry (epoch seconds)."""
    try:
        chain = x509.load_pem_x509_certificates(certificate.encode())
    except ValueError:
        raise CertificateError("certificate is not a PEM chain") from None
    try:
        key = serialization.load_pem_private_key(private_key.encode(), password=None)
    except (ValueError, TypeError):
        raise CertificateError("privateKey is not an unencrypted PEM key") from None
    except Exception:  # an algorithm the library does not support
        raise CertificateError("privateKey is not a supported key") from None
    leaf = chain[0]
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        matches = leaf.public_key().public_bytes(der, spki) == key.public_key().public_bytes(
            der, spki
        )
    except Exception:  # a leaf key type the library cannot serialise
        raise CertificateError("the certificate's key is not supported") from None
    if not matches:
        raise CertificateError("privateKey does not match the certificate")
    names: list[str] = []
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        pass
    except ValueError:
        raise CertificateError("the certificate's extensions do not parse") from None
    wildcard = "*." + domain.split(".", 1)[-1]
    if domain not in names and wildcard not in names:
        raise CertificateError(f"certificate does not cover {domain[:253]!r}")
    not_after = leaf.not_valid_after_utc.timestamp()
    not_before = leaf.not_valid_before_utc.timestamp()
    current = time.time() if now is None else now
    if not_after <= current:
        raise CertificateError("certificate has expired")
    if not_before > current + 86400:
        raise CertificateError("certificate is not valid yet")
    return not_after
