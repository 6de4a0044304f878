"""Pure-Python twin of WireGuard's transport hot path (``netstack/wireguard/_fast.pyx``).

The twins use ``cryptography``'s ChaCha20-Poly1305: ``TransportCipher`` seals and opens
one session's transport messages, ``open_run`` / ``seal_run`` a batch of one peer's.
Every function here has an identical twin in ``_fast.pyx``;
``netstack.wireguard.speedups`` picks one, and the same tests run against both.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

_TRANSPORT_HEADER = struct.Struct("<I I Q")  # type 4 + three zero bytes, receiver, counter
_NONCE = struct.Struct("<4xQ")  # 32 zero bits, 64-bit little-endian counter
_PADDING = bytes(16)


class TransportCipher:
    """ChaCha20-Poly1305 under one WireGuard session key, as transport messages use it
    (whitepaper 5.4.6); the twin of ``_fast.TransportCipher``."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a transport key is 32 bytes")
        self._aead = ChaCha20Poly1305(key)

    def seal(self, receiver: int, counter: int, packet: bytes | bytearray, mtu: int) -> bytes:
        """The whole transport message for ``packet``: header, zero padding to a multiple
        of 16 within ``mtu`` (wireguard-go's calculatePaddingSize), ciphertext, tag."""
        size = len(packet)
        if mtu <= 0:
            pad = -size % 16
        else:
            last_unit = size % mtu if size > mtu else size
            pad = min((last_unit + 15) & ~15, mtu) - last_unit
        if pad:
            packet = bytes(packet) + _PADDING[:pad]
        header = _TRANSPORT_HEADER.pack(4, receiver, counter)
        return header + self._aead.encrypt(_NONCE.pack(counter), packet, None)

    def open(self, counter: int, data: bytes | bytearray | memoryview) -> bytes | None:
        """The plaintext of the transport message ``data`` (header included), or None
        when it does not authenticate."""
        if len(data) < 32:
            return None
        try:
            return self._aead.decrypt(_NONCE.pack(counter), memoryview(data)[16:], None)
        except InvalidTag:
            return None


def open_run(
    batch: list[tuple[bytes, Any]],
    start: int,
    cipher: TransportCipher,
    replay: Any,
    receiver: int,
    addr: Any,
    peer: object,
    cache: dict[bytes, Any],
    lookup: Callable[[bytes], object],
    packets: list[bytes],
    limit: int,
) -> tuple[int, int, int]:
    """Open the run of transport messages in ``batch[start:]`` that belong to one
    session (``receiver``) and come from ``addr``; the twin of ``_fast.open_run``.

    For each: decrypt (a forgery is dropped), the replay check on ``replay`` (a
    ``ReplayFilter``; ``limit`` is REJECT_AFTER_MESSAGES), the IP header check, and
    cryptokey routing (the source must route to ``peer`` via ``cache`` or
    ``lookup``); accepted packets are appended to ``packets``.  Stops at the first
    datagram that is not part of the run.  Returns ``(next position, wire bytes
    authenticated, data packets authenticated)``.
    """
    i = start
    n = len(batch)
    received = data_count = 0
    unpack = _TRANSPORT_HEADER.unpack_from
    while i < n:
        item = batch[i]
        if type(item) is not tuple or len(item) != 2:
            break
        data, source_addr = item
        if type(data) is not bytes or len(data) < 32:
            break
        kind, index, counter = unpack(data)
        if kind != 4 or index != receiver:
            break
        if source_addr is not addr and source_addr != addr:
            break
        i += 1
        plain = cipher.open(counter, data)
        if plain is None:
            continue
        last = replay.last
        if counter > last and counter >> 6 == last >> 6 and counter < limit:
            replay.last = counter
            replay.ring[(counter >> 6) & 127] |= 1 << (counter & 63)
        elif not replay.validate(counter, limit):
            continue
        received += len(data)
        length = len(plain)
        if not length:
            continue  # keepalive
        data_count += 1
        version = plain[0] >> 4
        if version == 4:
            if length < 20:
                continue
            total = (plain[2] << 8) | plain[3]
            if total > length or total < 20:
                continue
            source = plain[12:16]
        elif version == 6:
            if length < 40:
                continue
            total = ((plain[4] << 8) | plain[5]) + 40
            if total > length:
                continue
            source = plain[8:24]
        else:
            continue
        owner = cache.get(source)
        if owner is None:
            owner = lookup(source)
        if owner is not peer:
            continue
        packets.append(plain if total == length else plain[:total])
    return i, received, data_count


def seal_run(
    packets: list[bytes],
    start: int,
    cipher: TransportCipher,
    receiver: int,
    counter: int,
    limit: int,
    mtu: int,
    max_size: int,
    endpoint: Any,
    peer: object,
    cache: dict[bytes, Any],
    out: list[tuple[bytes, Any]],
) -> tuple[int, int, int]:
    """Seal the run of IP packets in ``packets[start:]`` whose destination routes (via
    ``cache``) to ``peer``, numbering them from ``counter`` while below ``limit``
    (REKEY_AFTER_MESSAGES); each message goes to ``out`` as ``(message, endpoint)``.
    Stops at the first packet that is not part of the run; the twin of
    ``_fast.seal_run``.  Returns ``(next position, next counter, wire bytes)``.
    """
    i = start
    n = len(packets)
    sent = 0
    seal = cipher.seal
    while i < n and counter < limit:
        packet = packets[i]
        if type(packet) is not bytes:
            break
        size = len(packet)
        if size < 20 or size > max_size:
            break
        version = packet[0] >> 4
        if version == 4:
            destination = packet[16:20]
        elif version == 6 and size >= 40:
            destination = packet[24:40]
        else:
            break
        if cache.get(destination) is not peer:
            break
        message = seal(receiver, counter, packet, mtu)
        counter += 1
        out.append((message, endpoint))
        sent += len(message)
        i += 1
    return i, counter, sent
