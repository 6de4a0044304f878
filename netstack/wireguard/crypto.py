"""Cryptographic primitives of WireGuard (whitepaper section 5.4).

Theory of operation: WireGuard fixes its primitives -- BLAKE2s for HASH, MAC
(keyed BLAKE2s, 16 bytes), HMAC-BLAKE2s for the HKDF-style KDF1/2/3, X25519 for DH
and ChaCha20-Poly1305 for AEAD, plus XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha)
for the cookie reply.  Everything expensive is done by ``cryptography`` or
``hashlib``; the only primitive written in Python is HChaCha20, which sits on the
(rare, rate-limited) cookie path.  HMAC is built from precomputed pads with
``bytes.translate`` because that is ~3x faster than the ``hmac`` module for the tiny
inputs the handshake uses.
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .errors import HandshakeError

KEY_SIZE = 32
HASH_SIZE = 32
MAC_SIZE = 16
TAG_SIZE = 16
ZERO_KEY = bytes(KEY_SIZE)
ZERO_NONCE = bytes(12)

_BLOCK = 64
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_blake2s = hashlib.blake2s

__all__ = [
    "HASH_SIZE",
    "KEY_SIZE",
    "MAC_SIZE",
    "TAG_SIZE",
    "InvalidTag",
    "aead_decrypt",
    "aead_encrypt",
    "dh",
    "hash_",
    "hchacha20",
    "hmac",
    "kdf1",
    "kdf2",
    "kdf3",
    "mac",
    "private_key_from_bytes",
    "public_key_of",
    "xaead_decrypt",
    "xaead_encrypt",
]


def hash_(*parts: bytes) -> bytes:
    """HASH(a || b || ...): 32-byte BLAKE2s."""
    h = _blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, data): keyed BLAKE2s with a 16-byte digest."""
    return _blake2s(data, digest_size=MAC_SIZE, key=key).digest()


def hmac(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s (RFC 2104 with a 64-byte block)."""
    if len(key) > _BLOCK:
        key = _blake2s(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    inner = _blake2s(key.translate(_IPAD))
    inner.update(data)
    outer = _blake2s(key.translate(_OPAD))
    outer.update(inner.digest())
    return outer.digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    """KDF1: the first HKDF output block."""
    t0 = hmac(key, data)
    return hmac(t0, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """KDF2: the first two HKDF output blocks."""
    t0 = hmac(key, data)
    t1 = hmac(t0, b"\x01")
    return t1, hmac(t0, t1 + b"\x02")


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """KDF3: the first three HKDF output blocks."""
    t0 = hmac(key, data)
    t1 = hmac(t0, b"\x01")
    t2 = hmac(t0, t1 + b"\x02")
    return t1, t2, hmac(t0, t2 + b"\x03")


def private_key_from_bytes(raw: bytes) -> X25519PrivateKey:
    """An X25519 private key from 32 bytes (clamping is done by X25519 itself)."""
    if len(raw) != KEY_SIZE:
        raise HandshakeError("an X25519 private key is 32 bytes")
    return X25519PrivateKey.from_private_bytes(raw)


def public_key_of(private: X25519PrivateKey) -> bytes:
    """The 32-byte public key of ``private``."""
    return private.public_key().public_bytes_raw()


def dh(private: X25519PrivateKey, public: bytes) -> bytes:
    """X25519(private, public), refusing an all-zero result (a low-order point)."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # cryptography refuses low-order points itself
        raise HandshakeError("X25519 produced the all-zero shared secret") from exc
    if shared == ZERO_KEY:
        raise HandshakeError("X25519 produced the all-zero shared secret")
    return shared


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    """AEAD(key, counter, plaintext, ad): ChaCha20-Poly1305 with a 64-bit LE counter."""
    nonce = b"\0\0\0\0" + counter.to_bytes(8, "little")
    return ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    """The inverse of :func:`aead_encrypt`; raises :class:`HandshakeError` on a bad tag."""
    nonce = b"\0\0\0\0" + counter.to_bytes(8, "little")
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, ad)
    except InvalidTag as exc:
        raise HandshakeError("authentication tag mismatch") from exc


_SIGMA = struct.unpack("<4I", b"expand 32-byte k")
_M32 = 0xFFFFFFFF


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha section 2.2): 32-byte subkey from key and nonce."""
    if len(key) != KEY_SIZE or len(nonce16) != 16:
        raise HandshakeError("HChaCha20 takes a 32-byte key and a 16-byte nonce")
    s = [*_SIGMA, *struct.unpack("<8I", key), *struct.unpack("<4I", nonce16)]

    def quarter(a: int, b: int, c: int, d: int) -> None:
        s[a] = (s[a] + s[b]) & _M32
        x = s[d] ^ s[a]
        s[d] = ((x << 16) | (x >> 16)) & _M32
        s[c] = (s[c] + s[d]) & _M32
        x = s[b] ^ s[c]
        s[b] = ((x << 12) | (x >> 20)) & _M32
        s[a] = (s[a] + s[b]) & _M32
        x = s[d] ^ s[a]
        s[d] = ((x << 8) | (x >> 24)) & _M32
        s[c] = (s[c] + s[d]) & _M32
        x = s[b] ^ s[c]
        s[b] = ((x << 7) | (x >> 25)) & _M32

    for _ in range(10):
        quarter(0, 4, 8, 12)
        quarter(1, 5, 9, 13)
        quarter(2, 6, 10, 14)
        quarter(3, 7, 11, 15)
        quarter(0, 5, 10, 15)
        quarter(1, 6, 11, 12)
        quarter(2, 7, 8, 13)
        quarter(3, 4, 9, 14)
    return struct.pack("<8I", *s[0:4], *s[12:16])


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """XChaCha20-Poly1305 encryption with a 24-byte nonce."""
    if len(nonce24) != 24:
        raise HandshakeError("XChaCha20-Poly1305 takes a 24-byte nonce")
    subkey = hchacha20(key, nonce24[:16])
    return ChaCha20Poly1305(subkey).encrypt(b"\0\0\0\0" + nonce24[16:], plaintext, ad)


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """XChaCha20-Poly1305 decryption; raises :class:`HandshakeError` on a bad tag."""
    if len(nonce24) != 24:
        raise HandshakeError("XChaCha20-Poly1305 takes a 24-byte nonce")
    subkey = hchacha20(key, nonce24[:16])
    try:
        return ChaCha20Poly1305(subkey).decrypt(b"\0\0\0\0" + nonce24[16:], ciphertext, ad)
    except InvalidTag as exc:
        raise HandshakeError("authentication tag mismatch") from exc
