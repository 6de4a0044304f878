"""Events the WireGuard engine reports to its owner (frozen dataclasses).

Decrypted IP packets are not events (they are the bulk data path, returned by
``WireGuardEngine.packets_received()``); these are the rare state changes an agent logs or
reacts to, keyed by the peer's 32-byte public key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Address = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """A new session was derived with ``peer`` (as initiator on the response, or as
    responder on key confirmation by the first transport packet)."""

    peer: bytes
    initiator: bool


@dataclass(frozen=True, slots=True)
class HandshakeGaveUp:
    """No response after all retries (REKEY_ATTEMPT_TIME); staged packets were dropped."""

    peer: bytes


@dataclass(frozen=True, slots=True)
class CookieReceived:
    """The peer is under load and sent a cookie; the next initiation carries mac2."""

    peer: bytes


@dataclass(frozen=True, slots=True)
class KeysZeroed:
    """All session keys of ``peer`` were erased (3 * REJECT_AFTER_TIME without a new one)."""

    peer: bytes


@dataclass(frozen=True, slots=True)
class EndpointChanged:
    """An authenticated packet arrived from a new address: the peer roamed."""

    peer: bytes
    endpoint: Address


Event = HandshakeCompleted | HandshakeGaveUp | CookieReceived | KeysZeroed | EndpointChanged
