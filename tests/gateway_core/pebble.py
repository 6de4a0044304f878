"""A real ACME server on loopback: Pebble plus pebble-challtestsrv as its DNS."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support import free_port, need_binary


@dataclass
class Pebble:
    """Where the running Pebble is and how to trust it."""

    directory: str
    listener_ca: str  # PEM file to verify Pebble's own HTTPS listener
    management: str

    def issuing_roots(self) -> str:
        """PEM of the root that signs the certificates Pebble issues."""
        trust = ssl.create_default_context(cafile=self.listener_ca)
        return httpx.get(f"{self.management}/roots/0", verify=trust).text


def _listener_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble test listener")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "listener.pem", directory / "listener.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@contextmanager
def running_pebble(directory: Path, http01_port: int) -> Iterator[Pebble]:
    """Pebble validating HTTP-01 against 127.0.0.1:``http01_port`` (every name → 127.0.0.1)."""
    need_binary("pebble")
    need_binary("pebble-challtestsrv")
    cert_file, key_file = _listener_certificate(directory)
    api, management, dns, dns_mgmt = free_port(), free_port(), free_port(), free_port()
    config = directory / "pebble.json"
    config.write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"127.0.0.1:{api}",
                    "managementListenAddress": f"127.0.0.1:{management}",
                    "certificate": str(cert_file),
                    "privateKey": str(key_file),
                    "httpPort": http01_port,
                    "tlsPort": free_port(),
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": False,
                }
            }
        )
    )
    env = {
        **os.environ,
        "PEBBLE_VA_NOSLEEP": "1",
        "PEBBLE_WFE_NONCEREJECT": "0",
        "PEBBLE_AUTHZREUSE": "0",
    }
    dns_server = subprocess.Popen(
        [
            "pebble-challtestsrv",
            "-dns01",
            f"127.0.0.1:{dns}",
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            f"127.0.0.1:{dns_mgmt}",
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = subprocess.Popen(
        ["pebble", "-config", str(config), "-dnsserver", f"127.0.0.1:{dns}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    trust = ssl.create_default_context(cafile=str(cert_file))
    try:
        pebble = Pebble(
            f"https://127.0.0.1:{api}/dir", str(cert_file), f"https://127.0.0.1:{management}"
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(pebble.directory, verify=trust).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("pebble did not start")
            time.sleep(0.1)
        yield pebble
    finally:
        for proc in (server, dns_server):
            proc.terminate()
            proc.wait(10)
