"""Shared ACME through Control (issue 17 items 2-3, issue 16 item 2), against real
servers on loopback: Pebble (the ACME server), Knot (an authoritative DNS server that
takes RFC 2136 updates signed with TSIG; Pebble resolves every name there), Control in
this process, two gateway processes (gw-a on 127.0.0.1, gw-b on 127.0.0.2, both on
Pebble's HTTP-01 port), and a second Control process with ``--acme-domain``.

* one certificate per domain, ordered once under Control's lease (by gw-a: fewest
  leases, then by name), its HTTP-01 answered by gw-b (the name points there) and by
  gw-a (another name), the certificate then served by both gateways;
* DNS-01: a ``*.apps.test`` tunnel and a ``www.apps.test`` tunnel beside it, one
  wildcard certificate from Knot's TXT record, both tunnels served with it by both
  gateways through a real agent (the exact name reaching its own app);
* renewal: the stored certificate made to expire within ``renew_before`` is ordered
  again once and the new one served by both gateways;
* the ordering gateway killed (SIGKILL) while Pebble validates: the lease goes to the
  other gateway, which completes the certificate;
* Control's own certificate from Pebble over HTTP-01 on its port-80 stand-in, installed
  without a restart, the key (the enrollment tokens' pin) kept, a client trusting
  Pebble's root connecting.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.runtime import Agent, AgentSettings
from common.token import spki_pin
from tests.controlserver import RunningControl, create
from tests.gateway_core.pebble import Knot, Pebble, running_knot, running_pebble
from tests.support import free_port

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

WAIT = 90.0  # seconds any one certificate may take on a loaded machine


@dataclass
class GatewayProcess:
    name: str
    ip: str
    https_port: int
    admin_port: int
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class Setup:
    tmp: Path
    knot: Knot
    pebble: Pebble
    trust: ssl.SSLContext  # Pebble's issuing root
    control: RunningControl
    api: httpx.AsyncClient
    http_port: int
    gateways: dict[str, GatewayProcess]
    agent_row: dict[str, Any]
    stack: ExitStack = field(default_factory=ExitStack)

    @property
    def coordinator(self) -> Any:
        return self.control.app.state.hub.acme


def gateway_command(setup: Setup, gw: GatewayProcess, key: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kakuremichi.cli",
        "gateway",
        "--control-url",
        setup.control.url,
        "--api-key",
        key,
        "--data-dir",
        str(gw.data_dir),
        "--public-ip",
        gw.ip,
        "--wireguard-port",
        str(free_port(kind=socket.SOCK_DGRAM)),
        "--wireguard-backend",
        "userspace",
        "--host",
        gw.ip,
        "--http-port",
        str(setup.http_port),
        "--https-port",
        str(gw.https_port),
        "--admin-port",
        str(gw.admin_port),
        "--acme-directory",
        setup.pebble.directory,
        "--acme-ca-file",
        setup.pebble.listener_ca,
        "--acme-email",
        "ops@example.com",
        "--acme-dns-provider",
        "rfc2136",
        "--acme-dns-server",
        setup.knot.address,
        "--acme-dns-zone",
        "test",
        "--acme-dns-tsig-key",
        setup.knot.key_name,
    ]


def start_gateway(setup: Setup, gw: GatewayProcess, key: str) -> None:
    env = {**os.environ, "KAKUREMICHI_ACME_DNS_TSIG_SECRET": setup.knot.secret}
    with gw.log.open("ab") as log:
        gw.proc = subprocess.Popen(
            gateway_command(setup, gw, key), stdout=log, stderr=subprocess.STDOUT, env=env
        )


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def wait_until(
    check: Callable[[], Awaitable[bool]], within: float, what: str, logs: list[Path] = ()
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if await check():
            return
        await asyncio.sleep(0.2)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"not within {within}s: {what}\n{tails}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Setup]:
    tmp = tmp_path_factory.mktemp("acme")
    http_port = free_port()
    stack = ExitStack()
    with stack:
        knot = stack.enter_context(running_knot(tmp / "knot"))
        (tmp / "pebble").mkdir()
        pebble = stack.enter_context(
            running_pebble(tmp / "pebble", http_port, dns_server=knot.address)
        )
        trust = ssl.create_default_context(cadata=pebble.issuing_roots())
        control = RunningControl(tmp / "control.db")
        await control.start()
        api = control.api()
        gateways = {
            name: GatewayProcess(
                name, ip, free_port(), free_port(), tmp / name, tmp / f"{name}.log"
            )
            for name, ip in (("gw-a", "127.0.0.1"), ("gw-b", "127.0.0.2"))
        }
        agent_row = await create(api, "agent", "apps")
        setup = Setup(tmp, knot, pebble, trust, control, api, http_port, gateways, agent_row, stack)
        try:
            for gw in gateways.values():
                start_gateway(setup, gw, (await create(api, "gateway", gw.name))["apiKey"])

            async def both_ready() -> bool:
                return len(setup.coordinator.capable) == 2

            await wait_until(both_ready, 60, "both gateways ready for ACME", gw_logs(setup))
            yield setup
        finally:
            for gw in gateways.values():
                stop(gw.proc)
            await api.aclose()
            await control.stop()


def gw_logs(setup: Setup) -> list[Path]:
    return [gw.log for gw in setup.gateways.values()]


async def served_leaf(ip: str, port: int, name: str) -> x509.Certificate | None:
    """The leaf a listener serves for SNI ``name`` (not verified), or None."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(ip, port, ssl=context, server_hostname=name), 5
        )
    except (OSError, ssl.SSLError, TimeoutError):
        return None
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der)
    finally:
        writer.close()


async def stored_leaf(api: httpx.AsyncClient, domain: str) -> x509.Certificate | None:
    response = await api.get(f"/api/certificates/{domain}")
    if response.status_code != 200:
        return None
    return x509.load_pem_x509_certificates(response.json()["certificate"].encode())[0]


async def wait_certificate(setup: Setup, domain: str) -> x509.Certificate:
    found: list[x509.Certificate] = []

    async def stored() -> bool:
        leaf = await stored_leaf(setup.api, domain)
        if leaf is not None:
            found.append(leaf)
        return leaf is not None

    await wait_until(stored, WAIT, f"a certificate for {domain} in Control", gw_logs(setup))
    return found[-1]


async def wait_served(setup: Setup, leaf: x509.Certificate, sni: str, gateways: list[str]) -> None:
    for name in gateways:
        gw = setup.gateways[name]

        async def serves(gw: GatewayProcess = gw) -> bool:
            return await served_leaf(gw.ip, gw.https_port, sni) == leaf

        await wait_until(serves, 30, f"{name} serving the certificate for {sni}", [gw.log])


def dns_names(leaf: x509.Certificate) -> list[str]:
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


async def tunnel(setup: Setup, domain: str, target: str = "127.0.0.1:9") -> httpx.Response:
    return await setup.api.post(
        "/api/tunnels",
        json={"protocol": "http", "domain": domain, "target": target, "agent": "apps"},
    )


async def test_one_order_per_domain_answered_by_whichever_gateway(setup: Setup) -> None:
    coordinator = setup.coordinator
    # one.test points at gw-b, two.test at gw-a; gw-a holds both leases
    setup.knot.set_a("one.test", "127.0.0.2")
    setup.knot.set_a("two.test", "127.0.0.1")
    for domain in ("one.test", "two.test"):
        assert (await tunnel(setup, domain)).status_code == 201
        leaf = await wait_certificate(setup, domain)
        assert dns_names(leaf) == [domain]
        assert coordinator.granted[domain] == 1  # ordered once

        async def recorded(domain: str = domain) -> bool:
            # (the certificate is stored a moment before the lease's end is recorded)
            return any(e["domain"] == domain for e in coordinator.recent)

        await wait_until(recorded, 10, f"the end of {domain}'s lease recorded")
        ended = [e for e in coordinator.recent if e["domain"] == domain]
        assert [(e["gateway"], e["outcome"]) for e in ended] == [("gw-a", "obtained")]
        await wait_served(setup, leaf, domain, ["gw-a", "gw-b"])
    # validated through gw-b for one.test: a Pebble-issued chain the root verifies
    gw_b = setup.gateways["gw-b"]
    _, writer = await asyncio.open_connection(
        gw_b.ip, gw_b.https_port, ssl=setup.trust, server_hostname="one.test"
    )
    writer.close()
    # nothing pending once the orders are done, and the REST view says who ordered
    assert coordinator.pending() == {}
    state = (await setup.api.get("/api/acme")).json()
    assert [g["name"] for g in state["gateways"]] == ["gw-a", "gw-b"]
    assert {("one.test", "gw-a", "obtained"), ("two.test", "gw-a", "obtained")} <= {
        (e["domain"], e["gateway"], e["outcome"]) for e in state["recent"]
    }


async def test_a_certificate_near_expiry_is_renewed_once_and_served_by_both(
    setup: Setup,
) -> None:
    """Renewal is an order like the first: Control's stored certificate for one.test is
    made to expire within ``renew_before``; it is ordered again once, by one gateway, and
    the new certificate (a new serial, the same name) reaches both gateways."""
    import sqlalchemy as sa

    from control.db.schema import certificates

    coordinator = setup.coordinator
    domain = "one.test"
    old = await wait_certificate(setup, domain)
    await wait_served(setup, old, domain, ["gw-a", "gw-b"])
    orders = coordinator.granted[domain]
    soon = time.time() + 86400.0  # a day left: inside renew_before (30 days)
    assert soon - time.time() < coordinator.renew_before
    store = setup.control.app.state.store
    async with store.engine.begin() as conn:
        await conn.execute(
            sa.update(certificates).where(certificates.c.domain == domain).values(not_after=soon)
        )
    store.generation += 1  # (a write outside the store: its readers' caches must see it)
    coordinator.wake()
    renewed: list[x509.Certificate] = []

    async def new_one() -> bool:
        leaf = await stored_leaf(setup.api, domain)
        if leaf is not None and leaf.serial_number != old.serial_number:
            renewed.append(leaf)
        return bool(renewed)

    await wait_until(new_one, WAIT, f"a renewed certificate for {domain}", gw_logs(setup))
    leaf = renewed[-1]
    assert dns_names(leaf) == [domain]
    assert leaf.not_valid_after_utc.timestamp() - time.time() > coordinator.renew_before
    await wait_served(setup, leaf, domain, ["gw-a", "gw-b"])
    assert coordinator.granted[domain] == orders + 1  # renewed once, not again and again

    async def recorded() -> bool:
        ended = [e["outcome"] for e in coordinator.recent if e["domain"] == domain]
        return ended == ["obtained"] * (orders + 1)

    await wait_until(recorded, 10, f"the renewal's lease of {domain} recorded as obtained")


async def word_app(word: bytes) -> asyncio.Server:
    """An HTTP/1.1 app answering every request with ``word``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(word), word))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_wildcard_certificate_over_dns01_for_two_tunnels(setup: Setup) -> None:
    coordinator = setup.coordinator
    # no gateway can prove a wildcard outside its DNS zone, and none was uploaded
    refused = await tunnel(setup, "*.apps.example.com")
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "wildcard_needs_certificate"

    wild, exact = await word_app(b"wild"), await word_app(b"exact")
    try:
        port = wild.sockets[0].getsockname()[1]
        created = await tunnel(setup, "*.apps.test", f"http://127.0.0.1:{port}")
        assert created.status_code == 201, created.text
        port = exact.sockets[0].getsockname()[1]
        assert (await tunnel(setup, "www.apps.test", f"http://127.0.0.1:{port}")).status_code == 201
        leaf = await wait_certificate(setup, "*.apps.test")
        assert dns_names(leaf) == ["*.apps.test"]
        assert coordinator.granted["*.apps.test"] == 1
        assert "www.apps.test" not in coordinator.granted  # the wildcard covers it
        assert setup.knot.txt("_acme-challenge.apps.test.") == []  # cleaned up

        agent = Agent(
            AgentSettings(
                control_url=setup.control.url,
                api_key=setup.agent_row["apiKey"],
                data_dir=setup.tmp / "agent",
                wireguard_host="127.0.0.1",
            )
        )
        await agent.start()
        try:
            for name in ("gw-a", "gw-b"):
                gw = setup.gateways[name]
                for host, word in (("foo.apps.test", b"wild"), ("www.apps.test", b"exact")):

                    async def answers(
                        gw: GatewayProcess = gw, host: str = host, word: bytes = word
                    ) -> bool:
                        return await https_body(gw, host, setup.trust) == word

                    await wait_until(answers, 60, f"{name} serving {host}", [gw.log])
        finally:
            await agent.stop()
    finally:
        for server in (wild, exact):
            server.close()


async def https_body(gw: GatewayProcess, host: str, trust: ssl.SSLContext) -> bytes | None:
    """GET / over HTTPS verified against Pebble's root (None if that fails)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(gw.ip, gw.https_port, ssl=trust, server_hostname=host), 5
        )
    except (OSError, ssl.SSLError, TimeoutError):
        return None
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 10)
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return body if head.startswith(b"HTTP/1.1 200") else None


async def test_the_other_gateway_completes_an_order_whose_gateway_died(setup: Setup) -> None:
    coordinator = setup.coordinator
    # Pebble validates three.test against a listener that accepts and never answers:
    # gw-a's order is certainly in flight while Pebble waits on it
    hits = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        hits.set()

    sink = await asyncio.start_server(hold, "127.0.0.3", setup.http_port)
    try:
        setup.knot.set_a("three.test", "127.0.0.3")
        assert (await tunnel(setup, "three.test")).status_code == 201
        await asyncio.wait_for(hits.wait(), WAIT)
        assert coordinator.leases["three.test"].gateway_name == "gw-a"
        gw_a = setup.gateways["gw-a"]
        assert gw_a.proc is not None
        gw_a.proc.kill()  # SIGKILL mid-order
        gw_a.proc.wait(10)
        setup.knot.set_a("three.test", "127.0.0.2")  # gw-b, for the order that follows
        leaf = await wait_certificate(setup, "three.test")
    finally:
        for writer in held:
            writer.close()
        sink.close()
    ended = [
        (e["gateway"], e["outcome"]) for e in coordinator.recent if e["domain"] == "three.test"
    ]
    assert ended == [("gw-a", "gateway left"), ("gw-b", "obtained")]
    assert coordinator.granted["three.test"] == 2
    await wait_served(setup, leaf, "three.test", ["gw-b"])


@pytest.fixture(scope="module")
def own_control(setup: Setup) -> Iterator[tuple[str, int, Path]]:
    """A Control process serving HTTPS for control.test with a certificate from Pebble."""
    data = setup.tmp / "own-control"
    port = free_port()
    log = setup.tmp / "own-control.log"
    setup.knot.set_a("control.test", "127.0.0.4")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kakuremichi.cli",
                "control",
                "--host",
                "127.0.0.4",
                "--port",
                str(port),
                "--data-dir",
                str(data),
                "--admin-token",
                "own-control-admin-token-0123",
                "--acme-domain",
                "control.test",
                "--acme-directory",
                setup.pebble.directory,
                "--acme-ca-file",
                setup.pebble.listener_ca,
                "--acme-http-port",
                str(setup.http_port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield "127.0.0.4", port, log
    finally:
        stop(proc)


async def test_control_gets_its_own_certificate(
    setup: Setup, own_control: tuple[str, int, Path]
) -> None:
    host, port, log = own_control
    first: list[x509.Certificate] = []

    async def placeholder() -> bool:
        leaf = await served_leaf(host, port, "control.test")
        if leaf is not None:
            first.append(leaf)
        return leaf is not None

    await wait_until(placeholder, 30, "Control serving HTTPS", [log])

    async def verified() -> bool:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host, port, ssl=setup.trust, server_hostname="control.test"
                ),
                5,
            )
        except (OSError, ssl.SSLError, TimeoutError):
            return False
        try:
            writer.write(b"GET /livez HTTP/1.1\r\nHost: control.test\r\nConnection: close\r\n\r\n")
            return (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 200")
        finally:
            writer.close()

    await wait_until(verified, WAIT, "Control's certificate from Pebble, verified", [log])
    leaf = await served_leaf(host, port, "control.test")
    assert leaf is not None and dns_names(leaf) == ["control.test"]
    # the same key before and after: tokens pinning Control's key stay valid
    assert spki_pin(leaf) == spki_pin(first[0])
    assert first[0].issuer == first[0].subject or first[0] == leaf  # the placeholder
    # the port-80 stand-in sends plain HTTP to HTTPS
    reader, writer = await asyncio.open_connection(host, setup.http_port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: control.test\r\n\r\n")
    head = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 308")
    assert f"Location: https://control.test:{port}/x\r\n".encode() in head
    key = serialization.load_pem_private_key(
        (setup.tmp / "own-control" / "tls" / "acme.key").read_bytes(), None
    )
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()  # type: ignore[union-attr]
