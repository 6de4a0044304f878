"""control/certs.py: the one check a certificate passes before Control stores it."""

from __future__ import annotations

import time

import pytest

from control import certs
from gateway.tls import self_signed


def test_a_matching_unexpired_chain_returns_the_leafs_expiry() -> None:
    cert = self_signed("app.example.com", days=30)
    not_after = certs.verify("app.example.com", cert.chain_pem, cert.key_pem)
    assert 29 * 86400 < not_after - time.time() <= 30 * 86400


@pytest.mark.parametrize(
    ("domain", "chain", "key", "now", "says"),
    [
        ("app.example.com", "junk", None, None, "not a PEM chain"),
        ("app.example.com", None, "junk", None, "not an unencrypted PEM key"),
        ("app.example.com", None, "other", None, "does not match"),
        ("other.example.com", None, None, None, "does not cover"),
        ("app.example.com", None, None, time.time() + 31 * 86400, "expired"),
        ("app.example.com", None, None, time.time() - 2 * 86400, "not valid yet"),
    ],
)
def test_what_is_refused(
    domain: str, chain: str | None, key: str | None, now: float | None, says: str
) -> None:
    cert = self_signed("app.example.com", days=30)
    other = self_signed("app.example.com", days=30)
    chain = cert.chain_pem if chain is None else chain
    key = {None: cert.key_pem, "other": other.key_pem}.get(key, key)
    with pytest.raises(certs.CertificateError, match=says):
        certs.verify(domain, chain, key, now=now)
