"""mac1/mac2 and the cookie reply (whitepaper 5.3, 5.4.4 and 5.4.7).

Theory of operation: every handshake message ends with ``mac1 || mac2``.
``mac1 = MAC(HASH("mac1----" || Spub_receiver), msg[:-32])`` proves the sender knows
the receiver's public key and is always checked.  Under load a responder also wants
``mac2 = MAC(cookie, msg[:-16])``, where ``cookie = MAC(secret, source address)``
and ``secret`` is a random value rotated every COOKIE_REFRESH_TIME (120 s).  A
message without a valid mac2 gets a cookie reply instead of processing: the cookie
encrypted with XChaCha20-Poly1305 under ``HASH("cookie--" || Spub_receiver)`` with the
message's mac1 as associated data (so only the real sender can use it).  The initiator
(:class:`CookieGenerator`, one per peer) remembers the last mac1 it sent, accepts a
reply only for it, and adds mac2 to its next handshake messages while the cookie is
younger than 120 s.  Time and randomness are passed in.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from .crypto import MAC_SIZE, hash_, mac, xaead_decrypt, xaead_encrypt
from .errors import HandshakeError
from .events import Address
from .messages import CookieReply

COOKIE_REFRESH_TIME = 120.0
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"
_ZERO_MAC = bytes(MAC_SIZE)


def address_bytes(addr: Address) -> bytes:
    """The source identity a cookie is bound to: packed IP then big-endian port.

    ``inet_pton`` rather than ``ipaddress`` because this runs for every handshake
    message under load (0.2 us instead of 4.5 us, a seventh of a cookie reply).
    """
    host = str(addr[0])
    if "%" in host:
        host = host.split("%", 1)[0]  # a link-local scope is not part of the address
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        packed = host.encode()
    return packed + (int(addr[1]) & 0xFFFF).to_bytes(2, "big")


class CookieChecker:
    """The receiving side of mac1/mac2 for one interface (keyed by our own public key)."""

    def __init__(self, public_key: bytes, random_bytes: Callable[[int], bytes]) -> None:
        self._random = random_bytes
        self.mac1_key = hash_(LABEL_MAC1, public_key)
        self.cookie_key = hash_(LABEL_COOKIE, public_key)
        self._secret = b""
        self._secret_set = float("-inf")

    def check_mac1(self, msg: bytes) -> bool:
        return mac(self.mac1_key, msg[:-32]) == msg[-32:-16]

    def _cookie(self, src: bytes, now: float) -> bytes:
        if now - self._secret_set > COOKIE_REFRESH_TIME:
            self._secret = self._random(32)
            self._secret_set = now
        return mac(self._secret, src)

    def check_mac2(self, msg: bytes, src: bytes, now: float) -> bool:
        if now - self._secret_set > COOKIE_REFRESH_TIME:
            return False  # the secret expired: every cookie made with it is stale
        return mac(mac(self._secret, src), msg[:-16]) == msg[-16:]

    def create_reply(self, msg: bytes, receiver: int, src: bytes, now: float) -> CookieReply:
        nonce = self._random(24)
        cookie = self._cookie(src, now)
        encrypted = xaead_encrypt(self.cookie_key, nonce, cookie, msg[-32:-16])
        return CookieReply(receiver, nonce, encrypted)


class CookieGenerator:
    """The sending side of mac1/mac2 for one peer (keyed by the peer's public key)."""

    def __init__(self, peer_public_key: bytes) -> None:
        self.mac1_key = hash_(LABEL_MAC1, peer_public_key)
        self.cookie_key = hash_(LABEL_COOKIE, peer_public_key)
        self._cookie = b""
        self._cookie_set = float("-inf")
        self._last_mac1: bytes | None = None

    def add_macs(self, msg: bytearray, now: float) -> None:
        """Fill in mac1 and (with a fresh cookie) mac2 of a built handshake message."""
        mac1 = mac(self.mac1_key, bytes(msg[:-32]))
        msg[-32:-16] = mac1
        self._last_mac1 = mac1
        if self._cookie and now - self._cookie_set <= COOKIE_REFRESH_TIME:
            msg[-16:] = mac(self._cookie, bytes(msg[:-16]))
        else:
            msg[-16:] = _ZERO_MAC

    def consume_reply(self, reply: CookieReply, now: float) -> bool:
        """Store the cookie of a reply to our last message; False if it does not decrypt."""
        if self._last_mac1 is None:
            return False
        try:
            cookie = xaead_decrypt(
                self.cookie_key, reply.nonce, reply.encrypted_cookie, self._last_mac1
            )
        except HandshakeError:
            return False
        self._cookie = cookie
        self._cookie_set = now
        self._last_mac1 = None
        return True

    @property
    def has_cookie(self) -> bool:
        return bool(self._cookie)
