"""A sans-IO, pure-Python WireGuard that interoperates with the real one.

Layout: :mod:`.crypto` (primitives), :mod:`.noise` (the IKpsk2 handshake),
:mod:`.messages` (wire formats), :mod:`.cookie` (mac1/mac2, cookie replies),
:mod:`.replay`, :mod:`.tai64n`, :mod:`.ratelimit`, :mod:`.allowedips` (cryptokey
routing), :mod:`.timers` (constants, per-peer timers, the heap over all peers), :mod:`.peer` (state),
:mod:`.handshake` (handshake messages, indices, keypairs), :mod:`.transport` (sealing
and opening transport messages), :mod:`.outbox`, :mod:`.engine` (:class:`WireGuardEngine`,
the sans-IO interface tying them together), :mod:`.events`, :mod:`.config` (wg-quick
files) and :mod:`.aio` (:class:`~netstack.wireguard.aio.WireGuardSocket`, an engine on a
UDP socket in an asyncio loop).
"""

from .engine import WireGuardEngine
from .errors import ConfigError, HandshakeError, MessageError, WireGuardError
from .events import (
    CookieReceived,
    EndpointChanged,
    Event,
    HandshakeCompleted,
    HandshakeGaveUp,
    KeysZeroed,
)

__all__ = [
    "ConfigError",
    "CookieReceived",
    "EndpointChanged",
    "Event",
    "HandshakeCompleted",
    "HandshakeError",
    "HandshakeGaveUp",
    "KeysZeroed",
    "MessageError",
    "WireGuardEngine",
    "WireGuardError",
]
