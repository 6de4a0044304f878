"""Control + gateway (userspace backend) + agent + sample app, all on loopback in one
event loop: HTTP, WebSocket, TCP and UDP tunnels end to end, live changes, Control
outages, the agent's stored configuration, error pages."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

from agent.runtime import Agent
from common.relay import proxyproto
from gateway.runtime import Gateway
from gateway.wg.userspace import UserspaceBackend
from kakuremichi.sampleapp import pattern_sha256
from tests.agent.loopback import System, running_system, tcp_echo, udp_echo
from tests.controlserver import RunningControl
from tests.support import free_port


async def agent_ip(system: System) -> str:
    async with asyncio.timeout(10):
        while not system.agent.data_plane.address:
            await asyncio.sleep(0.02)
    return str(system.agent.data_plane.address)


async def raw_request(system: System, request: bytes) -> bytes:
    """Straight to the agent's port 80 through the gateway's user-space WireGuard."""
    reader, writer = await system.gateway.wg.dial(await agent_ip(system), 80, 5)  # type: ignore[union-attr]
    writer.write(request)
    await writer.drain()
    try:
        async with asyncio.timeout(10):
            data = await reader.read()
    except ConnectionResetError:
        data = b""  # the agent refused the connection
    writer.close()
    return data


async def test_http_tunnel_end_to_end(
    control: RunningControl, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    metrics_port = free_port()
    async with running_system(control, api, tmp_path, metrics_port=metrics_port) as system:
        await system.tunnel(domain="app.example.com", target=f"http://127.0.0.1:{system.app.port}")
        await system.wait_status("app.example.com", 200, 30)
        home = await system.get("app.example.com")
        assert "sample app" in home.text
        # the userspace WireGuard socket honours the gateway's --host (127.0.0.1 here)
        wg = system.gateway.wg
        assert isinstance(wg, UserspaceBackend) and wg.tunnel.udp is not None
        assert wg.tunnel.udp.local_address[0] == "127.0.0.1"

        # The gateway's X-Forwarded-* reach the app unchanged (the agent adds nothing).
        seen = (await system.get("app.example.com", "/headers?x=1")).json()
        assert seen["host"] == "app.example.com"
        assert seen["x-forwarded-for"] == "127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"
        assert seen["x-forwarded-host"] == "app.example.com"
        assert seen["query"] == "x=1"

        # Bodies both ways, streamed, hash-checked; chunked upload too.
        body = os.urandom(5 * 1024 * 1024)
        echoed = await system.http.post("/echo", content=body, headers={"Host": "app.example.com"})
        assert (
            echoed.status_code == 200
            and hashlib.sha256(echoed.content).digest() == hashlib.sha256(body).digest()
        )

        async def chunks():  # type: ignore[no-untyped-def]
            for i in range(0, len(body), 300_000):
                yield body[i : i + 300_000]

        digest = await system.http.post(
            "/digest", content=chunks(), headers={"Host": "app.example.com"}
        )
        assert digest.json() == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        n = 20 * 1024 * 1024 + 17
        download = await system.get("app.example.com", f"/bytes/{n}")
        assert len(download.content) == n
        assert hashlib.sha256(download.content).hexdigest() == pattern_sha256(n)

        # WebSocket upgrade through gateway and agent.
        async with connect(
            "ws://app.example.com/ws", host="127.0.0.1", port=system.gateway.settings.http_port
        ) as ws:
            for message in ("hello", "x" * 100_000):
                await ws.send(message)
                assert await asyncio.wait_for(ws.recv(), 10) == message
            await ws.send(b"\x00\x01binary")
            assert await asyncio.wait_for(ws.recv(), 10) == b"\x00\x01binary"

        # Straight to the agent through WireGuard: without a PROXY header naming the
        # tunnel the connection is reset and nothing reaches the app; with one, the
        # agent splices it to the app as it is (no HTTP parsing, no rewriting).
        request = b"GET /headers HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n"
        assert await raw_request(system, request) == b""
        tunnel_id = system.gateway.router.lookup_host("app.example.com").tunnel_id  # type: ignore[union-attr]
        header = proxyproto.encode(tunnel_id=tunnel_id)
        answer = await raw_request(system, header + request)
        assert answer.startswith(b"HTTP/1.1 200") and b'"host":"other.example"' in answer
        assert await raw_request(system, proxyproto.encode(tunnel_id="nope") + request) == b""

        # The agent's own /metrics and /healthz.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{metrics_port}") as admin:
            health = await admin.get("/healthz")
            assert health.status_code == 200
            parts = health.json()["parts"]
            assert {name: part["state"] for name, part in parts.items()} == {
                "control": "ok",
                "config": "ok",
                "tasks": "ok",
                "wireguard": "ok",
            }, parts
            assert parts["wireguard"]["reason"] == "1 of 1 gateways have a live session"
            metrics = (await admin.get("/metrics")).text
        assert f'kakuremichi_http_tunnel_connections_total{{tunnel="{tunnel_id}"}}' in metrics
        assert 'reason="proxy_header"' in metrics and 'reason="unknown_tunnel"' in metrics


async def test_local_service_down_and_disabled_tunnel(
    control: RunningControl, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with running_system(control, api, tmp_path) as system:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()  # nothing listens there now
        tunnel = await system.tunnel(domain="down.example.com", target=f"127.0.0.1:{port}")
        await system.wait_status("down.example.com", 502, 30)
        page = await system.get("down.example.com")
        assert "local service refused" in page.text
        # The agent reports the target unhealthy to Control.
        async with asyncio.timeout(20):
            while True:
                row = (await api.get(f"/api/tunnels/{tunnel['id']}")).json()
                if row.get("health") == "unhealthy":
                    break
                await asyncio.sleep(0.2)
        # Disabled: the gateway answers 503 with the reason.
        response = await api.patch(f"/api/tunnels/{tunnel['id']}", json={"enabled": False})
        assert response.status_code == 200, response.text
        await system.wait_status("down.example.com", 503, 5)
        assert "disabled" in (await system.get("down.example.com")).text


async def test_tcp_and_udp_tunnels(
    control: RunningControl, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    echo = await tcp_echo()
    udp = await udp_echo()
    try:
        async with running_system(control, api, tmp_path) as system:
            tcp_public = 20000 + os.getpid() % 20000
            udp_public = tcp_public + 1
            echo_port = echo.sockets[0].getsockname()[1]
            udp_port = udp.get_extra_info("sockname")[1]
            await system.tunnel(
                protocol="tcp", public_port=tcp_public, target=f"127.0.0.1:{echo_port}"
            )
            await system.tunnel(
                protocol="udp", public_port=udp_public, target=f"127.0.0.1:{udp_port}"
            )
            await agent_ip(system)

            payload = os.urandom(3 * 1024 * 1024)
            async with asyncio.timeout(30):
                while True:
                    reader, writer = None, None
                    try:
                        reader, writer = await asyncio.open_connection("127.0.0.1", tcp_public)
                        writer.write(b"ping")
                        await writer.drain()
                        if await asyncio.wait_for(reader.readexactly(4), 3) == b"ping":
                            break
                    except (OSError, TimeoutError, asyncio.IncompleteReadError):
                        if writer is not None:
                            writer.close()
                        await asyncio.sleep(0.2)
                # Half-close: we send everything, then EOF; the echo answers all, then EOF.
                writer.write(payload)
                writer.write_eof()
                received = await reader.read()
                writer.close()
                await writer.wait_closed()
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()

            loop = asyncio.get_running_loop()
            replies: asyncio.Queue[bytes] = asyncio.Queue()

            class Client(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: object) -> None:
                    replies.put_nowait(data)

            transport, _ = await loop.create_datagram_endpoint(
                Client, remote_addr=("127.0.0.1", udp_public)
            )
            try:
                async with asyncio.timeout(20):
                    while True:
                        transport.sendto(b"hello")
                        try:
                            assert await asyncio.wait_for(replies.get(), 0.5) == b"echo:hello"
                            break
                        except TimeoutError:
                            continue
                for i in range(50):
                    transport.sendto(f"n{i}".encode())
                got = set()
                async with asyncio.timeout(10):
                    while len(got) < 45:  # UDP may drop; loopback rarely does
                        got.add(await replies.get())
                assert got <= {f"echo:n{i}".encode() for i in range(50)} | {b"echo:hello"}
            finally:
                transport.close()
    finally:
        echo.close()
        udp.close()


async def test_changes_take_effect_within_a_second(
    control: RunningControl, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with running_system(control, api, tmp_path) as system:
        target = f"http://127.0.0.1:{system.app.port}"
        first = await system.tunnel(domain="one.example.com", target=target)
        await system.wait_status("one.example.com", 200, 30)
        # create
        await system.tunnel(domain="two.example.com", target=target)
        assert await system.wait_status("two.example.com", 200, 5) < 1.0
        # update: a path prefix on the target shows up in what the app sees
        response = await api.patch(
            f"/api/tunnels/{first['id']}", json={"target": target + "/prefix"}
        )
        assert response.status_code == 200, response.text
        assert await system.wait_status("one.example.com", 404, 5) < 1.0  # /prefix/ is not a route
        seen = await system.get("one.example.com", "/headers")
        assert seen.status_code == 404
        # delete
        assert (await api.delete(f"/api/tunnels/{first['id']}")).status_code == 204
        assert await system.wait_status("one.example.com", 404, 5) < 1.0
        assert (await system.get("two.example.com")).status_code == 200


async def test_control_outage_keeps_traffic_and_resyncs(
    control: RunningControl, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with running_system(control, api, tmp_path) as system:
        target = f"http://127.0.0.1:{system.app.port}"
        await system.tunnel(domain="app.example.com", target=target)
        await system.wait_status("app.example.com", 200, 30)
        await control.stop()
        for _ in range(20):
            assert (await system.get("app.example.com")).status_code == 200
            await asyncio.sleep(0.05)
        # Both remember their configuration: restarted while Control is down (the
        # gateway first, then the agent, which handshakes afresh), they serve again.
        stored = json.loads((system.agent.state_path).read_text())
        assert [t["domain"] for t in stored["tunnels"]] == ["app.example.com"]
        assert oct(system.agent.state_path.stat().st_mode & 0o777) == "0o600"
        gateway_state = system.gateway.state_path
        stored = json.loads(gateway_state.read_text())
        assert [t["domain"] for t in stored["tunnels"]] == ["app.example.com"]
        assert [a["publicKey"] for a in stored["agents"]] == [system.agent.keys.public_b64]
        assert oct(gateway_state.stat().st_mode & 0o777) == "0o600"
        settings = system.gateway.settings
        await system.gateway.stop()
        system.gateway = Gateway(settings)
        await system.gateway.start()
        async with asyncio.timeout(5):  # routed from the stored file, Control still down
            while system.gateway.router.lookup_host("app.example.com") is None:
                await asyncio.sleep(0.02)
        await system.agent.stop()
        system.agent = Agent(system.agent.settings)
        await system.agent.start()
        await system.wait_status("app.example.com", 200, 30)
        # Control comes back (same database, same port): both clients re-sync.
        await control.start()
        async with asyncio.timeout(20):
            while not (
                system.agent.client.connected.is_set() and system.gateway.client.connected.is_set()
            ):
                await asyncio.sleep(0.05)
        async with control.api() as api2:
            response = await api2.post(
                "/api/tunnels",
                json={"agent": "laptop", "domain": "new.example.com", "target": target},
            )
            assert response.status_code == 201, response.text
        assert await system.wait_status("new.example.com", 200, 5) < 1.0


async def test_gateway_restarted_on_the_same_port_is_found_again(
    control: RunningControl, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The gateway loses every session (restart, same key, same port, so Control sends
    nothing new): the agent's probes make WireGuard re-handshake on its own."""
    async with running_system(control, api, tmp_path, probe_interval=1.0) as system:
        await system.tunnel(domain="app.example.com", target=f"http://127.0.0.1:{system.app.port}")
        await system.wait_status("app.example.com", 200, 30)
        settings = system.gateway.settings
        await system.gateway.stop()
        system.gateway = Gateway(settings)
        await system.gateway.start()
        # without probes this waits for the agent's next rekey (up to ~2.5 minutes)
        elapsed = await system.wait_status("app.example.com", 200, 40)
        assert elapsed < 40


async def test_disabled_agent_and_gateway_stop_serving_and_come_back(
    control: RunningControl, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A disabled agent: the gateway drops it as a peer and answers its tunnels 503 as
    disabled ones; a disabled gateway: told so by Control, it answers every tunnel 503
    and is not ready; either comes back with the same key once enabled."""
    async with running_system(control, api, tmp_path) as system:
        for client in (system.agent.client, system.gateway.client):
            client.settings.backoff_max = 0.3  # refused while disabled: retry often here
        await system.tunnel(domain="app.example.com", target=f"http://127.0.0.1:{system.app.port}")
        await system.wait_status("app.example.com", 200, 30)
        agent_id, gateway_id = system.agent_row["id"], system.gateway_row["id"]

        response = await api.patch(f"/api/agents/{agent_id}", json={"enabled": False})
        assert response.status_code == 200, response.text
        await system.wait_status("app.example.com", 503, 5)
        assert "disabled" in (await system.get("app.example.com")).text
        async with asyncio.timeout(5):  # no longer a WireGuard peer of the gateway
            while system.gateway.client.view.gateway_config().agents:  # type: ignore[union-attr]
                await asyncio.sleep(0.02)
        async with asyncio.timeout(5):
            while not system.agent.client.view.disabled:
                await asyncio.sleep(0.02)
        assert system.agent.runtime.health.report().parts["control"].state == "down"
        # nor does it peer with the gateway: enabled, it adds it afresh and handshakes
        assert system.agent.client.view.agent_config().gateways == ()  # type: ignore[union-attr]

        response = await api.patch(f"/api/agents/{agent_id}", json={"enabled": True})
        assert response.status_code == 200, response.text
        await system.wait_status("app.example.com", 200, 20)
        assert not system.agent.client.view.disabled

        response = await api.patch(f"/api/gateways/{gateway_id}", json={"enabled": False})
        assert response.status_code == 200, response.text
        async with httpx.AsyncClient(timeout=2) as probe:
            # (a request sent before the gateway heard may wait on the dropped peer)
            async with asyncio.timeout(10):
                while True:
                    with contextlib.suppress(httpx.TimeoutException):
                        page = await probe.get(
                            str(system.http.base_url), headers={"Host": "app.example.com"}
                        )
                        if page.status_code == 503:
                            break
                    await asyncio.sleep(0.05)
            assert "disabled" in page.text
            admin = f"http://127.0.0.1:{system.gateway.settings.admin_port}"
            ready = await probe.get(admin + "/readyz")
            assert ready.status_code == 503 and "disabled" in ready.text
            assert (await probe.get(admin + "/livez")).status_code == 200
        async with asyncio.timeout(5):  # the agent no longer peers with it
            while system.agent.client.view.agent_config().gateways:  # type: ignore[union-attr]
                await asyncio.sleep(0.02)

        response = await api.patch(f"/api/gateways/{gateway_id}", json={"enabled": True})
        assert response.status_code == 200, response.text
        await system.wait_status("app.example.com", 200, 20)
