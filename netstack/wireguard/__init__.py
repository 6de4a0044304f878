"""A sans-IO, pure-Python WireGuard that interoperates with the real one.

Layout: :mod:`.crypto` (primitives), :mod:`.noise` (the IKpsk2 handshake),
:mod:`.messages` (wire formats), :mod:`.cookie` (mac1/mac2, cookie replies),
:mod:`.replay`, :mod:`.tai64n`, :mod:`.ratelimit`, :mod:`.allowedips` (cryptokey
routing), :mod:`.timers` (constants and per-peer timers), :mod:`.peer` (state),
:mod:`.device` (the state machine), :mod:`.events`, :mod:`.config` (wg-quick files)
and :mod:`.aio` (the asyncio UDP adapter).
"""

from .device import Device
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
    "Device",
    "EndpointChanged",
    "Event",
    "HandshakeCompleted",
    "HandshakeError",
    "HandshakeGaveUp",
    "KeysZeroed",
    "MessageError",
    "WireGuardError",
]
