"""The whole system over HTTPS, on loopback with the userspace backend: Control + gateway
+ agent + sample app, the certificate issued by Pebble (a real ACME server) over
HTTP-01 and trusted through Pebble's root.  WebSocket over TLS, 100 MB hash-checked,
429 from the rate limit, agent stopped → 502 and back → 200 without touching the
gateway, Control restarted under a running download → nothing interrupted."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path

import httpx
from cryptography import x509
from websockets.asyncio.client import connect

from agent.runtime import Agent
from common.relay.limits import LimitSettings
from kakuremichi.sampleapp import pattern_sha256
from tests.agent.loopback import System, running_system
from tests.controlserver import RunningControl
from tests.gateway_core.pebble import running_pebble
from tests.support import free_port

DOMAIN = "app.example.com"


async def https_get(
    port: int, context: ssl.SSLContext, path: str
) -> tuple[int, dict[str, str], bytes, ssl.SSLObject | None]:
    """One HTTPS request to 127.0.0.1:port with SNI = DOMAIN; the body is read whole."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=DOMAIN
    )
    tls = writer.get_extra_info("ssl_object")
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {
            k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
        }
        body = await asyncio.wait_for(reader.read(), 120)
        return status, headers, body, tls
    finally:
        writer.close()


async def wait_https(system: System, context: ssl.SSLContext, within: float) -> None:
    port = system.gateway.settings.https_port
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: object = None
    while loop.time() < deadline:
        try:
            status, _, _, _ = await https_get(port, context, "/")
            if status == 200:
                return
            last = status
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError) as exc:
            last = exc
        await asyncio.sleep(0.2)
    raise AssertionError(f"no HTTPS 200 within {within}s: {last!r}")


async def test_https_with_acme_through_the_tunnel(
    control: RunningControl, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    http_port, https_port = free_port(), free_port()
    with running_pebble(tmp_path, http_port) as pebble:
        trust = ssl.create_default_context(cadata=pebble.issuing_roots())
        async with running_system(
            control,
            api,
            tmp_path,
            gateway_options={
                "http_port": http_port,
                "https_port": https_port,
                "acme_directory": pebble.directory,
                "acme_ca_file": pebble.listener_ca,
                "acme_email": "ops@example.com",
                "limits": LimitSettings(rate=20, burst=50),
            },
        ) as system:
            await system.tunnel(domain=DOMAIN, target=f"http://127.0.0.1:{system.app.port}")
            await wait_https(system, trust, 90)

            # The certificate is Pebble's, for the tunnel's name, and Control has it.
            status, _, body, tls = await https_get(https_port, trust, "/headers")
            assert status == 200 and tls is not None
            leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
            names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert names.get_values_for_type(x509.DNSName) == [DOMAIN]
            assert b'"x-forwarded-proto":"https"' in body
            async with asyncio.timeout(10):
                while DOMAIN not in [
                    c["domain"] for c in (await api.get("/api/certificates")).json()["items"]
                ]:
                    await asyncio.sleep(0.1)

            # WebSocket over TLS.
            async with connect(
                f"wss://{DOMAIN}/ws", host="127.0.0.1", port=https_port, ssl=trust
            ) as ws:
                await ws.send("over tls")
                assert await asyncio.wait_for(ws.recv(), 10) == "over tls"

            # 100 MB, hash-checked; Control restarts meanwhile and nothing is interrupted.
            size = 100 * 1024 * 1024
            download = asyncio.ensure_future(https_get(https_port, trust, f"/bytes/{size}"))
            await asyncio.sleep(0.5)
            await control.stop()
            await asyncio.sleep(0.5)
            await control.start()
            status, headers, body, _ = await download
            assert status == 200 and len(body) == size == int(headers["content-length"])
            assert hashlib.sha256(body).hexdigest() == pattern_sha256(size)
            assert (await https_get(https_port, trust, "/"))[0] == 200

            # The per-client rate limit: a burst beyond it gets 429 + Retry-After.
            async def one() -> httpx.Response:
                return await system.get(DOMAIN)

            answers = await asyncio.gather(*(one() for _ in range(120)))
            limited = [r for r in answers if r.status_code == 429]
            assert limited and all(r.headers.get("retry-after", "").isdigit() for r in limited)
            assert any(r.status_code == 200 for r in answers)
            await asyncio.sleep(3)  # let the bucket refill

            # The agent goes away → 502; it comes back → 200, the gateway untouched.
            settings = system.agent.settings
            await system.agent.stop()
            await system.wait_status(DOMAIN, 502, 30)
            system.agent = Agent(settings)
            await system.agent.start()
            await system.wait_status(DOMAIN, 200, 30)
