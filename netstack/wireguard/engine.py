"""The sans-IO WireGuard engine: one interface's peers, its inputs and outputs, timers.

Theory of operation: a :class:`WireGuardEngine` is one WireGuard interface (a static
key pair and its peers) with no I/O of its own.  The owner feeds it

* ``receive_datagram(data, addr, now)`` -- a UDP datagram from the network (or a
  batch of them, ``receive_datagrams``),
* ``send_packet(ip_packet, now)`` -- an IP packet to route into the tunnel (or a
  batch, ``send_packets``),
* ``handle_timer(now)`` -- when ``next_deadline()`` has passed,

and collects ``datagrams_to_send()`` (UDP payload, address), ``packets_received()``
(decrypted, source-checked IP packets) and ``events()``.  ``now`` is a monotonic time
in seconds; the wall clock (for TAI64N only) and the random source are injected.

The message flow follows the whitepaper (section 5) and, where the paper is silent,
wireguard-go's device package, so that timing and state match the real thing.  The
engine ties together its parts, each with its own theory of operation:

* :mod:`.handshake` -- initiations, responses and cookie replies; local indices and
  the keypairs a handshake leaves behind;
* :mod:`.transport` -- IP packets sealed to peers and transport messages opened from
  them, staging, keepalives, roaming, the cryptokey source check;
* :mod:`.timers` -- the per-peer timers (6.1-6.5) and the heap over all peers; what
  each timer does when it fires is here, in :meth:`WireGuardEngine.handle_timer`;
* :mod:`.outbox` -- what the parts produce for the owner.

Malformed or unauthenticated datagrams are dropped silently: no method here raises on
network input.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .allowedips import AllowedIPs, Network, parse_network
from .crypto import dh, private_key_from_bytes, public_key_of
from .errors import ConfigError, HandshakeError, MessageError
from .events import Address, Event, HandshakeGaveUp, KeysZeroed
from .handshake import Handshakes
from .load import QUEUE_HANDSHAKE_SIZE
from .messages import (
    INITIATION_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_HEADER,
    TRANSPORT_MIN_SIZE,
    message_type,
)
from .outbox import Outbox
from .peer import Keypair, Peer
from .tai64n import Tai64nClock
from .timers import (
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    ZERO_KEY_MATERIAL_AFTER,
    Jitter,
    TimerHeap,
)
from .transport import DEFAULT_MTU, Transport

RandomBytes = Callable[[int], bytes]


class WireGuardEngine:
    """A sans-IO WireGuard interface: one static identity and its peers (see the
    module docstring; :class:`~netstack.wireguard.aio.WireGuardSocket` runs one on a
    UDP socket)."""

    def __init__(
        self,
        private_key: bytes,
        *,
        random_bytes: RandomBytes,
        wall_clock: Callable[[], float],
        mtu: int = DEFAULT_MTU,
        last_timestamp: bytes | None = None,
    ) -> None:
        try:
            static: X25519PrivateKey = private_key_from_bytes(private_key)
        except HandshakeError as exc:
            raise ConfigError("PrivateKey must be 32 bytes") from exc
        self._static = static
        self.public_key = public_key_of(static)
        jitter = Jitter(int.from_bytes(random_bytes(8), "little"))
        self._clock = Tai64nClock(wall_clock, last_timestamp)
        self._peers: dict[bytes, Peer] = {}
        self._routes: AllowedIPs[Peer] = AllowedIPs()
        index: dict[int, Peer | Keypair] = {}
        self._outbox = Outbox()
        self._timers: TimerHeap[Peer] = TimerHeap()
        self._handshakes = Handshakes(
            static,
            self.public_key,
            random_bytes=random_bytes,
            clock=self._clock,
            jitter=jitter,
            peers=self._peers,
            index=index,
            outbox=self._outbox,
            touched=self._timers.touched,
        )
        self._transport = Transport(
            mtu=mtu,
            handshakes=self._handshakes,
            routes=self._routes,
            index=index,
            outbox=self._outbox,
            touched=self._timers.touched,
            jitter=jitter,
        )

    @property
    def mtu(self) -> int:
        """The tunnel MTU transport messages are padded within."""
        return self._transport.mtu

    # ------------------------------------------------------------------ outputs

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """UDP payloads and destinations produced since the last call."""
        outbox = self._outbox
        out, outbox.datagrams = outbox.datagrams, []
        return out

    def packets_received(self) -> list[bytes]:
        """Decrypted IP packets (padding removed, source checked) since the last call."""
        outbox = self._outbox
        packets, outbox.packets = outbox.packets, []
        return packets

    def events(self) -> list[Event]:
        """Events since the last call (:mod:`.events`)."""
        outbox = self._outbox
        events, outbox.events = outbox.events, []
        return events

    @property
    def last_timestamp(self) -> bytes | None:
        """The last TAI64N timestamp sent; persist it and pass it back after a restart."""
        return self._clock.last

    # ------------------------------------------------------------------ peers

    @property
    def peers(self) -> dict[bytes, Peer]:
        return dict(self._peers)

    def peer(self, public_key: bytes) -> Peer | None:
        return self._peers.get(public_key)

    def set_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes | None = None,
        allowed_ips: Iterable[str | Network] | None = None,
        endpoint: Address | None = None,
        persistent_keepalive: int | None = None,
        now: float | None = None,
    ) -> Peer:
        """Add a peer or update the given settings of an existing one (like ``wg set``).

        ``allowed_ips``, when given, replaces the peer's prefixes.  With ``now`` and a
        newly enabled persistent keepalive a keepalive is sent at once, as wg does.
        """
        if len(public_key) != 32:
            raise ConfigError("PublicKey must be 32 bytes")
        if preshared_key is not None and len(preshared_key) != 32:
            raise ConfigError("PresharedKey must be 32 bytes")
        if persistent_keepalive is not None and not 0 <= persistent_keepalive <= 65535:
            raise ConfigError("PersistentKeepalive must be 0..65535 seconds")
        if public_key == self.public_key:
            raise ConfigError("a peer cannot have the interface's own public key")
        networks = None if allowed_ips is None else [_network(n) for n in allowed_ips]
        peer = self._peers.get(public_key)
        if peer is None:
            try:
                static_static = dh(self._static, public_key)
            except HandshakeError as exc:
                raise ConfigError("PublicKey is a low-order point") from exc
            peer = Peer(public_key, static_static)
            self._peers[public_key] = peer
        if preshared_key is not None:
            peer.preshared_key = preshared_key
        if endpoint is not None:
            peer.endpoint = endpoint
        if networks is not None:
            self._routes.remove_value(peer)
            for network in networks:
                self._routes.insert(network, peer)
        if persistent_keepalive is not None:
            was = peer.timers.persistent_keepalive_interval
            peer.timers.persistent_keepalive_interval = persistent_keepalive
            if persistent_keepalive == 0:
                peer.timers.persistent_keepalive = None
            elif was == 0 and now is not None:
                self._transport.send_keepalive(peer, now)
        self._timers.touched.add(peer)
        return peer

    def allowed_ips(self, public_key: bytes) -> list[Network]:
        peer = self._peers.get(public_key)
        return [] if peer is None else list(self._routes.networks_of(peer))

    def remove_peer(self, public_key: bytes) -> None:
        """Forget a peer, its keys, indices and routes; other peers are untouched."""
        peer = self._peers.pop(public_key, None)
        if peer is None:
            return
        self._routes.remove_value(peer)
        self._handshakes.zero_and_flush(peer)
        peer.timers.stop()
        self._timers.forget(peer)

    # ------------------------------------------------------------------ input

    def receive_datagram(self, data: bytes, addr: Address, now: float, *, backlog: int = 0) -> None:
        """Process one UDP datagram from ``addr``.

        ``backlog`` is how many handshake datagrams are still waiting behind this one
        (the adapter knows its batch); 128 or more puts the engine under load for 1 s
        (:mod:`.load` has the other signal, the rate of handshakes).
        """
        if len(data) >= TRANSPORT_MIN_SIZE:
            kind, receiver, counter = TRANSPORT_HEADER.unpack_from(data)
            if kind == MESSAGE_TRANSPORT:  # type 4 with zero reserved bytes
                self._transport.receive(data, receiver, counter, addr, now)
                return
        kind = message_type(data)
        if kind is None or kind == MESSAGE_TRANSPORT:
            return
        try:
            if kind == MESSAGE_COOKIE_REPLY:
                self._handshakes.receive_cookie_reply(data, now)
                return
            initiator = self._handshakes.receive(kind, bytes(data), addr, now, backlog)
        except MessageError:  # pragma: no cover - sizes were checked by message_type
            return
        if initiator is not None:  # our new session: the staged packets or a keepalive
            self._transport.send_keepalive(initiator, now)

    def receive_datagrams(
        self,
        batch: Iterable[tuple[bytes, Address]],
        now: float,
        *,
        deferred: list[tuple[bytes, Address]] | None = None,
    ) -> None:
        """Process a batch of UDP datagrams received together (what the asyncio adapter
        drains per wake-up); the same result as :meth:`receive_datagram` on each in
        turn, with the per-peer bookkeeping of a run of transport messages done once
        (:meth:`.Transport.receive_run`), except that handshake messages beyond the
        batch's first QUEUE_HANDSHAKE_SIZE (1024) are dropped, as wireguard-go drops
        them when its handshake queue is full.

        With ``deferred``, every datagram that is not a transport message (handshakes,
        cookie replies, garbage) is appended to it instead, for the caller to pass back
        here once it has flushed what the transport messages produced: wireguard-go's
        separate handshake queue, so a flood of initiations in the same batch does not
        hold the tunnel's packets back until every one of them has been answered.
        """
        batch = batch if isinstance(batch, list) else list(batch)
        handshakes = -1  # handshake messages from here on; counted at the first one
        taken = 0  # handshake messages of this batch so far
        receive_run = self._transport.receive_run
        unpack = TRANSPORT_HEADER.unpack_from
        position = 0
        count = len(batch)
        while position < count:
            data, addr = batch[position]
            position += 1
            if len(data) >= TRANSPORT_MIN_SIZE:
                kind, receiver, counter = unpack(data)
                if kind == MESSAGE_TRANSPORT:
                    position = receive_run(batch, position, receiver, counter, addr, now)
                    continue
            if deferred is not None:
                deferred.append((data, addr))
                continue
            if handshakes < 0:
                handshakes = sum(1 for item, _ in batch[position - 1 :] if is_handshake(item))
            if handshakes and is_handshake(data):
                handshakes -= 1
                taken += 1
                if taken > QUEUE_HANDSHAKE_SIZE:
                    continue  # wireguard-go's handshake queue is full: dropped unread
            self.receive_datagram(data, addr, now, backlog=handshakes)

    # ------------------------------------------------------------------ output

    def send_packet(self, packet: bytes, now: float) -> bool:
        """Route an IP packet to its peer by destination and encrypt it (or stage it
        until a session exists).  False if no peer's allowed IPs cover it."""
        return self._transport.send_packet(packet, now)

    def send_packets(self, packets: Iterable[bytes], now: float) -> int:
        """Route and encrypt a batch of IP packets (as :meth:`send_packet` on each in
        turn, runs to one peer sealed in one call); returns how many no peer's allowed
        IPs cover."""
        return self._transport.send_packets(
            packets if isinstance(packets, list) else list(packets), now
        )

    def send_keepalive(self, public_key: bytes, now: float) -> None:
        """Send a keepalive to a peer (starting a handshake if there is no session)."""
        peer = self._peers.get(public_key)
        if peer is not None:
            self._timers.touched.add(peer)
            self._transport.send_keepalive(peer, now)

    def initiate_handshake(self, public_key: bytes, now: float, *, force: bool = False) -> None:
        """Start a handshake now, subject to the REKEY_TIMEOUT rate limit unless
        ``force`` (the previous initiation took a path that turned out dead, e.g. UDP
        that is blocked, and the peer never saw it)."""
        peer = self._peers.get(public_key)
        if peer is not None:
            self._timers.touched.add(peer)
            self._handshakes.initiate(peer, now, is_retry=False, force=force)

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        """The earliest time ``handle_timer`` must be called, or None."""
        return self._timers.next_deadline()

    def handle_timer(self, now: float) -> None:
        """Fire every peer timer whose deadline is at or before ``now``."""
        for peer in self._timers.due(now):
            if self._peers.get(peer.public_key) is not peer:
                continue  # removed
            self._timers.touched.add(peer)
            self._fire_timers(peer, now)

    def _fire_timers(self, peer: Peer, now: float) -> None:
        timers = peer.timers
        if timers.retransmit_handshake is not None and timers.retransmit_handshake <= now:
            timers.retransmit_handshake = None
            self._expired_retransmit_handshake(peer, now)
        if timers.send_keepalive is not None and timers.send_keepalive <= now:
            timers.send_keepalive = None
            self._transport.send_keepalive(peer, now)
            if timers.need_another_keepalive:
                timers.need_another_keepalive = False
                timers.send_keepalive = now + KEEPALIVE_TIMEOUT
        if timers.new_handshake is not None and timers.new_handshake <= now:
            timers.new_handshake = None
            self._handshakes.initiate(peer, now, is_retry=False)
        if timers.zero_key_material is not None and timers.zero_key_material <= now:
            timers.zero_key_material = None
            self._handshakes.zero_and_flush(peer)
            self._outbox.events.append(KeysZeroed(peer.public_key))
        if timers.persistent_keepalive is not None and timers.persistent_keepalive <= now:
            timers.persistent_keepalive = None
            if timers.persistent_keepalive_interval > 0:
                self._transport.send_keepalive(peer, now)

    def _expired_retransmit_handshake(self, peer: Peer, now: float) -> None:
        timers = peer.timers
        if timers.handshake_attempts > MAX_TIMER_HANDSHAKES:
            timers.send_keepalive = None
            peer.staged.clear()
            self._outbox.events.append(HandshakeGaveUp(peer.public_key))
            if timers.zero_key_material is None:
                timers.zero_key_material = now + ZERO_KEY_MATERIAL_AFTER
        else:
            timers.handshake_attempts += 1
            self._handshakes.initiate(peer, now, is_retry=True)


def is_handshake(data: bytes) -> bool:
    """An initiation or a response (what counts towards the handshake backlog)."""
    size = len(data)
    return bool(size) and (
        (data[0] == MESSAGE_INITIATION and size == INITIATION_SIZE)
        or (data[0] == MESSAGE_RESPONSE and size == RESPONSE_SIZE)
    )


def _network(value: str | Network) -> Network:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    return parse_network(value)
