"""SNI certificate selection with real TLS handshakes on loopback."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from cryptography import x509

from common.protocol import CertificateSpec
from gateway.tls import CertificateStore, self_signed
from tests.support import free_port


async def handshake(port: int, name: str) -> x509.Certificate:
    client = ssl.create_default_context()
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client, server_hostname=name
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return x509.load_der_x509_certificate(der)


def names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return list(san.value.get_values_for_type(x509.DNSName))


async def test_sni_selection_priority_and_updates(tmp_path: Path) -> None:
    store = CertificateStore(tmp_path / "certs")
    app = self_signed("app.example.com")
    wild = self_signed("*.wild.example.com")
    broken = CertificateSpec(  # parses as a message, but OpenSSL refuses it: skipped
        "broken.example.com",
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
        "-----BEGIN PRIVATE KEY-----\nnope\n",
        2e9,
    )
    store.set_control_certificates(
        [CertificateSpec(c.domain, c.chain_pem, c.key_pem, c.not_after) for c in (app, wild)]
        + [broken]
    )
    port = free_port()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port, ssl=store.server_context())
    try:
        assert names(await handshake(port, "app.example.com")) == ["app.example.com"]
        assert names(await handshake(port, "APP.example.com")) == ["app.example.com"]
        assert names(await handshake(port, "x.wild.example.com")) == ["*.wild.example.com"]
        assert names(await handshake(port, "unknown.example.com")) == ["kakuremichi.invalid"]
        # An ACME certificate for a name Control also has does not win.
        acme = self_signed("app.example.com")
        acme = type(acme)(acme.domain, acme.chain_pem, acme.key_pem, acme.not_after, "acme")
        store.add_acme_certificate(acme)
        served = await handshake(port, "app.example.com")
        assert (
            served.serial_number
            == x509.load_pem_x509_certificate(app.chain_pem.encode()).serial_number
        )
        # Control withdraws its certificate: the ACME one is used.
        store.set_control_certificates([])
        served = await handshake(port, "app.example.com")
        assert (
            served.serial_number
            == x509.load_pem_x509_certificate(acme.chain_pem.encode()).serial_number
        )
    finally:
        server.close()
        await server.wait_closed()
    keys = list((tmp_path / "certs").glob("*.key"))
    assert keys and all(k.stat().st_mode & 0o077 == 0 for k in keys)
