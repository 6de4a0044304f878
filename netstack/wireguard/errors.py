"""The WireGuard layer's own exception types.

Parsers raise only :class:`MessageError`; the handshake raises only
:class:`HandshakeError`; the config parser raises only :class:`ConfigError`.  All
derive from :class:`WireGuardError`, so a caller can catch the whole layer at once.
On the datagram path the engine never raises: bad input is dropped silently.
"""

from __future__ import annotations


class WireGuardError(Exception):
    """Base class of every error raised by ``netstack.wireguard``."""


class MessageError(WireGuardError):
    """A datagram or field does not have the WireGuard wire format."""


class HandshakeError(WireGuardError):
    """A handshake message failed authentication or a protocol rule."""


class ConfigError(WireGuardError):
    """A wg-quick style configuration is invalid; the message names the setting."""
