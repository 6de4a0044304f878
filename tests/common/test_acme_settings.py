"""The ACME flags of both programs: gateway --acme-dns-* (the secret from
KAKUREMICHI_ACME_DNS_TSIG_SECRET, never echoed) and control --acme-domain (a self-signed
placeholder with the key every later certificate keeps; conflicting flags refused)."""

from __future__ import annotations

import argparse
import base64
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from common.acme.dns import Rfc2136Provider
from common.config import ConfigError, Setting, add_settings, resolve

SECRET = base64.b64encode(b"tsig-secret-material-for-a-test!").decode()


def values(settings: tuple[Setting, ...], argv: list[str], env: dict[str, str]) -> Any:
    parser = argparse.ArgumentParser()
    add_settings(parser, settings)
    return resolve(parser.parse_args(argv), settings, env)


def gateway(argv: list[str], env: dict[str, str] | None = None) -> Any:
    from gateway.main import SETTINGS, settings_from

    base = ["--control-url", "http://127.0.0.1:1", "--api-key", "gtw_x", "--public-ip", "127.0.0.1"]
    return settings_from(values(SETTINGS, base + argv, env or {}))


DNS = [
    "--acme-directory",
    "https://acme.test/dir",
    "--acme-dns-provider",
    "rfc2136",
    "--acme-dns-server",
    "127.0.0.1:5353",
    "--acme-dns-zone",
    "example.com",
    "--acme-dns-tsig-key",
    "acme",
]


def test_gateway_dns_provider_from_flags_and_secret_env() -> None:
    assert gateway([]).acme_dns is None
    provider = gateway(DNS, {"KAKUREMICHI_ACME_DNS_TSIG_SECRET": SECRET}).acme_dns
    assert isinstance(provider, Rfc2136Provider)
    assert (provider.server, provider.port, provider.zones) == ("127.0.0.1", 5353, ("example.com",))
    with pytest.raises(ConfigError, match="needs --acme-dns-tsig-secret"):
        gateway(DNS)
    with pytest.raises(ConfigError, match="needs --acme-directory"):
        gateway(DNS[2:], {"KAKUREMICHI_ACME_DNS_TSIG_SECRET": SECRET})
    with pytest.raises(ConfigError) as caught:
        gateway(DNS, {"KAKUREMICHI_ACME_DNS_TSIG_SECRET": SECRET + "!"})
    assert SECRET not in str(caught.value)


def control(tmp_path: Path, argv: list[str]) -> Any:
    from control.main import SETTINGS, settings_from

    base = ["--data-dir", str(tmp_path), "--admin-token", "an-admin-token-0123456789"]
    return settings_from(values(SETTINGS, base + argv, {}))[0]


def test_control_acme_domain(tmp_path: Path) -> None:
    settings = control(tmp_path, ["--acme-domain", "Control.Example.com"])
    assert settings.acme is not None and settings.tls is not None
    assert settings.acme.domain == "control.example.com"
    assert settings.acme.client.directory_url.startswith("https://acme-v02.api.letsencrypt.org")
    placeholder = x509.load_pem_x509_certificate(settings.tls.cert_file.read_bytes())
    assert placeholder.issuer == placeholder.subject  # self-signed until the CA's arrives
    assert settings.acme.due(0.0)
    key = settings.tls.key_file.read_bytes()
    # a restart keeps the key (the pin in enrollment tokens)
    again = control(tmp_path, ["--acme-domain", "control.example.com"])
    assert again.tls.key_file.read_bytes() == key
    for argv, message in (
        (["--acme-domain", "control.example.com", "--tls-self-signed", "true"], "not with"),
        (["--acme-domain", "not a name"], "--acme-domain"),
        (["--acme-domain", "c.example.com", "--acme-directory", "http://x/"], "https://"),
        (["--acme-email", "ops@example.com"], "only with --acme-domain"),
    ):
        with pytest.raises(ConfigError, match=message):
            control(tmp_path / "other", argv)
