"""The gateway's ``userspace`` WireGuard backend: rootless, on netstack.

Same contract as :class:`gateway.wg.device.InterfaceBackend` (start / apply / stats / stop), but
the interface is our user-space WireGuard + TCP/IP (:mod:`netstack.tunnel`) on a UDP
socket, so the gateway needs no root, TUN or kernel module; the proxy dials agents
through :meth:`dial` instead of the kernel.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any

from common.keys import KeyPair
from common.logs import kv
from gateway.wg.state import PeerStats, WgState
from netstack.stack import StackError
from netstack.tunnel import UserspaceTunnel

log = logging.getLogger("gateway.wg")

# Before Control tells us our addresses the stack needs one; nothing routes to it.
_PLACEHOLDER = "169.254.255.254"


class _FlowProtocol(asyncio.DatagramProtocol):
    def __init__(self, peer: tuple[str, int], on_datagram: Callable[[bytes], None]) -> None:
        self.peer = peer
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if (str(addr[0]), addr[1]) == self.peer:  # like a connected socket
            self.on_datagram(data)


class _NetstackFlow:
    def __init__(self, transport: asyncio.DatagramTransport, peer: tuple[str, int]) -> None:
        self.transport = transport
        self.peer = peer

    def send(self, data: bytes) -> None:
        """Send one datagram; ``OSError`` (EMSGSIZE) for one the tunnel cannot carry
        (the stack never fragments), as a kernel socket would say, not a stack error."""
        try:
            self.transport.sendto(data, self.peer)
        except StackError as exc:
            raise OSError(errno.EMSGSIZE, str(exc)) from None

    def close(self) -> None:
        self.transport.close()


class UserspaceBackend:
    """WireGuard for the gateway without privileges (see the module docstring)."""

    kind = "userspace"

    def __init__(self, keys: KeyPair, listen_port: int, host: str = "0.0.0.0") -> None:
        self.keys = keys
        self.listen_port = listen_port
        self.host = host
        self.tunnel = UserspaceTunnel(keys.private, [_PLACEHOLDER])

    async def start(self) -> None:
        await self.tunnel.start(self.host, self.listen_port)
        log.info("WireGuard interface up", extra=kv(backend="userspace", port=self.tunnel.port))

    async def apply(self, state: WgState) -> None:
        addresses = [str(ipaddress.ip_interface(a).ip) for a in state.addresses] or [_PLACEHOLDER]
        self.tunnel.set_addresses(addresses)
        wanted = {p.public_key: p for p in state.peers}
        for key in self.tunnel.peer_keys() - wanted.keys():
            self.tunnel.remove_peer(key)
            log.info("removed WireGuard peer", extra=kv(backend="userspace", peer=key))
        for peer in state.peers:
            self.tunnel.set_peer(peer.public_key, peer.allowed_ips)

    async def stats(self) -> list[PeerStats]:
        now = time.time()
        return [
            PeerStats(
                s.public_key,
                s.endpoint,
                0.0 if s.handshake_age is None else now - s.handshake_age,
                s.rx_bytes,
                s.tx_bytes,
            )
            for s in self.tunnel.stats()
        ]

    async def dial(
        self, host: str, port: int, limit: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The proxy's dialer: a TCP connection to an agent through the tunnel."""
        return await self.tunnel.open_connection(host, port, timeout=limit)

    async def udp_flow(
        self, host: str, port: int, on_datagram: Callable[[bytes], None]
    ) -> _NetstackFlow:
        """The UDP forwarder's flow dialer: an ephemeral port on the user-space stack
        that exchanges datagrams with ``host:port`` only."""
        peer = (str(ipaddress.ip_address(host)), port)
        transport, _ = await self.tunnel.create_datagram_endpoint(
            lambda: _FlowProtocol(peer, on_datagram), 0
        )
        return _NetstackFlow(transport, peer)

    async def stop(self) -> None:
        self.tunnel.close()
