"""WireGuard datagrams in a byte stream: the record format (sans-IO).

Theory of operation
-------------------
When UDP is blocked, an agent carries its WireGuard datagrams to a gateway inside a
WebSocket (RFC 6455) over TLS.  Each binary message holds one or more *records*::

    record = length (2 bytes, big-endian, 1..65535) || datagram (length bytes)

A datagram is exactly what the UDP path carries (a WireGuard message: initiation,
response, cookie reply or transport), so WireGuard's own security is unchanged: the
stream adds framing, never meaning.  Several records per message let one flush of the
engine (a bulk transfer's run of full-size packets) cross the WebSocket and TLS layers
as one message instead of one each.

:func:`pack` makes messages of at most ``limit`` bytes out of a batch (a datagram is
never split across messages); :func:`unpack` takes a message apart and raises
:class:`RecordError` for anything that is not a whole number of well-formed
WireGuard records: a zero length, a length running past the message, or a datagram
that is not shaped like a WireGuard message (wrong type, reserved bytes set, wrong
size for its type; ``netstack.wireguard.messages.message_type``).  A peer that sends
such a message is not a WireGuard peer, and its stream is closed.
"""

from __future__ import annotations

from collections.abc import Iterable

from netstack.wireguard.messages import MESSAGE_TRANSPORT, message_type

HEADER = 2
#: the largest datagram a record holds (what a UDP payload can be)
MAX_DATAGRAM = 65535
#: the largest record: the length field and the datagram
MAX_RECORD = HEADER + MAX_DATAGRAM
#: the size messages are packed to (a batch of ~45 full-size WireGuard packets)
PACK_LIMIT = 64 * 1024
#: the largest message a receiver accepts: whole records only, so one maximal record
#: plus the packing limit leaves room for anything a conforming sender makes
MAX_MESSAGE = PACK_LIMIT + MAX_RECORD


class RecordError(Exception):
    """A message that is not a sequence of WireGuard records."""


def pack(datagrams: Iterable[bytes], limit: int = PACK_LIMIT) -> list[bytes]:
    """The messages carrying ``datagrams`` in order, each at most ``limit`` bytes unless
    a single record is larger.  Raises ValueError for an empty or oversized datagram."""
    messages: list[bytes] = []
    parts: list[bytes] = []
    size = 0
    for datagram in datagrams:
        length = len(datagram)
        if not 0 < length <= MAX_DATAGRAM:
            raise ValueError(f"a datagram is 1..{MAX_DATAGRAM} bytes, got {length}")
        if parts and size + HEADER + length > limit:
            messages.append(b"".join(parts))
            parts, size = [], 0
        parts.append(length.to_bytes(2, "big"))
        parts.append(datagram)
        size += HEADER + length
    if parts:
        messages.append(b"".join(parts))
    return messages


def unpack(message: bytes | bytearray | memoryview) -> list[bytes]:
    """The datagrams of one message (see the module docstring for what is refused)."""
    data = bytes(message)
    end = len(data)
    if end == 0:
        raise RecordError("an empty message")
    datagrams: list[bytes] = []
    offset = 0
    while offset < end:
        if end - offset < HEADER:
            raise RecordError("a record header cut off at the end of the message")
        length = (data[offset] << 8) | data[offset + 1]
        start = offset + HEADER
        offset = start + length
        if length == 0:
            raise RecordError("a record of length 0")
        if offset > end:
            raise RecordError(f"a record of {length} bytes runs past the end of the message")
        datagram = data[start:offset]
        if message_type(datagram) is None:
            raise RecordError("a record that is not a WireGuard message")
        datagrams.append(datagram)
    return datagrams


def is_droppable(datagram: bytes) -> bool:
    """A transport message: what a full outer buffer may drop, as a congested UDP path
    would (handshake messages are small and rare, and losing them costs seconds)."""
    return datagram[0] == MESSAGE_TRANSPORT
