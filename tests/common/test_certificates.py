"""The one self-signed certificate builder (``common/certificates.py``)."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.certificates import alt_names, self_signed, self_signed_pem


def test_names_become_dns_and_ip_alternative_names() -> None:
    alt = alt_names(["example.test", "127.0.0.1", "::1", "*.apps.test"])
    assert alt == [
        x509.DNSName("example.test"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.DNSName("*.apps.test"),
    ]


def test_a_self_signed_leaf_for_its_names() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed(key, ["control.test", "10.0.0.1"], days=7)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "control.test"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["control.test"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc < now < cert.not_valid_after_utc
    assert dt.timedelta(days=6) < cert.not_valid_after_utc - now <= dt.timedelta(days=7)
    cert.verify_directly_issued_by(cert)  # signed by its own key
    pem = self_signed_pem(key, ["control.test"], 1)
    assert x509.load_pem_x509_certificate(pem.encode()).public_key() == key.public_key()


def test_no_names_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one name"):
        self_signed(ec.generate_private_key(ec.SECP256R1()), [], 1)
