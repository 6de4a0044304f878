"""Two user-space WireGuard + TCP/IP endpoints on loopback UDP: no root, no TUN."""

from __future__ import annotations

import asyncio
import hashlib
import os

from common.keys import KeyPair
from netstack.tunnel import UserspaceTunnel


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


async def roundtrip(tunnel: UserspaceTunnel, host: str, payload: bytes, limit: float = 10) -> bytes:
    reader, writer = await tunnel.open_connection(host, 7, timeout=limit)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    received = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return received


async def test_tcp_through_userspace_wireguard_and_runtime_changes() -> None:
    gw_keys, agent_keys, other_keys = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    gateway = UserspaceTunnel(gw_keys.private, ["100.64.0.1"])
    agent = UserspaceTunnel(agent_keys.private, ["100.64.0.100"])
    other = UserspaceTunnel(other_keys.private, ["100.64.1.100"])
    for tunnel in (gateway, agent, other):
        await tunnel.start("127.0.0.1", 0)
    try:
        # The agent dials out to the gateway (as behind NAT); the gateway learns its endpoint.
        agent.set_peer(gw_keys.public_b64, ["100.64.0.1/32"], ("127.0.0.1", gateway.port), 1)
        gateway.set_peer(agent_keys.public_b64, ["100.64.0.100/32"])
        await agent.start_server(echo, 7)
        payload = os.urandom(3 * 1024 * 1024)
        assert (
            hashlib.sha256(await roundtrip(gateway, "100.64.0.100", payload)).digest()
            == hashlib.sha256(payload).digest()
        )
        (stat,) = gateway.stats()
        assert stat.handshake_age is not None and stat.rx_bytes > len(payload)

        # A second agent subnet appears: the gateway gains 100.64.1.1 and must use it as the
        # source towards that agent, whose WireGuard only accepts 100.64.1.1.
        gateway.set_addresses(["100.64.0.1", "100.64.1.1"])
        other.set_peer(gw_keys.public_b64, ["100.64.1.1/32"], ("127.0.0.1", gateway.port), 1)
        gateway.set_peer(other_keys.public_b64, ["100.64.1.100/32"])
        await other.start_server(echo, 7)
        assert await roundtrip(gateway, "100.64.1.100", b"second subnet") == b"second subnet"
        assert await roundtrip(gateway, "100.64.0.100", b"first still fine") == b"first still fine"

        # Removing a peer cuts it off; the other keeps working.
        gateway.remove_peer(agent_keys.public_b64)
        assert gateway.peer_keys() == {other_keys.public_b64}
        try:
            await roundtrip(gateway, "100.64.0.100", b"x", limit=2)
            raise AssertionError("a removed peer must be unreachable")
        except (TimeoutError, OSError):
            pass
        assert await roundtrip(gateway, "100.64.1.100", b"still here") == b"still here"
    finally:
        for tunnel in (gateway, agent, other):
            tunnel.close()


def test_tunnel_passes_its_tcp_config_to_the_stack() -> None:
    """The agent's ``--congestion`` reaches every connection through ``tcp_config``
    (the stack sets only the MSS per address family)."""
    from netstack.tcp import TcpConfig
    from netstack.tunnel import UserspaceTunnel

    tunnel = UserspaceTunnel(
        bytes(32), ["10.0.0.1"], tcp_config=TcpConfig(congestion_control="bbr")
    )
    conn = tunnel.stack.connect("10.0.0.2", 80, 0.0)
    assert conn._cc.name == "bbr" and conn._pacing
    assert UserspaceTunnel(bytes(32), ["10.0.0.1"]).stack.connect("10.0.0.2", 80, 0.0)._cc.name == (
        "cubic"
    )
