"""A real ACME server on loopback: Pebble plus pebble-challtestsrv as its DNS, or plus
Knot (a real authoritative server taking RFC 2136 updates signed with TSIG) for DNS-01."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.tsig
import dns.update
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
    dns_server: str | None = None,
) -> Iterator[Pebble]:
    """Pebble validating HTTP-01 against ``target_ip``:``http01_port`` (every name
    resolves to ``target_ip``), its API on ``listen_ip``; inside ``netns`` if given
    (ports are then picked on the host but used in the namespace: fine, it is empty).
    With ``dns_server`` (``ip:port``, e.g. :func:`running_knot`'s) Pebble resolves
    names and DNS-01 records there instead."""
    need_binary("pebble")
    if dns_server is None:
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
    resolver = dns_server or f"127.0.0.1:{dns}"
    dns_process = (
        None
        if dns_server is not None
        else subprocess.Popen(
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
    )
    server = subprocess.Popen(
        [*prefix, "pebble", "-config", str(config), "-dnsserver", resolver],
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
        for proc in (server, dns_process):
            if proc is not None:
                proc.terminate()
                proc.wait(10)


@dataclass
class Knot:
    """A running Knot DNS server, authoritative for one zone, taking TSIG updates."""

    host: str
    port: int
    zone: str
    key_name: str
    secret: str  # base64

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _update(self) -> dns.update.UpdateMessage:
        keyring = {dns.name.from_text(self.key_name): dns.tsig.Key(self.key_name, self.secret)}
        return dns.update.UpdateMessage(self.zone, keyring=keyring)

    def set_a(self, name: str, address: str) -> None:
        """Point ``name`` (a name in the zone, e.g. ``app.test``) at ``address``."""
        update = self._update()
        relative = dns.name.from_text(name).relativize(dns.name.from_text(self.zone))
        update.replace(relative, 5, "A", address)
        response = dns.query.tcp(update, self.host, port=self.port, timeout=5)
        assert response.rcode() == dns.rcode.NOERROR, dns.rcode.to_text(response.rcode())

    def txt(self, name: str) -> list[str]:
        """The TXT values at ``name`` right now (fully qualified)."""
        query = dns.message.make_query(name, "TXT")
        response = dns.query.udp(query, self.host, port=self.port, timeout=5)
        return [b"".join(r.strings).decode() for rrset in response.answer for r in rrset]


@contextmanager
def running_knot(directory: Path, zone: str = "test") -> Iterator[Knot]:
    """Knot on 127.0.0.1 serving ``zone`` from an empty zone file, updatable with a
    fresh TSIG key (hmac-sha256), journal and state under ``directory``."""
    knotd = need_binary("knotd")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port(kind=socket.SOCK_DGRAM)
    secret = base64.b64encode(os.urandom(32)).decode()
    (directory / f"{zone}.zone").write_text(
        "$TTL 5\n"
        f"@ IN SOA ns.{zone}. admin.{zone}. 1 3600 600 86400 5\n"
        f"@ IN NS ns.{zone}.\n"
        "ns IN A 127.0.0.1\n"
    )
    (directory / "knot.conf").write_text(
        f"""server:
    rundir: "{directory}"
    listen: 127.0.0.1@{port}
database:
    storage: "{directory}"
log:
  - target: stderr
    any: warning
key:
  - id: kakuremichi-test
    algorithm: hmac-sha256
    secret: {secret}
acl:
  - id: update
    key: kakuremichi-test
    action: update
control:
    listen: "{directory}/knot.sock"
template:
  - id: default
    storage: "{directory}"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: changes
zone:
  - domain: {zone}
    file: "{zone}.zone"
    acl: update
"""
    )
    log = (directory / "knot.log").open("wb")
    server = subprocess.Popen(
        [knotd, "-c", str(directory / "knot.conf")], stdout=log, stderr=subprocess.STDOUT
    )
    knot = Knot("127.0.0.1", port, zone, "kakuremichi-test", secret)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                query = dns.message.make_query(f"ns.{zone}", "A")
                if dns.query.udp(query, "127.0.0.1", port=port, timeout=0.5).answer:
                    break
            except (dns.exception.DNSException, OSError):
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"knotd did not start: {(directory / 'knot.log').read_text()}")
            time.sleep(0.1)
        yield knot
    finally:
        server.terminate()
        server.wait(10)
        log.close()
