"""The handshake side of a WireGuard engine: handshake messages in and out, cookies
under load, local indices and the keypairs a handshake leaves behind.

Theory of operation (whitepaper section 5, and wireguard-go's device package where the
paper is silent, so that timing and state match the real thing):

* initiation (5.4.2): mac1 is always checked; under load (see :mod:`.load`: a
  handshake backlog of at least 128, or handshakes arriving faster than ~500/s for a
  while, remembered for 1 s) mac2 is required, or a cookie reply is sent instead
  (5.4.7), and each source IP is rate limited (20/s, burst 5); responses are gated
  alike.  A valid initiation whose timestamp is newer than the last one and that comes
  >= 20 ms after the previous one is answered.
* response (5.4.3): the responder derives its keypair at once but keeps it as
  ``next`` until the first transport message confirms it (5.4.6, :meth:`confirm`,
  called by :mod:`.transport`); the initiator makes its keypair ``current`` on the
  response, and its owner then sends a keepalive or the staged data.
* every keypair and the handshake in progress own a random 32-bit local index in the
  engine's index table, which is how incoming messages find them (:mod:`.peer` has the
  ``previous``/``current``/``next`` rotation).

Malformed or unauthenticated messages are dropped silently; nothing here raises on
network input.  Time is passed in; randomness comes from the ``random_bytes`` given.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import noise
from .cookie import CookieChecker, address_bytes
from .crypto import private_key_from_bytes
from .errors import HandshakeError
from .events import Address, CookieReceived, HandshakeCompleted
from .load import HandshakeLoad
from .messages import (
    INITIATION_SIZE,
    MESSAGE_INITIATION,
    CookieReply,
    Initiation,
    Response,
)
from .outbox import Outbox
from .peer import HandshakeStage, Keypair, Peer
from .ratelimit import RateLimiter
from .tai64n import Tai64nClock
from .timers import HANDSHAKE_INITIATION_RATE, REKEY_TIMEOUT

_ZERO_MAC = bytes(16)

RandomBytes = Callable[[int], bytes]


class Handshakes:
    """Handshake messages of one WireGuard interface (its static key) with its peers."""

    def __init__(
        self,
        static: X25519PrivateKey,
        public_key: bytes,
        *,
        random_bytes: RandomBytes,
        clock: Tai64nClock,
        jitter: Callable[[], float],
        peers: dict[bytes, Peer],
        index: dict[int, Peer | Keypair],
        outbox: Outbox,
        touched: set[Peer],
    ) -> None:
        self._static = static
        self._public_key = public_key
        self._random = random_bytes
        self._clock = clock
        self._jitter = jitter
        self._responder_base = noise.begin(public_key)
        self._cookies = CookieChecker(public_key, random_bytes)
        self._rate = RateLimiter()
        #: whether handshake messages must carry a cookie (mac2) now
        self.load = HandshakeLoad()
        self._peers = peers
        self._index = index
        self._outbox = outbox
        self._touched = touched  # peers whose timers may have moved

    # ------------------------------------------------------------------ messages in

    def receive(
        self, kind: int, data: bytes, addr: Address, now: float, backlog: int
    ) -> Peer | None:
        """An initiation or a response from ``addr`` (``backlog`` handshake messages
        waiting behind it).  Returns the peer whose session this response began with
        us as the initiator: its owner must send it the staged packets or a keepalive
        now, which also confirms the new keypair to the responder."""
        if not self._cookies.check_mac1(data):
            return None
        if self.load.observe(now, backlog):
            src = address_bytes(addr)
            if not self._cookies.check_mac2(data, src, now):
                sender = int.from_bytes(data[4:8], "little")
                reply = self._cookies.create_reply(data, sender, src, now)
                self._outbox.datagrams.append((reply.build(), addr))
                return None
            if not self._rate.allow(addr[0], now):
                return None
        if kind == MESSAGE_INITIATION:
            self._consume_initiation(Initiation.parse(data), addr, now)
            return None
        return self._consume_response(Response.parse(data), addr, now)

    def receive_cookie_reply(self, data: bytes, now: float) -> None:
        """A cookie reply (5.4.7): the cookie for our next handshake message's mac2."""
        reply = CookieReply.parse(data)
        entry = self._index.get(reply.receiver)
        if entry is None:
            return
        peer = entry.peer if isinstance(entry, Keypair) else entry
        if peer.cookies.consume_reply(reply, now):
            self._outbox.events.append(CookieReceived(peer.public_key))

    def _consume_initiation(self, msg: Initiation, addr: Address, now: float) -> None:
        state = self._responder_base.copy()
        try:
            remote_static = noise.read_initiation_static(
                state, self._static, msg.ephemeral, msg.encrypted_static
            )
            peer = self._peers.get(remote_static)
            if peer is None:
                return
            self._touched.add(peer)
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
        self._outbox.move_endpoint(peer, addr)
        self._send_response(peer, now)

    def _consume_response(self, msg: Response, addr: Address, now: float) -> Peer | None:
        entry = self._index.get(msg.receiver)
        if not isinstance(entry, Peer):
            return None
        peer = entry
        self._touched.add(peer)
        if (
            peer.stage != HandshakeStage.INITIATION_CREATED
            or peer.handshake_state is None
            or peer.local_ephemeral is None
        ):
            return None
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
            return None
        peer.handshake_state = state
        peer.remote_index = msg.sender
        peer.stage = HandshakeStage.RESPONSE_CONSUMED
        self._outbox.move_endpoint(peer, addr)
        peer.timers.on_any_authenticated_packet_traversal(now)
        peer.timers.on_any_authenticated_packet_received()
        self._begin_session(peer, now, initiator=True)
        peer.timers.on_session_derived(now)
        self.complete(peer, now, initiator=True)
        return peer

    # ------------------------------------------------------------------ messages out

    def initiate(self, peer: Peer, now: float, *, is_retry: bool, force: bool = False) -> None:
        """Send an initiation to ``peer``, at most one per REKEY_TIMEOUT (5.4.2) unless
        ``force``; ``is_retry`` when the retransmit timer asks, which keeps the attempt
        count."""
        if not is_retry:
            peer.timers.handshake_attempts = 0
        if now - peer.last_sent_handshake < REKEY_TIMEOUT and not force:
            return
        peer.last_sent_handshake = now
        state = peer.initiator_base.copy()
        ephemeral = private_key_from_bytes(self._random(32))
        try:
            eph_pub, enc_static, enc_stamp = noise.write_initiation(
                state,
                ephemeral,
                self._public_key,
                peer.public_key,
                peer.static_static,
                self._clock.next(),
            )
        except HandshakeError:
            return
        index = self._new_index(peer)
        peer.stage = HandshakeStage.INITIATION_CREATED
        peer.handshake_state = state
        peer.local_ephemeral = ephemeral
        msg = Initiation(index, eph_pub, enc_static, enc_stamp, _ZERO_MAC, _ZERO_MAC).build()
        peer.cookies.add_macs(msg, now)
        peer.timers.on_any_authenticated_packet_traversal(now)
        peer.timers.on_any_authenticated_packet_sent()
        self._outbox.send(peer, bytes(msg))
        peer.timers.on_handshake_initiated(now, self._jitter())

    def _send_response(self, peer: Peer, now: float) -> None:
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
        index = self._new_index(peer)
        msg = Response(index, peer.remote_index, eph_pub, empty, _ZERO_MAC, _ZERO_MAC).build()
        peer.cookies.add_macs(msg, now)
        peer.stage = HandshakeStage.RESPONSE_CREATED
        self._begin_session(peer, now, initiator=False)
        peer.timers.on_session_derived(now)
        peer.timers.on_any_authenticated_packet_traversal(now)
        peer.timers.on_any_authenticated_packet_sent()
        self._outbox.send(peer, bytes(msg))

    def complete(self, peer: Peer, now: float, *, initiator: bool) -> None:
        """A session with ``peer`` is established (the initiator on the response, the
        responder on key confirmation)."""
        peer.timers.on_handshake_complete()
        peer.last_handshake = now
        self._outbox.events.append(HandshakeCompleted(peer.public_key, initiator))

    # ------------------------------------------------------------------ indices

    def _new_index(self, peer: Peer) -> int:
        self._drop_index(peer)
        for _ in range(64):
            index = int.from_bytes(self._random(4), "little")
            if index and index not in self._index:
                break
        else:  # pragma: no cover - 64 collisions in a 2**32 space means a broken RNG
            raise HandshakeError("could not allocate a unique local index")
        self._index[index] = peer
        peer.handshake_index = index
        return index

    def _drop_index(self, peer: Peer) -> None:
        if peer.handshake_index and self._index.get(peer.handshake_index) is peer:
            del self._index[peer.handshake_index]
        peer.handshake_index = 0

    def _clear(self, peer: Peer) -> None:
        self._drop_index(peer)
        peer.stage = HandshakeStage.ZEROED
        peer.handshake_state = None
        peer.local_ephemeral = None
        peer.remote_ephemeral = b""

    # ------------------------------------------------------------------ keypairs

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
        self._clear(peer)
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

    def confirm(self, peer: Peer, keypair: Keypair) -> bool:
        """Key confirmation (5.4.6): the first message under ``next`` makes it current."""
        if peer.next is not keypair:
            return False
        self._delete_keypair(peer.previous)
        peer.previous = peer.current
        peer.current = keypair
        peer.next = None
        return True

    def zero_and_flush(self, peer: Peer) -> None:
        """Forget ``peer``'s keypairs, handshake and staged packets."""
        for keypair in (peer.previous, peer.current, peer.next):
            self._delete_keypair(keypair)
        peer.previous = peer.current = peer.next = None
        self._clear(peer)
        peer.staged.clear()
