"""What a WireGuard engine's parts produce for its owner, collected between calls.

The handshake side (:mod:`.handshake`) and the transport side (:mod:`.transport`) both
send datagrams to peers and report events; :class:`Outbox` is the one place they put
them, and :class:`~netstack.wireguard.engine.WireGuardEngine` hands its lists to the
owner (``datagrams_to_send()``, ``packets_received()``, ``events()``).
"""

from __future__ import annotations

from .events import Address, EndpointChanged, Event
from .peer import Peer


class Outbox:
    """UDP datagrams to send, decrypted IP packets and events, in order of production."""

    __slots__ = ("datagrams", "events", "packets")

    def __init__(self) -> None:
        self.datagrams: list[tuple[bytes, Address]] = []
        self.packets: list[bytes] = []
        self.events: list[Event] = []

    def send(self, peer: Peer, data: bytes) -> None:
        """``data`` to ``peer``'s endpoint, if one is known yet (counted in tx_bytes)."""
        if peer.endpoint is not None:
            self.datagrams.append((data, peer.endpoint))
            peer.tx_bytes += len(data)

    def move_endpoint(self, peer: Peer, addr: Address) -> None:
        """An authenticated message from ``addr`` makes it ``peer``'s endpoint
        (roaming, whitepaper 2.1), reported when it moved."""
        if peer.endpoint != addr:
            peer.endpoint = addr
            self.events.append(EndpointChanged(peer.public_key, addr))
