"""A real ACME server on loopback: Pebble plus pebble-challtestsrv as its DNS."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import ssl
import subprocess
import sys
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
    netns: str | None = None

    def issuing_roots(self) -> str:
        """PEM of the root that signs the certificates Pebble issues."""
        return _fetch(f"{self.management}/roots/0", self.listener_ca, self.netns) or ""


def _fetch(url: str, cafile: str, netns: str | None) -> str | None:
    """GET over HTTPS trusting ``cafile``, from inside ``netns`` if given; None on failure."""
    if netns is None:
        try:
            response = httpx.get(url, verify=ssl.create_default_context(cafile=cafile))
        except httpx.TransportError:
            return None
        return response.text if response.status_code == 200 else None
    code = (
        "import ssl,sys,urllib.request\n"
        "c=ssl.create_default_context(cafile=sys.argv[2])\n"
        "sys.stdout.write(urllib.request.urlopen(sys.argv[1],context=c,timeout=5).read().decode())"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code, url, cafile],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return out.stdout if out.returncode == 0 else None


def _listener_certificate(directory: Path, listen_ip: str) -> tuple[Path, Path]:
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
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address(listen_ip)),
                ]
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
def running_pebble(
    directory: Path,
    http01_port: int,
    *,
    netns: str | None = None,
    listen_ip: str = "127.0.0.1",
    target_ip: str = "127.0.0.1",
) -> Iterator[Pebble]:
    """Pebble validating HTTP-01 against ``target_ip``:``http01_port`` (every name
    resolves to ``target_ip``), its API on ``listen_ip``; inside ``netns`` if given
    (ports are then picked on the host but used in the namespace: fine, it is empty)."""
    need_binary("pebble")
    need_binary("pebble-challtestsrv")
    prefix = ["ip", "netns", "exec", netns] if netns else []
    cert_file, key_file = _listener_certificate(directory, listen_ip)
    api, management, dns, dns_mgmt = free_port(), free_port(), free_port(), free_port()
    config = directory / "pebble.json"
    config.write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"{listen_ip}:{api}",
                    "managementListenAddress": f"{listen_ip}:{management}",
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
            *prefix,
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
            target_ip,
            "-defaultIPv6",
            "",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = subprocess.Popen(
        [*prefix, "pebble", "-config", str(config), "-dnsserver", f"127.0.0.1:{dns}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pebble = Pebble(
            f"https://{listen_ip}:{api}/dir",
            str(cert_file),
            f"https://{listen_ip}:{management}",
            netns,
        )
        deadline = time.monotonic() + 30
        while True:
            if _fetch(pebble.directory, str(cert_file), netns) is not None:
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("pebble did not start")
            time.sleep(0.1)
        yield pebble
    finally:
        for proc in (server, dns_server):
            proc.terminate()
            proc.wait(10)
