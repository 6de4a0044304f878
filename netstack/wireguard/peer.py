"""Per-peer state: identity, handshake in progress, keypairs, timers, staged packets.

Theory of operation: a peer holds at most three keypairs (whitepaper 5.4.6 and
wireguard-go's Keypairs):

* ``current`` -- used for sending;
* ``previous`` -- still accepted on receive, so packets in flight across a rekey
  are not lost;
* ``next`` -- a responder's fresh keypair, unused for sending until the initiator
  proves it has it by sending the first transport packet with it (key confirmation),
  at which point next -> current -> previous rotate.

Every keypair and the pending handshake own a random 32-bit local index, registered
in the engine's index table, which is how incoming messages find them.  The
transitions themselves live in :mod:`.handshake`; this module only holds state.
"""

from __future__ import annotations

from collections import deque
from enum import IntEnum

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import noise
from .cookie import CookieGenerator
from .events import Address
from .replay import ReplayFilter
from .speedups import TransportCipher
from .tai64n import TIMESTAMP_SIZE
from .timers import MAX_STAGED_PACKETS, PeerTimers


class HandshakeStage(IntEnum):
    """Where a peer's handshake stands (wireguard-go handshakeState)."""

    ZEROED = 0
    INITIATION_CREATED = 1
    INITIATION_CONSUMED = 2
    RESPONSE_CREATED = 3
    RESPONSE_CONSUMED = 4


class Keypair:
    """One session: the two AEAD objects, send counter and replay filter."""

    __slots__ = (
        "created",
        "initiator",
        "local_index",
        "peer",
        "receive",
        "remote_index",
        "replay",
        "send",
        "send_nonce",
    )

    def __init__(
        self,
        send_key: bytes,
        receive_key: bytes,
        *,
        created: float,
        initiator: bool,
        local_index: int,
        remote_index: int,
        peer: Peer,
    ) -> None:
        self.send = TransportCipher(send_key)
        self.receive = TransportCipher(receive_key)
        self.send_nonce = 0
        self.replay = ReplayFilter()
        self.created = created
        self.initiator = initiator
        self.local_index = local_index
        self.remote_index = remote_index
        self.peer = peer


class Peer:
    """A remote WireGuard peer known by its static public key."""

    __slots__ = (
        "cookies",
        "current",
        "endpoint",
        "handshake_index",
        "handshake_state",
        "initiator_base",
        "last_handshake",
        "last_initiation_consumption",
        "last_sent_handshake",
        "last_timestamp",
        "local_ephemeral",
        "next",
        "preshared_key",
        "previous",
        "public_key",
        "remote_ephemeral",
        "remote_index",
        "rx_bytes",
        "stage",
        "staged",
        "static_static",
        "timers",
        "tx_bytes",
    )

    def __init__(
        self,
        public_key: bytes,
        static_static: bytes,
        *,
        preshared_key: bytes | None = None,
        endpoint: Address | None = None,
        persistent_keepalive: int = 0,
    ) -> None:
        self.public_key = public_key
        self.static_static = static_static
        self.preshared_key = preshared_key or bytes(32)
        self.endpoint = endpoint
        self.cookies = CookieGenerator(public_key)
        self.initiator_base = noise.begin(public_key)
        self.timers = PeerTimers(persistent_keepalive)
        # handshake in progress
        self.stage = HandshakeStage.ZEROED
        self.handshake_index = 0
        self.handshake_state: noise.SymmetricState | None = None
        self.local_ephemeral: X25519PrivateKey | None = None
        self.remote_ephemeral = b""
        self.remote_index = 0
        self.last_timestamp = bytes(TIMESTAMP_SIZE)
        self.last_initiation_consumption = float("-inf")
        self.last_sent_handshake = float("-inf")
        # sessions
        self.previous: Keypair | None = None
        self.current: Keypair | None = None
        self.next: Keypair | None = None
        self.staged: deque[bytes] = deque(maxlen=MAX_STAGED_PACKETS)
        # statistics (like `wg show`)
        self.last_handshake: float | None = None
        self.rx_bytes = 0
        self.tx_bytes = 0

    @property
    def persistent_keepalive(self) -> int:
        return self.timers.persistent_keepalive_interval

    def __repr__(self) -> str:
        return f"Peer({self.public_key.hex()[:8]}…, endpoint={self.endpoint})"
