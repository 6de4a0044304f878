"""WireGuard wire formats (whitepaper section 5.4): checked views and builders.

Theory of operation: every datagram starts with a little-endian 32-bit word whose
low byte is the message type and whose three reserved bytes must be zero.  The three
handshake messages have exact sizes (initiation 148 B, response 92 B, cookie reply
64 B); a transport message is a 16-byte header plus at least a 16-byte tag.  Parsers
check the length first and raise only :class:`MessageError`; :func:`message_type`
returns ``None`` for anything that is not WireGuard, which the engine drops quietly.
Builders return ``bytearray`` so the MACs can be filled in place afterwards.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import MessageError

MESSAGE_INITIATION = 1
MESSAGE_RESPONSE = 2
MESSAGE_COOKIE_REPLY = 3
MESSAGE_TRANSPORT = 4

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
TRANSPORT_MIN_SIZE = 32  # header + Poly1305 tag: an empty (keepalive) packet

_INITIATION = struct.Struct("<II32s48s28s16s16s")
_RESPONSE = struct.Struct("<III32s16s16s16s")
_COOKIE_REPLY = struct.Struct("<II24s32s")
TRANSPORT_HEADER = struct.Struct("<IIQ")

_EXPECTED_SIZE = {
    MESSAGE_INITIATION: INITIATION_SIZE,
    MESSAGE_RESPONSE: RESPONSE_SIZE,
    MESSAGE_COOKIE_REPLY: COOKIE_REPLY_SIZE,
}


def message_type(data: bytes) -> int | None:
    """The type of a well-sized WireGuard datagram, or ``None`` to drop it quietly."""
    size = len(data)
    if size < 4 or data[1] or data[2] or data[3]:
        return None
    kind = data[0]
    if kind == MESSAGE_TRANSPORT:
        return kind if size >= TRANSPORT_MIN_SIZE else None
    return kind if _EXPECTED_SIZE.get(kind) == size else None


@dataclass(frozen=True, slots=True)
class Initiation:
    """Handshake initiation (type 1): the initiator's first message."""

    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes
    mac2: bytes

    @classmethod
    def parse(cls, data: bytes) -> Initiation:
        if len(data) != INITIATION_SIZE:
            raise MessageError(f"initiation is {INITIATION_SIZE} bytes, got {len(data)}")
        kind, sender, eph, static, stamp, mac1, mac2 = _INITIATION.unpack(data)
        if kind != MESSAGE_INITIATION:
            raise MessageError("not an initiation message")
        return cls(sender, eph, static, stamp, mac1, mac2)

    def build(self) -> bytearray:
        out = bytearray(INITIATION_SIZE)
        _INITIATION.pack_into(
            out,
            0,
            MESSAGE_INITIATION,
            self.sender,
            self.ephemeral,
            self.encrypted_static,
            self.encrypted_timestamp,
            self.mac1,
            self.mac2,
        )
        return out


@dataclass(frozen=True, slots=True)
class Response:
    """Handshake response (type 2): the responder's answer."""

    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes
    mac2: bytes

    @classmethod
    def parse(cls, data: bytes) -> Response:
        if len(data) != RESPONSE_SIZE:
            raise MessageError(f"response is {RESPONSE_SIZE} bytes, got {len(data)}")
        kind, sender, receiver, eph, empty, mac1, mac2 = _RESPONSE.unpack(data)
        if kind != MESSAGE_RESPONSE:
            raise MessageError("not a response message")
        return cls(sender, receiver, eph, empty, mac1, mac2)

    def build(self) -> bytearray:
        out = bytearray(RESPONSE_SIZE)
        _RESPONSE.pack_into(
            out,
            0,
            MESSAGE_RESPONSE,
            self.sender,
            self.receiver,
            self.ephemeral,
            self.encrypted_nothing,
            self.mac1,
            self.mac2,
        )
        return out


@dataclass(frozen=True, slots=True)
class CookieReply:
    """Cookie reply (type 3): an encrypted cookie sent instead of a response under load."""

    receiver: int
    nonce: bytes
    encrypted_cookie: bytes

    @classmethod
    def parse(cls, data: bytes) -> CookieReply:
        if len(data) != COOKIE_REPLY_SIZE:
            raise MessageError(f"cookie reply is {COOKIE_REPLY_SIZE} bytes, got {len(data)}")
        kind, receiver, nonce, cookie = _COOKIE_REPLY.unpack(data)
        if kind != MESSAGE_COOKIE_REPLY:
            raise MessageError("not a cookie reply message")
        return cls(receiver, nonce, cookie)

    def build(self) -> bytes:
        return _COOKIE_REPLY.pack(
            MESSAGE_COOKIE_REPLY, self.receiver, self.nonce, self.encrypted_cookie
        )


@dataclass(frozen=True, slots=True)
class TransportHeader:
    """The 16-byte header of a transport data message (type 4)."""

    receiver: int
    counter: int

    @classmethod
    def parse(cls, data: bytes) -> TransportHeader:
        if len(data) < TRANSPORT_MIN_SIZE:
            raise MessageError(f"transport message is at least {TRANSPORT_MIN_SIZE} bytes")
        kind, receiver, counter = TRANSPORT_HEADER.unpack_from(data)
        if kind != MESSAGE_TRANSPORT:
            raise MessageError("not a transport message")
        return cls(receiver, counter)
