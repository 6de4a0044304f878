"""The gateway's WireGuard backend (wireguard-go here: the kernel has no module) against
a second, independent wireguard-go playing the agent, in namespaces made by the test."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from common.keys import KeyPair
from gateway.wg.device import InterfaceBackend, WgError
from gateway.wg.state import WgPeer, WgState
from tests.gateway_core.netns import sh, two_hosts
from tests.support import need_binary, need_root, unique_name


class AgentStandIn:
    """A plain wireguard-go + kernel TCP/IP in namespace B, configured with ``wg``."""

    def __init__(
        self, netns: str, name: str, keys: KeyPair, address: str, gateway: KeyPair, port: int
    ) -> None:
        self.netns, self.name, self.keys = netns, name, keys
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "wireguard-go", "-f", name],
            env={"WG_PROCESS_FOREGROUND": "1", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            if sh("ip", "link", "show", name, netns=netns, check=False).returncode == 0:
                break
            time.sleep(0.025)
        sh(
            "wg",
            "set",
            name,
            "private-key",
            "/dev/stdin",
            "peer",
            gateway.public_b64,
            "allowed-ips",
            "100.64.0.1/32",
            "endpoint",
            f"192.0.2.1:{port}",
            "persistent-keepalive",
            "1",
            netns=netns,
            input=self.keys.private_b64,
        )
        sh("ip", "addr", "add", address, "dev", name, netns=netns)
        sh("ip", "link", "set", name, "up", netns=netns)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def ping(netns: str, address: str, count: int = 1) -> bool:
    return (
        sh("ping", "-c", str(count), "-W", "2", address, netns=netns, check=False).returncode == 0
    )


async def test_reconcile_peers_and_carry_traffic() -> None:
    need_root()
    need_binary("wireguard-go")
    need_binary("wg")
    with two_hosts("wgd") as (gw_ns, agent_ns):
        gw_keys = KeyPair.generate()
        device = InterfaceBackend(unique_name("kgw"), gw_keys, 51820, mode="auto", netns=gw_ns)
        agent = None
        try:
            await device.start()
            assert device.kind == "wireguard-go"  # no kernel module on this machine
            agent_keys = KeyPair.generate()
            state = WgState(
                ("100.64.0.1/24",), (WgPeer(agent_keys.public_b64, ("100.64.0.100/32",), "a"),)
            )
            await device.apply(state)
            await device.apply(state)  # idempotent
            agent = AgentStandIn(
                agent_ns, unique_name("kag"), agent_keys, "100.64.0.100/24", gw_keys, 51820
            )
            assert await asyncio.to_thread(ping, agent_ns, "100.64.0.1", 3)
            assert await asyncio.to_thread(ping, gw_ns, "100.64.0.100")
            # TCP from the gateway side to a server on the agent side, through the tunnel.
            server = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    agent_ns,
                    sys.executable,
                    "-c",
                    "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
                    "s.bind(('100.64.0.100',8080));s.listen();c,_=s.accept();c.sendall(c.recv(100)[::-1]);c.close()",
                ]
            )
            await asyncio.sleep(0.5)
            reply = await asyncio.to_thread(
                sh,
                sys.executable,
                "-c",
                "import socket;c=socket.create_connection(('100.64.0.100',8080),5);c.sendall(b'hello');print(c.recv(100).decode())",
                netns=gw_ns,
            )
            server.wait(10)
            assert reply.stdout.strip() == "olleh"
            before = {s.public_key: s.latest_handshake for s in await device.stats()}
            assert before[agent.keys.public_b64] > 0
            # A second agent joins: the first one's session is untouched.
            other = KeyPair.generate()
            await device.apply(
                WgState(
                    ("100.64.0.1/24", "100.64.1.1/24"),
                    (*state.peers, WgPeer(other.public_b64, ("100.64.1.100/32",), "b")),
                )
            )
            after = {s.public_key: s.latest_handshake for s in await device.stats()}
            assert after[agent.keys.public_b64] == before[agent.keys.public_b64]
            assert other.public_b64 in after
            assert await asyncio.to_thread(ping, agent_ns, "100.64.0.1")
            # The first agent removed: its traffic stops, the address for it goes.
            await device.apply(
                WgState(("100.64.1.1/24",), (WgPeer(other.public_b64, ("100.64.1.100/32",)),))
            )
            assert not await asyncio.to_thread(ping, agent_ns, "100.64.0.1")
            assert {s.public_key for s in await device.stats()} == {other.public_b64}
        finally:
            if agent is not None:
                agent.stop()
            await device.stop()
        assert sh("ip", "link", "show", device.name, netns=gw_ns, check=False).returncode != 0


async def test_kernel_mode_reports_missing_module() -> None:
    need_root()
    with two_hosts("wgk") as (ns, _):
        device = InterfaceBackend(
            unique_name("kk"), KeyPair.generate(), 51820, mode="kernel", netns=ns
        )
        has_module = (
            sh(
                "ip", "link", "add", "kprobe0", "type", "wireguard", netns=ns, check=False
            ).returncode
            == 0
        )
        if has_module:
            pytest.skip("this kernel has WireGuard; the missing-module path cannot be shown")
        with pytest.raises(WgError, match="kernel WireGuard unavailable"):
            await device.start()
        await device.stop()
