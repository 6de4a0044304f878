"""A stand-in agent for gateway tests: kernel TCP/IP + wireguard-go, configured from
Control through our Control client, serving a small HTTP app on port 80 behind the
PROXY v2 header every gateway connection starts with (the app echoes the tunnel id).

Run inside a network namespace:
    STANDIN_API_KEY=agt_… python -m tests.gateway_core.agent_standin CONTROL_URL IFNAME
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

from common.controlclient import ControlClient, ControlClientSettings, ControlView
from common.keys import KeyPair
from common.relay import proxyproto


def sh(*argv: str, input_text: str | None = None) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, input=input_text, timeout=30)


async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        try:
            tunnel = (await proxyproto.read_header(reader, 5.0)).tunnel_id
        except proxyproto.ProxyHeaderError:
            return
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {
                k.lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
            text = (
                f"agent says hi\nhost={headers.get('host')}\nxff={headers.get('x-forwarded-for')}\n"
                f"path={lines[0].split(' ')[1]}\nbody={len(body)}\ntunnel={tunnel}\n"
            ).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                + str(len(text)).encode()
                + b"\r\n\r\n"
                + text
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(control_url: str, ifname: str) -> None:
    api_key = os.environ["STANDIN_API_KEY"]
    keys = KeyPair.generate()
    wgo = subprocess.Popen(
        ["wireguard-go", "-f", ifname],
        env={**os.environ, "WG_PROCESS_FOREGROUND": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        if subprocess.run(["ip", "link", "show", ifname], capture_output=True).returncode == 0:
            break
        await asyncio.sleep(0.025)
    sh("wg", "set", ifname, "private-key", "/dev/stdin", input_text=keys.private_b64)
    sh("ip", "link", "set", ifname, "up")
    applied: dict[str, str] = {}

    def on_change(view: ControlView) -> None:
        config = view.agent_config()
        if config is None:
            return
        me = config.agent
        if "address" not in applied:
            prefix = me.subnet.split("/")[1]
            sh("ip", "addr", "add", f"{me.virtual_ip}/{prefix}", "dev", ifname)
            applied["address"] = me.virtual_ip
        for gw in config.gateways:
            if gw.endpoint:
                sh(
                    "wg",
                    "set",
                    ifname,
                    "peer",
                    gw.public_key,
                    "endpoint",
                    gw.endpoint,
                    "allowed-ips",
                    ",".join(gw.allowed_ips),
                    "persistent-keepalive",
                    "2",
                )

    client = ControlClient(
        ControlClientSettings(control_url, api_key, "agent", keys.public_b64, "standin"),
        on_change=on_change,
    )
    server = await asyncio.start_server(app, "0.0.0.0", 80)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    task = asyncio.create_task(client.run())
    print("standin ready", flush=True)
    await stop.wait()
    await client.stop()
    task.cancel()
    server.close()
    wgo.terminate()
    wgo.wait(5)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:3]))
