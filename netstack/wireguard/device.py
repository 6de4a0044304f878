"""The sans-IO WireGuard device: handshakes, transport, timers, cryptokey routing.

Theory of operation: a :class:`Device` is one WireGuard interface (a static key pair
and its peers) with no I/O of its own.  The owner feeds it

* ``receive_datagram(data, addr, now)`` -- a UDP datagram from the network,
* ``send_packet(ip_packet, now)`` -- an IP packet to route into the tunnel,
* ``handle_timer(now)`` -- when ``next_deadline()`` has passed,

and collects ``datagrams_to_send()`` (UDP payload, address), ``packets_received()``
(decrypted, source-checked IP packets) and ``events()``.  ``now`` is a monotonic time
in seconds; the wall clock (for TAI64N only) and the random source are injected.

The message flow follows the whitepaper (section 5) and, where the paper is silent,
wireguard-go's device package, so that timing and state match the real thing:

* initiation (5.4.2): mac1 is always checked; under load (see :mod:`.load`: a
  handshake backlog of at least 128, or handshakes arriving faster than ~500/s for a
  while, remembered for 1 s) mac2 is required, or a cookie reply is sent instead, and
  each source IP is rate limited (20/s, burst 5); responses are gated alike.  A valid
  initiation whose timestamp is newer than the last one and that comes >= 20 ms after
  the previous one is answered.
* response (5.4.3): the responder derives its keypair at once but keeps it as
  ``next`` until the first transport packet confirms it (5.4.6); the initiator makes
  its keypair ``current`` on the response and sends a keepalive (or staged data).
* transport (5.4.6): counter nonce, zero padding to a multiple of 16 within the
  MTU, replay window, keypairs rejected after REJECT_AFTER_TIME or
  REJECT_AFTER_MESSAGES; rekey as initiator after REKEY_AFTER_TIME (sending) or
  shortly before REJECT_AFTER_TIME (receiving).  The inbound source address must
  route back to the same peer (cryptokey routing), and an authenticated packet from a
  new address moves the peer's endpoint (roaming).
* timers (6.1-6.5): see :mod:`.timers`.

Malformed or unauthenticated datagrams are dropped silently: this method never
raises on network input.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import random
from collections.abc import Callable, Iterable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import noise
from .allowedips import AllowedIPs, Network, parse_network
from .cookie import CookieChecker, address_bytes
from .crypto import dh, private_key_from_bytes, public_key_of
from .errors import ConfigError, HandshakeError, MessageError
from .events import (
    Address,
    CookieReceived,
    EndpointChanged,
    Event,
    HandshakeCompleted,
    HandshakeGaveUp,
    KeysZeroed,
)
from .load import QUEUE_HANDSHAKE_SIZE, HandshakeLoad
from .messages import (
    INITIATION_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_HEADER,
    TRANSPORT_MIN_SIZE,
    CookieReply,
    Initiation,
    Response,
    message_type,
)
from .peer import HandshakeStage, Keypair, Peer
from .ratelimit import RateLimiter
from .speedups import open_run, seal_run
from .tai64n import Tai64nClock
from .timers import (
    HANDSHAKE_INITIATION_RATE,
    KEEPALIVE_TIMEOUT,
    LAST_MINUTE_HANDSHAKE_AGE,
    MAX_TIMER_HANDSHAKES,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX_MS,
    ZERO_KEY_MATERIAL_AFTER,
)

DEFAULT_MTU = 1420
MAX_CONTENT_SIZE = 65535 - TRANSPORT_MIN_SIZE
_ZERO_MAC = bytes(16)

RandomBytes = Callable[[int], bytes]


def padding_size(size: int, mtu: int) -> int:
    """Zero bytes appended to a ``size``-byte packet (wireguard-go calculatePaddingSize)."""
    if mtu <= 0:
        return -size % 16
    last_unit = size % mtu if size > mtu else size
    padded = (last_unit + 15) & ~15
    return min(padded, mtu) - last_unit


class Device:
    """A sans-IO WireGuard interface: one static identity and its peers."""

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
            self._static: X25519PrivateKey = private_key_from_bytes(private_key)
        except HandshakeError as exc:
            raise ConfigError("PrivateKey must be 32 bytes") from exc
        self.public_key = public_key_of(self._static)
        self.mtu = mtu
        self._random = random_bytes
        # timer jitter needs no secrecy: a PRNG seeded once, not a getrandom() per
        # data packet sent after a receive (that was one syscall per HTTP exchange)
        self._jitter_rng = random.Random(int.from_bytes(random_bytes(8), "little"))
        self._responder_base = noise.begin(self.public_key)
        self._cookies = CookieChecker(self.public_key, random_bytes)
        self._rate = RateLimiter()
        self._clock = Tai64nClock(wall_clock, last_timestamp)
        self._load = HandshakeLoad()
        self._peers: dict[bytes, Peer] = {}
        self._routes: AllowedIPs[Peer] = AllowedIPs()
        self._route_cache = self._routes.cache  # probed inline on the data path
        self._last_sent_peer: Peer | None = None  # set by send_packet's fast path
        self._index: dict[int, Peer | Keypair] = {}
        # Timer wheel substitute: a heap of (deadline, seq, peer) plus the set of peers
        # touched since it was last brought up to date.  Invariant: every live peer
        # whose timers have a deadline D has an entry with a deadline <= D (stale
        # entries are fixed lazily), so next_deadline() and handle_timer() never scan
        # all peers.
        self._dirty: set[Peer] = set()
        self._heap: list[tuple[float, int, Peer]] = []
        #: the deadline each peer has in ``_heap`` (other entries of it are stale)
        self._armed: dict[Peer, float] = {}
        self._heap_seq = itertools.count()
        self._out: list[tuple[bytes, Address]] = []
        self._in: list[bytes] = []
        self._events: list[Event] = []

    # ------------------------------------------------------------------ outputs

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """UDP payloads and destinations produced since the last call."""
        out, self._out = self._out, []
        return out

    def packets_received(self) -> list[bytes]:
        """Decrypted IP packets (padding removed, source checked) since the last call."""
        packets, self._in = self._in, []
        return packets

    def events(self) -> list[Event]:
        events, self._events = self._events, []
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
                self._send_keepalive(peer, now)
        self._dirty.add(peer)
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
        self._zero_and_flush(peer)
        peer.timers.stop()
        self._dirty.discard(peer)
        self._armed.pop(peer, None)

    # ------------------------------------------------------------------ input

    def receive_datagram(self, data: bytes, addr: Address, now: float, *, backlog: int = 0) -> None:
        """Process one UDP datagram from ``addr``.

        ``backlog`` is how many handshake datagrams are still waiting behind this one
        (the adapter knows its batch); 128 or more puts the device under load for 1 s
        (:mod:`.load` has the other signal, the rate of handshakes).
        """
        if len(data) >= TRANSPORT_MIN_SIZE:
            kind, receiver, counter = TRANSPORT_HEADER.unpack_from(data)
            if kind == MESSAGE_TRANSPORT:  # type 4 with zero reserved bytes
                self._receive_transport(data, receiver, counter, addr, now)
                return
        kind = message_type(data)
        if kind is None or kind == MESSAGE_TRANSPORT:
            return
        try:
            if kind == MESSAGE_COOKIE_REPLY:
                self._receive_cookie_reply(data, now)
            else:
                self._receive_handshake(kind, bytes(data), addr, now, backlog)
        except MessageError:  # pragma: no cover - sizes were checked by message_type
            return

    def receive_datagrams(
        self,
        batch: Iterable[tuple[bytes, Address]],
        now: float,
        *,
        deferred: list[tuple[bytes, Address]] | None = None,
    ) -> None:
        """Process a batch of UDP datagrams received together (what the asyncio adapter
        drains per wake-up); the same result as :meth:`receive_datagram` on each in
        turn, with the per-peer bookkeeping of a run of transport messages done once,
        except that handshake messages beyond the batch's first QUEUE_HANDSHAKE_SIZE
        (1024) are dropped, as wireguard-go drops them when its handshake queue is full.

        With ``deferred``, every datagram that is not a transport message (handshakes,
        cookie replies, garbage) is appended to it instead, for the caller to pass back
        here once it has flushed what the transport messages produced: wireguard-go's
        separate handshake queue, so a flood of initiations in the same batch does not
        hold the tunnel's packets back until every one of them has been answered.

        A run is what follows a data message that authenticated: transport messages
        for the same session from the same endpoint.  Its first message went the whole
        way (timers, endpoint, key confirmation); the rest only need decrypting, the
        replay check and the source check, which ``speedups.open_run`` does in one call
        (in Cython when built).
        """
        batch = batch if isinstance(batch, list) else list(batch)
        handshakes = -1  # handshake messages from here on; counted at the first one
        taken = 0  # handshake messages of this batch so far
        index = self._index
        cache = self._route_cache
        lookup = self._routes.lookup
        packets = self._in
        unpack = TRANSPORT_HEADER.unpack_from
        position = 0
        count = len(batch)
        while position < count:
            data, addr = batch[position]
            position += 1
            if len(data) >= TRANSPORT_MIN_SIZE:
                kind, receiver, counter = unpack(data)
                if kind == MESSAGE_TRANSPORT:
                    if not self._receive_transport(data, receiver, counter, addr, now):
                        continue
                    keypair = index.get(receiver)
                    if not isinstance(keypair, Keypair):  # pragma: no cover - just used
                        continue
                    peer = keypair.peer
                    position, received, data_packets = open_run(
                        batch,
                        position,
                        keypair.receive,
                        keypair.replay,
                        receiver,
                        addr,
                        peer,
                        cache,
                        lookup,
                        packets,
                        REJECT_AFTER_MESSAGES,
                    )
                    peer.rx_bytes += received
                    if data_packets:
                        peer.timers.need_another_keepalive = True
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

    def _receive_transport(
        self, data: bytes, receiver: int, counter: int, addr: Address, now: float
    ) -> bool:
        """True when ``data`` authenticated and carried a packet (not a keepalive)."""
        keypair = self._index.get(receiver)
        if not isinstance(keypair, Keypair) or now - keypair.created > REJECT_AFTER_TIME:
            return False
        plain = keypair.receive.open(counter, data)
        if plain is None:
            return False
        replay = keypair.replay
        last = replay.last
        if counter > last and counter >> 6 == last >> 6 and counter < REJECT_AFTER_MESSAGES:
            replay.last = counter  # in order within the current block: cannot be a replay
            replay.ring[(counter >> 6) & 127] |= 1 << (counter & 63)
        elif not replay.validate(counter, REJECT_AFTER_MESSAGES):
            return False
        self._authenticated_transport(keypair, plain, len(data), addr, now)
        return bool(plain)

    def send_packet(self, packet: bytes, now: float) -> bool:
        """Route an IP packet to its peer by destination and encrypt it (or stage it
        until a session exists).  False if no peer's allowed IPs cover it."""
        if type(packet) is not bytes:
            packet = bytes(packet)  # a bytearray or memoryview: routing keys are bytes
        size = len(packet)
        if not size or size > MAX_CONTENT_SIZE:
            return False
        version = packet[0] >> 4
        if version == 4 and size >= 20:
            destination = packet[16:20]
        elif version == 6 and size >= 40:
            destination = packet[24:40]
        else:
            return False
        self._last_sent_peer = None
        peer = self._route_cache.get(destination) or self._routes.lookup(destination)
        if peer is None:
            return False
        self._dirty.add(peer)
        keypair = peer.current
        endpoint = peer.endpoint
        if keypair is not None and endpoint is not None and not peer.staged:
            counter = keypair.send_nonce
            if counter < REJECT_AFTER_MESSAGES and now - keypair.created < REJECT_AFTER_TIME:
                # Fast path (the established state): nothing queued ahead of this packet
                # and a usable session -- encrypt inline, then the timer bookkeeping of
                # _after_transport_sent.
                keypair.send_nonce = counter + 1
                data = keypair.send.seal(keypair.remote_index, counter, packet, self.mtu)
                self._out.append((data, endpoint))
                self._last_sent_peer = peer
                peer.tx_bytes += len(data)
                timers = peer.timers
                if timers.persistent_keepalive_interval > 0:
                    timers.persistent_keepalive = now + timers.persistent_keepalive_interval
                timers.send_keepalive = None
                if timers.new_handshake is None:
                    timers.on_data_sent(now, self._jitter())
                if counter >= REKEY_AFTER_MESSAGES or (
                    keypair.initiator and now - keypair.created > REKEY_AFTER_TIME
                ):
                    self._send_handshake_initiation(peer, now, is_retry=False)
                return True
        peer.staged.append(packet)
        self._send_staged(peer, now)
        return True

    def send_packets(self, packets: Iterable[bytes], now: float) -> int:
        """Route and encrypt a batch of IP packets (as :meth:`send_packet` on each in
        turn); returns how many no peer's allowed IPs cover.

        After one packet to a peer took the established-state path, the next ones to
        the same peer only need a counter and the cipher -- the timers were set by the
        first, and only the counter can call for a rekey -- which
        ``speedups.seal_run`` does in one call (in Cython when built).
        """
        packets = packets if isinstance(packets, list) else list(packets)
        unroutable = 0
        cache = self._route_cache
        out = self._out
        mtu = self.mtu
        position = 0
        count = len(packets)
        while position < count:
            packet = packets[position]
            position += 1
            if not self.send_packet(packet, now):
                unroutable += 1
                continue
            peer = self._last_sent_peer
            if peer is None or position == count:
                continue
            keypair = peer.current
            if keypair is None or peer.endpoint is None:  # pragma: no cover - just used
                continue
            position, keypair.send_nonce, sent = seal_run(
                packets,
                position,
                keypair.send,
                keypair.remote_index,
                keypair.send_nonce,
                REKEY_AFTER_MESSAGES,
                mtu,
                MAX_CONTENT_SIZE,
                peer.endpoint,
                peer,
                cache,
                out,
            )
            peer.tx_bytes += sent
        return unroutable

    def send_keepalive(self, public_key: bytes, now: float) -> None:
        """Send a keepalive to a peer (starting a handshake if there is no session)."""
        peer = self._peers.get(public_key)
        if peer is not None:
            self._dirty.add(peer)
            self._send_keepalive(peer, now)

    def initiate_handshake(self, public_key: bytes, now: float) -> None:
        """Start a handshake now (subject to the REKEY_TIMEOUT rate limit)."""
        peer = self._peers.get(public_key)
        if peer is not None:
            self._dirty.add(peer)
            self._send_handshake_initiation(peer, now, is_retry=False)

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        """The earliest time ``handle_timer`` must be called, or None."""
        self._refresh_heap()
        heap = self._heap
        armed = self._armed
        while heap:
            deadline, _, peer = heap[0]
            if armed.get(peer) != deadline:
                heapq.heappop(heap)  # stale: the peer is gone or its deadline moved
                continue
            current = peer.timers.next_deadline()
            if current == deadline:
                return deadline
            # moved without the peer being marked dirty: take its current deadline
            heapq.heappop(heap)
            if current is None:
                del armed[peer]
            else:
                armed[peer] = current
                heapq.heappush(heap, (current, next(self._heap_seq), peer))
        return None

    def _refresh_heap(self) -> None:
        """Give every dirty peer's deadline an entry, if it changed (one push per
        change, not a heap rebuild per packet; stale entries are popped lazily)."""
        heap = self._heap
        armed = self._armed
        if len(heap) > 2 * len(self._peers) + 64:  # compact away stale entries
            heap[:] = [entry for entry in heap if armed.get(entry[2]) == entry[0]]
            heapq.heapify(heap)
        dirty = self._dirty
        if dirty:
            seq = self._heap_seq
            for peer in dirty:
                deadline = peer.timers.next_deadline()
                if deadline is None:
                    armed.pop(peer, None)
                elif armed.get(peer) != deadline:
                    armed[peer] = deadline
                    heapq.heappush(heap, (deadline, next(seq), peer))
            dirty.clear()

    def handle_timer(self, now: float) -> None:
        """Fire every peer timer whose deadline is at or before ``now``."""
        self._refresh_heap()
        heap = self._heap
        armed = self._armed
        due: dict[Peer, None] = {}
        while heap and heap[0][0] <= now:
            deadline, _, peer = heapq.heappop(heap)
            if armed.get(peer) == deadline:
                del armed[peer]  # re-armed below once its timers ran (it is dirty)
            due[peer] = None
        for peer in due:
            if self._peers.get(peer.public_key) is not peer:
                continue  # removed
            self._dirty.add(peer)
            self._fire_timers(peer, now)

    def _fire_timers(self, peer: Peer, now: float) -> None:
        timers = peer.timers
        if timers.retransmit_handshake is not None and timers.retransmit_handshake <= now:
            timers.retransmit_handshake = None
            self._expired_retransmit_handshake(peer, now)
        if timers.send_keepalive is not None and timers.send_keepalive <= now:
            timers.send_keepalive = None
            self._send_keepalive(peer, now)
            if timers.need_another_keepalive:
                timers.need_another_keepalive = False
                timers.send_keepalive = now + KEEPALIVE_TIMEOUT
        if timers.new_handshake is not None and timers.new_handshake <= now:
            timers.new_handshake = None
            self._send_handshake_initiation(peer, now, is_retry=False)
        if timers.zero_key_material is not None and timers.zero_key_material <= now:
            timers.zero_key_material = None
            self._zero_and_flush(peer)
            self._events.append(KeysZeroed(peer.public_key))
        if timers.persistent_keepalive is not None and timers.persistent_keepalive <= now:
            timers.persistent_keepalive = None
            if timers.persistent_keepalive_interval > 0:
                self._send_keepalive(peer, now)

    def _expired_retransmit_handshake(self, peer: Peer, now: float) -> None:
        timers = peer.timers
        if timers.handshake_attempts > MAX_TIMER_HANDSHAKES:
            timers.send_keepalive = None
            peer.staged.clear()
            self._events.append(HandshakeGaveUp(peer.public_key))
            if timers.zero_key_material is None:
                timers.zero_key_material = now + ZERO_KEY_MATERIAL_AFTER
        else:
            timers.handshake_attempts += 1
            self._send_handshake_initiation(peer, now, is_retry=True)

    def _jitter(self) -> float:
        return int(self._jitter_rng.random() * REKEY_TIMEOUT_JITTER_MAX_MS) / 1000.0

    # ------------------------------------------------------------------ handshake

    def _receive_handshake(
        self, kind: int, data: bytes, addr: Address, now: float, backlog: int
    ) -> None:
        if not self._cookies.check_mac1(data):
            return
        if self._load.observe(now, backlog):
            src = address_bytes(addr)
            if not self._cookies.check_mac2(data, src, now):
                sender = int.from_bytes(data[4:8], "little")
                reply = self._cookies.create_reply(data, sender, src, now)
                self._out.append((reply.build(), addr))
                return
            if not self._rate.allow(addr[0], now):
                return
        if kind == MESSAGE_INITIATION:
            self._consume_initiation(Initiation.parse(data), addr, now)
        else:
            self._consume_response(Response.parse(data), addr, now)

    def _consume_initiation(self, msg: Initiation, addr: Address, now: float) -> None:
        state = self._responder_base.copy()
        try:
            remote_static = noise.read_initiation_static(
                state, self._static, msg.ephemeral, msg.encrypted_static
            )
            peer = self._peers.get(remote_static)
            if peer is None:
                return
            self._dirty.add(peer)
            stamp = noise.read_initiation_payload(
                state, peer.static_static, msg.encrypted_timestamp
            )
        except HandshakeError:
            return
        if stamp <= peer.last_timestamp:
            return  # replayed (or not newer) initiation
        if now - peer.last_initiation_consumption <= HANDSHAKE_INITIATION_RATE:
            return  # initiation flood from this peer
        peer.last_timestamp = stamp
        peer.last_initiation_consumption = now
        peer.handshake_state = state
        peer.remote_ephemeral = msg.ephemeral
        peer.remote_index = msg.sender
        peer.stage = HandshakeStage.INITIATION_CONSUMED
        peer.rx_bytes += INITIATION_SIZE
        peer.timers.on_any_authenticated_packet_traversal(now)
        peer.timers.on_any_authenticated_packet_received()
        self._set_endpoint(peer, addr)
        self._send_handshake_response(peer, now)

    def _send_handshake_response(self, peer: Peer, now: float) -> None:
        peer.last_sent_handshake = now
        state = peer.handshake_state
        if peer.stage != HandshakeStage.INITIATION_CONSUMED or state is None:
            return
        ephemeral = private_key_from_bytes(self._random(32))
        try:
            eph_pub, empty = noise.write_response(
                state, ephemeral, peer.remote_ephemeral, peer.public_key, peer.preshared_key, b""
            )
        except HandshakeError:
            return
        index = self._new_handshake_index(peer)
        msg = Response(index, peer.remote_index, eph_pub, empty, _ZERO_MAC, _ZERO_MAC).build()
        peer.cookies.add_macs(msg, now)
        peer.stage = HandshakeStage.RESPONSE_CREATED
        self._begin_session(peer, now, initiator=False)
        peer.timers.on_session_derived(now)
        peer.timers.on_any_authenticated_packet_traversal(now)
        peer.timers.on_any_authenticated_packet_sent()
        self._send(peer, bytes(msg))

    def _send_handshake_initiation(self, peer: Peer, now: float, *, is_retry: bool) -> None:
        if not is_retry:
            peer.timers.handshake_attempts = 0
        if now - peer.last_sent_handshake < REKEY_TIMEOUT:
            return
        peer.last_sent_handshake = now
        state = peer.initiator_base.copy()
        ephemeral = private_key_from_bytes(self._random(32))
        try:
            eph_pub, enc_static, enc_stamp = noise.write_initiation(
                state,
                ephemeral,
                self.public_key,
                peer.public_key,
                peer.static_static,
                self._clock.next(),
            )
        except HandshakeError:
            return
        index = self._new_handshake_index(peer)
        peer.stage = HandshakeStage.INITIATION_CREATED
        peer.handshake_state = state
        peer.local_ephemeral = ephemeral
        msg = Initiation(index, eph_pub, enc_static, enc_stamp, _ZERO_MAC, _ZERO_MAC).build()
        peer.cookies.add_macs(msg, now)
        peer.timers.on_any_authenticated_packet_traversal(now)
        peer.timers.on_any_authenticated_packet_sent()
        self._send(peer, bytes(msg))
        peer.timers.on_handshake_initiated(now, self._jitter())

    def _consume_response(self, msg: Response, addr: Address, now: float) -> None:
        entry = self._index.get(msg.receiver)
        if not isinstance(entry, Peer):
            return
        peer = entry
        self._dirty.add(peer)
        if (
            peer.stage != HandshakeStage.INITIATION_CREATED
            or peer.handshake_state is None
            or peer.local_ephemeral is None
        ):
            return
        state = peer.handshake_state.copy()
        try:
            noise.read_response(
                state,
                peer.local_ephemeral,
                self._static,
                msg.ephemeral,
                peer.preshared_key,
                msg.encrypted_nothing,
            )
        except HandshakeError:
            return
        peer.handshake_state = state
        peer.remote_index = msg.sender
        peer.stage = HandshakeStage.RESPONSE_CONSUMED
        self._set_endpoint(peer, addr)
        peer.timers.on_any_authenticated_packet_traversal(now)
        peer.timers.on_any_authenticated_packet_received()
        self._begin_session(peer, now, initiator=True)
        peer.timers.on_session_derived(now)
        self._handshake_complete(peer, now, initiator=True)
        self._send_keepalive(peer, now)

    def _receive_cookie_reply(self, data: bytes, now: float) -> None:
        reply = CookieReply.parse(data)
        entry = self._index.get(reply.receiver)
        if entry is None:
            return
        peer = entry.peer if isinstance(entry, Keypair) else entry
        if peer.cookies.consume_reply(reply, now):
            self._events.append(CookieReceived(peer.public_key))

    def _handshake_complete(self, peer: Peer, now: float, *, initiator: bool) -> None:
        peer.timers.on_handshake_complete()
        peer.last_handshake = now
        self._events.append(HandshakeCompleted(peer.public_key, initiator))

    def _new_handshake_index(self, peer: Peer) -> int:
        self._drop_handshake_index(peer)
        for _ in range(64):
            index = int.from_bytes(self._random(4), "little")
            if index and index not in self._index:
                break
        else:  # pragma: no cover - 64 collisions in a 2**32 space means a broken RNG
            raise HandshakeError("could not allocate a unique local index")
        self._index[index] = peer
        peer.handshake_index = index
        return index

    def _drop_handshake_index(self, peer: Peer) -> None:
        if peer.handshake_index and self._index.get(peer.handshake_index) is peer:
            del self._index[peer.handshake_index]
        peer.handshake_index = 0

    def _clear_handshake(self, peer: Peer) -> None:
        self._drop_handshake_index(peer)
        peer.stage = HandshakeStage.ZEROED
        peer.handshake_state = None
        peer.local_ephemeral = None
        peer.remote_ephemeral = b""

    # ------------------------------------------------------------------ sessions

    def _begin_session(self, peer: Peer, now: float, *, initiator: bool) -> None:
        state = peer.handshake_state
        assert state is not None
        first, second = state.split()
        send_key, receive_key = (first, second) if initiator else (second, first)
        keypair = Keypair(
            send_key,
            receive_key,
            created=now,
            initiator=initiator,
            local_index=peer.handshake_index,
            remote_index=peer.remote_index,
            peer=peer,
        )
        self._index[keypair.local_index] = keypair  # the index now belongs to the keypair
        peer.handshake_index = 0
        self._clear_handshake(peer)
        if initiator:
            if peer.next is not None:
                self._delete_keypair(peer.current)
                self._delete_keypair(peer.previous)
                peer.previous, peer.next = peer.next, None
            else:
                self._delete_keypair(peer.previous)
                peer.previous = peer.current
            peer.current = keypair
        else:
            self._delete_keypair(peer.next)
            peer.next = keypair
            self._delete_keypair(peer.previous)
            peer.previous = None

    def _delete_keypair(self, keypair: Keypair | None) -> None:
        if keypair is not None and self._index.get(keypair.local_index) is keypair:
            del self._index[keypair.local_index]

    def _received_with_keypair(self, peer: Peer, keypair: Keypair) -> bool:
        """Key confirmation: the first packet under ``next`` promotes it to current."""
        if peer.next is not keypair:
            return False
        self._delete_keypair(peer.previous)
        peer.previous = peer.current
        peer.current = keypair
        peer.next = None
        return True

    def _zero_and_flush(self, peer: Peer) -> None:
        for keypair in (peer.previous, peer.current, peer.next):
            self._delete_keypair(keypair)
        peer.previous = peer.current = peer.next = None
        self._clear_handshake(peer)
        peer.staged.clear()

    # ------------------------------------------------------------------ transport

    def _send(self, peer: Peer, data: bytes) -> None:
        if peer.endpoint is not None:
            self._out.append((data, peer.endpoint))
            peer.tx_bytes += len(data)

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now)

    def _send_staged(self, peer: Peer, now: float) -> None:
        if not peer.staged:
            return
        keypair = peer.current
        if (
            keypair is None
            or keypair.send_nonce >= REJECT_AFTER_MESSAGES
            or now - keypair.created >= REJECT_AFTER_TIME
        ):
            self._send_handshake_initiation(peer, now, is_retry=False)
            return
        if peer.endpoint is None:
            return  # keep them staged until we learn where the peer is
        data_sent = False
        staged = peer.staged
        while staged:
            if keypair.send_nonce >= REJECT_AFTER_MESSAGES:
                self._send_handshake_initiation(peer, now, is_retry=False)
                break
            packet = staged.popleft()
            data_sent = data_sent or bool(packet)
            self._send_transport(peer, keypair, packet, now)
        self._after_transport_sent(peer, now, data_sent)

    def _send_transport(self, peer: Peer, keypair: Keypair, packet: bytes, now: float) -> None:
        counter = keypair.send_nonce
        keypair.send_nonce = counter + 1
        data = keypair.send.seal(keypair.remote_index, counter, packet, self.mtu)
        self._out.append((data, peer.endpoint))  # type: ignore[arg-type]
        peer.tx_bytes += len(data)

    def _after_transport_sent(self, peer: Peer, now: float, data_sent: bool) -> None:
        timers = peer.timers
        if timers.persistent_keepalive_interval > 0:
            timers.persistent_keepalive = now + timers.persistent_keepalive_interval
        timers.send_keepalive = None
        if data_sent and timers.new_handshake is None:
            timers.on_data_sent(now, self._jitter())
        # keepKeyFreshSending
        keypair = peer.current
        if keypair is not None and (
            keypair.send_nonce > REKEY_AFTER_MESSAGES
            or (keypair.initiator and now - keypair.created > REKEY_AFTER_TIME)
        ):
            self._send_handshake_initiation(peer, now, is_retry=False)

    def _authenticated_transport(
        self, keypair: Keypair, plain: bytes, wire_size: int, addr: Address, now: float
    ) -> None:
        """A transport message decrypted and passed the replay filter (5.4.6)."""
        peer = keypair.peer
        self._dirty.add(peer)
        peer.rx_bytes += wire_size
        if peer.next is keypair:
            self._received_with_keypair(peer, keypair)
            self._set_endpoint(peer, addr)
            self._handshake_complete(peer, now, initiator=False)
            self._send_staged(peer, now)
        elif peer.endpoint != addr:
            self._set_endpoint(peer, addr)
        timers = peer.timers
        if not timers.sent_last_minute_handshake:
            current = peer.current
            if (
                current is not None
                and current.initiator
                and now - current.created > LAST_MINUTE_HANDSHAKE_AGE
            ):
                timers.sent_last_minute_handshake = True
                self._send_handshake_initiation(peer, now, is_retry=False)
        if timers.persistent_keepalive_interval > 0:
            timers.persistent_keepalive = now + timers.persistent_keepalive_interval
        timers.new_handshake = None
        if not plain:
            return  # keepalive
        if timers.send_keepalive is None:
            timers.send_keepalive = now + KEEPALIVE_TIMEOUT
        else:
            timers.need_another_keepalive = True
        size = len(plain)
        version = plain[0] >> 4
        if version == 4:
            if size < 20:
                return
            length = (plain[2] << 8) | plain[3]
            if length > size or length < 20:
                return
            source = plain[12:16]
        elif version == 6:
            if size < 40:
                return
            length = ((plain[4] << 8) | plain[5]) + 40
            if length > size:
                return
            source = plain[8:24]
        else:
            return
        if (self._route_cache.get(source) or self._routes.lookup(source)) is not peer:
            return  # cryptokey routing: this peer may not use that source address
        self._in.append(plain if length == size else plain[:length])

    def _set_endpoint(self, peer: Peer, addr: Address) -> None:
        if peer.endpoint != addr:
            peer.endpoint = addr
            self._events.append(EndpointChanged(peer.public_key, addr))


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


__all__ = ["DEFAULT_MTU", "Device", "padding_size"]
