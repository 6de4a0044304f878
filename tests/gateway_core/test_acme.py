"""common.acme's client, HTTP-01 against Pebble, a real ACME server (Debian package), on
loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography import x509

from common.acme import AcmeClient, AcmeFailure, ChallengeStore, LocalHttp01
from tests.gateway_core.pebble import running_pebble
from tests.support import free_port


class SabotageableStore(ChallengeStore):
    """Answers challenges unless told to pretend it never heard of them."""

    sabotage = False

    def respond(self, path: str) -> str | None:
        return None if self.sabotage else super().respond(path)


async def challenge_server(store: ChallengeStore, port: int) -> asyncio.Server:
    """The bit of the gateway's HTTP listener that answers HTTP-01."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            body = store.respond(path)
            status = b"200 OK" if body is not None else b"404 Not Found"
            payload = (body or "not found").encode()
            writer.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Length: "
                + str(len(payload)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + payload
            )
            await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def test_obtain_and_reuse_account(tmp_path: Path) -> None:
    port = free_port()
    store = SabotageableStore()
    server = await challenge_server(store, port)
    try:
        with running_pebble(tmp_path, port) as pebble:
            acme = AcmeClient(
                pebble.directory,
                tmp_path / "state",
                http01=LocalHttp01(store),
                email="ops@example.com",
                verify=pebble.listener_ca,
                timeout=60,
            )
            cert = await acme.obtain(["app.example.com"])
            chain = x509.load_pem_x509_certificates(cert.chain_pem.encode())
            leaf = chain[0]
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert san.value.get_values_for_type(x509.DNSName) == ["app.example.com"]
            assert len(chain) >= 2 and leaf.issuer == chain[1].subject  # Pebble's intermediate
            assert "BEGIN PRIVATE KEY" in cert.key_pem and cert.names == ("app.example.com",)
            assert (tmp_path / "state" / "acme-account.key").stat().st_mode & 0o077 == 0
            # A second client with the same account key finds the existing account.
            again = AcmeClient(
                pebble.directory,
                tmp_path / "state",
                http01=LocalHttp01(store),
                verify=pebble.listener_ca,
                timeout=60,
            )
            assert (await again.obtain(["other.example.com"])).names == ("other.example.com",)
            # The CA cannot validate: a clear failure, nothing left published.
            store.sabotage = True
            with pytest.raises(AcmeFailure, match=r"bad\.example\.com"):
                await again.obtain(["bad.example.com"])
            assert store._tokens == {}
    finally:
        server.close()
        await server.wait_closed()
