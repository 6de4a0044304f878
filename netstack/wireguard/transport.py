"""The transport side of a WireGuard engine: IP packets sealed to peers and transport
messages opened from them (whitepaper 5.4.6), with the timers they drive.

Theory of operation:

* out: an IP packet is routed by its destination to the peer whose allowed IPs cover
  it (cryptokey routing) and sealed under the peer's ``current`` keypair -- counter
  nonce, zero padding to a multiple of 16 within the MTU.  Without a usable keypair
  (none, too old, or at REJECT_AFTER_MESSAGES) it is staged and a handshake started;
  the staged packets leave when the session exists.  As initiator we rekey after
  REKEY_AFTER_TIME or REKEY_AFTER_MESSAGES.
* in: the receiver index finds the keypair; a message that opens, passes the replay
  window and comes before REJECT_AFTER_TIME is authenticated.  The first under a
  responder's ``next`` keypair confirms it (:meth:`.Handshakes.confirm`).  An
  authenticated message from a new address moves the peer's endpoint (roaming); one
  from an initiator's session about to expire starts a handshake (wireguard-go's
  keepKeyFreshReceiving).  A packet's inner source address must route back to the same
  peer, or it is dropped.
* batches: after one message or packet of a peer went the whole way, the rest of a run
  (same session, same endpoint) needs only the cipher, the replay or route check and a
  counter, which ``speedups.open_run`` / ``seal_run`` do in one call (in Cython when
  built).

Malformed or unauthenticated messages are dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable

from .allowedips import AllowedIPs
from .events import Address
from .handshake import Handshakes
from .messages import TRANSPORT_MIN_SIZE
from .outbox import Outbox
from .peer import Keypair, Peer
from .speedups import open_run, seal_run
from .timers import (
    KEEPALIVE_TIMEOUT,
    LAST_MINUTE_HANDSHAKE_AGE,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
)

DEFAULT_MTU = 1420
MAX_CONTENT_SIZE = 65535 - TRANSPORT_MIN_SIZE


def padding_size(size: int, mtu: int) -> int:
    """Zero bytes appended to a ``size``-byte packet (wireguard-go calculatePaddingSize)."""
    if mtu <= 0:
        return -size % 16
    last_unit = size % mtu if size > mtu else size
    padded = (last_unit + 15) & ~15
    return min(padded, mtu) - last_unit


class Transport:
    """Transport messages of one WireGuard interface: sealing, opening, staging."""

    def __init__(
        self,
        *,
        mtu: int,
        handshakes: Handshakes,
        routes: AllowedIPs[Peer],
        index: dict[int, Peer | Keypair],
        outbox: Outbox,
        touched: set[Peer],
        jitter: Callable[[], float],
    ) -> None:
        self.mtu = mtu
        self._handshakes = handshakes
        self._routes = routes
        self._route_cache = routes.cache  # probed inline on the data path
        self._index = index
        self._outbox = outbox
        self._touched = touched  # peers whose timers may have moved
        self._jitter = jitter
        self._last_sent_peer: Peer | None = None  # set by send_packet's fast path

    # ------------------------------------------------------------------ out

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
        self._touched.add(peer)
        keypair = peer.current
        endpoint = peer.endpoint
        if keypair is not None and endpoint is not None and not peer.staged:
            counter = keypair.send_nonce
            if counter < REJECT_AFTER_MESSAGES and now - keypair.created < REJECT_AFTER_TIME:
                # Fast path (the established state): nothing queued ahead of this packet
                # and a usable session -- encrypt inline, then the timer bookkeeping of
                # _after_sent.
                keypair.send_nonce = counter + 1
                data = keypair.send.seal(keypair.remote_index, counter, packet, self.mtu)
                self._outbox.datagrams.append((data, endpoint))
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
                    self._handshakes.initiate(peer, now, is_retry=False)
                return True
        peer.staged.append(packet)
        self.send_staged(peer, now)
        return True

    def send_packets(self, packets: list[bytes], now: float) -> int:
        """Route and encrypt a batch of IP packets (as :meth:`send_packet` on each in
        turn); returns how many no peer's allowed IPs cover.

        After one packet to a peer took the established-state path, the next ones to
        the same peer only need a counter and the cipher -- the timers were set by the
        first, and only the counter can call for a rekey -- which
        ``speedups.seal_run`` does in one call (in Cython when built).
        """
        unroutable = 0
        cache = self._route_cache
        out = self._outbox.datagrams
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

    def send_keepalive(self, peer: Peer, now: float) -> None:
        """An empty transport message to ``peer`` (or the staged packets, which do as
        well), starting a handshake if there is no session."""
        if not peer.staged:
            peer.staged.append(b"")
        self.send_staged(peer, now)

    def send_staged(self, peer: Peer, now: float) -> None:
        """Seal ``peer``'s staged packets, or start a handshake when its session
        cannot carry them."""
        if not peer.staged:
            return
        keypair = peer.current
        if (
            keypair is None
            or keypair.send_nonce >= REJECT_AFTER_MESSAGES
            or now - keypair.created >= REJECT_AFTER_TIME
        ):
            self._handshakes.initiate(peer, now, is_retry=False)
            return
        if peer.endpoint is None:
            return  # keep them staged until we learn where the peer is
        data_sent = False
        staged = peer.staged
        while staged:
            if keypair.send_nonce >= REJECT_AFTER_MESSAGES:
                self._handshakes.initiate(peer, now, is_retry=False)
                break
            packet = staged.popleft()
            data_sent = data_sent or bool(packet)
            self._seal(peer, keypair, packet)
        self._after_sent(peer, now, data_sent)

    def _seal(self, peer: Peer, keypair: Keypair, packet: bytes) -> None:
        counter = keypair.send_nonce
        keypair.send_nonce = counter + 1
        data = keypair.send.seal(keypair.remote_index, counter, packet, self.mtu)
        self._outbox.datagrams.append((data, peer.endpoint))  # type: ignore[arg-type]
        peer.tx_bytes += len(data)

    def _after_sent(self, peer: Peer, now: float, data_sent: bool) -> None:
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
            self._handshakes.initiate(peer, now, is_retry=False)

    # ------------------------------------------------------------------ in

    def receive(self, data: bytes, receiver: int, counter: int, addr: Address, now: float) -> bool:
        """A transport message (its header already unpacked); True when it
        authenticated and carried a packet (not a keepalive)."""
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
        self._authenticated(keypair, plain, len(data), addr, now)
        return bool(plain)

    def receive_run(
        self,
        batch: list[tuple[bytes, Address]],
        position: int,
        receiver: int,
        counter: int,
        addr: Address,
        now: float,
    ) -> int:
        """The transport message at ``batch[position - 1]`` (header unpacked) and the
        run of the same session's messages from the same address that follows it;
        returns the position after what was taken.

        The run's first message goes the whole way (timers, endpoint, key
        confirmation) and must have carried a packet; the rest only need decrypting,
        the replay check and the source check (``speedups.open_run``).
        """
        data = batch[position - 1][0]
        if not self.receive(data, receiver, counter, addr, now):
            return position
        keypair = self._index.get(receiver)
        if not isinstance(keypair, Keypair):  # pragma: no cover - just used
            return position
        peer = keypair.peer
        position, received, data_packets = open_run(
            batch,
            position,
            keypair.receive,
            keypair.replay,
            receiver,
            addr,
            peer,
            self._route_cache,
            self._routes.lookup,
            self._outbox.packets,
            REJECT_AFTER_MESSAGES,
        )
        peer.rx_bytes += received
        if data_packets:
            peer.timers.need_another_keepalive = True
        return position

    def _authenticated(
        self, keypair: Keypair, plain: bytes, wire_size: int, addr: Address, now: float
    ) -> None:
        """A transport message decrypted and passed the replay filter (5.4.6)."""
        peer = keypair.peer
        self._touched.add(peer)
        peer.rx_bytes += wire_size
        if peer.next is keypair:
            self._handshakes.confirm(peer, keypair)
            self._outbox.move_endpoint(peer, addr)
            self._handshakes.complete(peer, now, initiator=False)
            self.send_staged(peer, now)
        elif peer.endpoint != addr:
            self._outbox.move_endpoint(peer, addr)
        timers = peer.timers
        if not timers.sent_last_minute_handshake:
            current = peer.current
            if (
                current is not None
                and current.initiator
                and now - current.created > LAST_MINUTE_HANDSHAKE_AGE
            ):
                timers.sent_last_minute_handshake = True
                self._handshakes.initiate(peer, now, is_retry=False)
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
        self._outbox.packets.append(plain if length == size else plain[:length])
