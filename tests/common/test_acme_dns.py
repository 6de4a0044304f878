"""common.acme.dns: building a DNS-01 provider from the --acme-dns-* settings, bad
settings as clear errors that never show the secret.  Updates against a real server
(Knot): tests/gateway_core/test_acme_shared.py."""

from __future__ import annotations

import base64

import pytest

from common.acme.dns import DnsError, Rfc2136Provider, dns_provider, under

SECRET = base64.b64encode(b"s3cret-tsig-key-material-0123456").decode()


def options(**changes: str | None) -> dict[str, str | None]:
    base: dict[str, str | None] = {
        "server": "ns1.example.com",
        "zone": "example.com",
        "tsig_key": "acme-key",
        "tsig_algorithm": "hmac-sha256",
        "tsig_secret": SECRET,
    }
    return {**base, **changes}


@pytest.mark.parametrize(
    ("server", "host", "port"),
    [
        ("ns1.example.com", "ns1.example.com", 53),
        ("192.0.2.1:5353", "192.0.2.1", 5353),
        ("2001:db8::1", "2001:db8::1", 53),
        ("[2001:db8::1]:5300", "2001:db8::1", 5300),
        ("[::1]", "::1", 53),
    ],
)
def test_server_forms(server: str, host: str, port: int) -> None:
    provider = dns_provider("rfc2136", options(server=server))
    assert isinstance(provider, Rfc2136Provider)
    assert (provider.server, provider.port) == (host, port)
    assert provider.zones == ("example.com",)
    assert provider.covers("*.apps.example.com") and provider.covers("example.com")
    assert not provider.covers("example.org") and not provider.covers("badexample.com")
    assert SECRET not in repr(provider)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"server": None}, "needs --acme-dns-server"),
        ({"zone": ""}, "needs --acme-dns-zone"),
        ({"tsig_key": None}, "needs --acme-dns-tsig-key"),
        ({"tsig_secret": None}, "needs --acme-dns-tsig-secret"),
        ({"tsig_secret": "not base64!"}, "not base64"),
        ({"tsig_algorithm": "hmac-md5"}, "TSIG algorithm"),
        ({"server": "ns1:99999"}, "HOST:PORT"),
        ({"server": "[::1]x"}, "HOST:PORT"),
        ({"server": ":53"}, "HOST:PORT"),
    ],
)
def test_bad_settings(changes: dict[str, str | None], message: str) -> None:
    with pytest.raises(DnsError, match=message) as caught:
        dns_provider("rfc2136", options(**changes))
    assert SECRET not in str(caught.value)


def test_unknown_provider_names_the_known_ones() -> None:
    with pytest.raises(DnsError, match="known: rfc2136"):
        dns_provider("route53", options())


def test_under() -> None:
    assert under("*.apps.example.com.", "Example.com")
    assert under("example.com", "example.com")
    assert not under("example.com", "apps.example.com")


async def test_record_outside_the_zone_is_refused_before_any_network() -> None:
    provider = dns_provider("rfc2136", options(server="127.0.0.1:9"))
    with pytest.raises(DnsError, match="not in the zone"):
        await provider.present("_acme-challenge.example.org.", "value")
