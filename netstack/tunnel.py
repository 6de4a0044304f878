"""A rootless WireGuard endpoint: our WireGuard and our TCP/IP stack on one UDP socket.

Theory of operation: :class:`UserspaceTunnel` wires a sans-IO ``WireGuardEngine``
(served on a UDP socket by ``WireGuardSocket``) to a ``Stack`` (run by ``AsyncStack``) through
:class:`WireGuardLink`: IP packets the stack emits are encrypted and routed to the peer
whose allowed-IPs cover the destination; packets WireGuard decrypts are fed to the
stack.  Programs then use ``open_connection`` / ``start_server`` exactly like asyncio's,
with no TUN device, no root and no kernel module.  Peers and addresses change at run
time without disturbing the other peers' sessions.  This is the data plane of the agent
and of the gateway's ``userspace`` backend.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from netstack.aio import AsyncStack, NetstackServer
from netstack.stack import Stack
from netstack.tcp import TcpConfig
from netstack.wireguard.aio import WireGuardSocket
from netstack.wireguard.engine import WireGuardEngine

StreamCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


class WireGuardLink:
    """The ``PacketLink`` between the stack and WireGuard."""

    def __init__(self) -> None:
        self.udp: WireGuardSocket | None = None
        self._receive: Callable[[bytes], None] | None = None
        self.unroutable = 0

    def send(self, packet: bytes) -> None:
        if self.udp is not None and not self.udp.send_packet(packet):
            self.unroutable += 1  # no peer covers the destination: dropped, like IP

    def send_many(self, packets: list[bytes]) -> None:
        """A batch from one stack pass: encrypted and flushed to the socket once."""
        if self.udp is not None:
            self.unroutable += self.udp.send_packets(packets)

    def attach(self, receive: Callable[[bytes], None]) -> None:
        self._receive = receive

    def deliver(self, packet: bytes) -> None:
        if self._receive is not None:
            self._receive(packet)


@dataclass(frozen=True)
class TunnelPeerStats:
    """One peer as the tunnel sees it."""

    public_key: str
    endpoint: str | None
    handshake_age: float | None  # seconds since the last handshake, None = never
    rx_bytes: int
    tx_bytes: int


def _key(text: str) -> bytes:
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 32:
        raise ValueError("a WireGuard key is 32 bytes of base64")
    return raw


class UserspaceTunnel:
    """WireGuard + TCP/IP in user space, serving asyncio streams (see module docstring)."""

    def __init__(
        self,
        private_key: bytes,
        addresses: Iterable[str],
        mtu: int = 1420,
        tcp_config: TcpConfig | None = None,
    ) -> None:
        self.device = WireGuardEngine(
            private_key, random_bytes=os.urandom, wall_clock=time.time, mtu=mtu
        )
        self.stack = Stack(
            list(addresses), mtu=mtu, rng=random.SystemRandom(), tcp_config=tcp_config
        )
        self.link = WireGuardLink()
        self.udp: WireGuardSocket | None = None
        self.streams: AsyncStack | None = None

    async def start(self, host: str = "0.0.0.0", port: int = 0) -> None:
        self.udp = await WireGuardSocket.open(self.device, host, port, on_packet=self.link.deliver)
        self.link.udp = self.udp
        self.streams = AsyncStack(self.stack, self.link)

    @property
    def port(self) -> int:
        assert self.udp is not None
        return int(self.udp.local_address[1])

    def set_peer(
        self,
        public_key: str,
        allowed_ips: Iterable[str],
        endpoint: tuple[str, int] | None = None,
        persistent_keepalive: int | None = None,
    ) -> None:
        """Add or update one peer (the others are untouched)."""
        assert self.udp is not None
        self.device.set_peer(
            _key(public_key),
            allowed_ips=list(allowed_ips),
            endpoint=endpoint,
            persistent_keepalive=persistent_keepalive,
            now=self.udp.now(),
        )
        self.udp.flush()

    def initiate_handshake(self, public_key: str) -> None:
        """Start a fresh handshake with a peer now (e.g. after its endpoint moved)."""
        assert self.udp is not None
        self.device.initiate_handshake(_key(public_key), self.udp.now())
        self.udp.flush()

    async def create_datagram_endpoint(
        self, protocol_factory: Callable[[], asyncio.DatagramProtocol], local_port: int
    ) -> tuple[asyncio.DatagramTransport, asyncio.DatagramProtocol]:
        """Bind a UDP port on the tunnel's stack; like ``loop.create_datagram_endpoint``."""
        assert self.streams is not None
        return await self.streams.create_datagram_endpoint(protocol_factory, local_port)

    def remove_peer(self, public_key: str) -> None:
        self.device.remove_peer(_key(public_key))

    def peer_keys(self) -> set[str]:
        return {base64.b64encode(k).decode() for k in self.device.peers}

    def set_addresses(self, addresses: Iterable[str]) -> None:
        self.stack.set_addresses(list(addresses))

    async def open_connection(
        self,
        host: str,
        port: int,
        timeout: float = 10.0,  # noqa: ASYNC109 (asyncio.open_connection's shape)
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert self.streams is not None
        return await self.streams.open_connection(host, port, timeout=timeout)

    async def start_server(
        self, callback: StreamCallback, port: int, backlog: int = 4096
    ) -> NetstackServer:
        """Listen on ``port``; ``backlog`` bounds connections not yet accepted (half-open
        ones included), so it is generous: a gateway opens many at once."""
        assert self.streams is not None
        return await self.streams.start_server(callback, port, backlog=backlog)

    async def create_server(
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], port: int, backlog: int = 4096
    ) -> NetstackServer:
        """Listen on ``port`` with a protocol per connection (like ``loop.create_server``);
        ``backlog`` as for :meth:`start_server`."""
        assert self.streams is not None
        return await self.streams.create_server(protocol_factory, port, backlog=backlog)

    def stats(self) -> list[TunnelPeerStats]:
        now = self.udp.now() if self.udp is not None else 0.0
        result = []
        for key, peer in self.device.peers.items():
            endpoint = f"{peer.endpoint[0]}:{peer.endpoint[1]}" if peer.endpoint else None
            age = None if peer.last_handshake is None else max(0.0, now - peer.last_handshake)
            result.append(
                TunnelPeerStats(
                    base64.b64encode(key).decode(), endpoint, age, peer.rx_bytes, peer.tx_bytes
                )
            )
        return result

    def close(self) -> None:
        if self.streams is not None:
            self.streams.close()
        if self.udp is not None:
            self.udp.close()
