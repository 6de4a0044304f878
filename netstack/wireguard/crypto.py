"""Cryptographic primitives of WireGuard (whitepaper section 5.4).

Theory of operation: WireGuard fixes its primitives -- BLAKE2s for HASH, MAC
(keyed BLAKE2s, 16 bytes), HMAC-BLAKE2s for the HKDF-style KDF1/2/3, X25519 for DH
and ChaCha20-Poly1305 for AEAD, plus XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha)
for the cookie reply.  Everything expensive is done by ``cryptography`` or
``hashlib``, HChaCha20 included (one ChaCha20 keystream block, see :func:`hchacha20`),
so a cookie reply costs a small fraction of a handshake.  HMAC is built from
precomputed pads with ``bytes.translate`` because that is ~3x faster than the ``hmac``
module for the tiny inputs the handshake uses.
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.ciphers.algorithms import ChaCha20

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
_ZERO_BLOCK = bytes(64)
_BLOCK_WORDS = struct.Struct("<16I")
_NONCE_WORDS = struct.Struct("<4I")
_SUBKEY = struct.Struct("<8I")


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha section 2.2): 32-byte subkey from key and nonce.

    HChaCha20 is the ChaCha20 block function without the final addition of the input
    state, keeping words 0..3 and 12..15.  ``cryptography``'s ChaCha20 takes a 16-byte
    nonce that is exactly state words 12..15 (OpenSSL: 32-bit block counter then
    96-bit nonce, little endian), so one keystream block for ``nonce16`` is the
    permuted state plus the input state; subtracting the known input words mod 2**32
    leaves HChaCha20's output.  ~7 us in C instead of ~140 us of Python rounds.
    """
    if len(key) != KEY_SIZE or len(nonce16) != 16:
        raise HandshakeError("HChaCha20 takes a 32-byte key and a 16-byte nonce")
    block = Cipher(ChaCha20(key, nonce16), None).encryptor().update(_ZERO_BLOCK)
    w = _BLOCK_WORDS.unpack(block)
    s0, s1, s2, s3 = _SIGMA
    n0, n1, n2, n3 = _NONCE_WORDS.unpack(nonce16)
    return _SUBKEY.pack(
        (w[0] - s0) & _M32,
        (w[1] - s1) & _M32,
        (w[2] - s2) & _M32,
        (w[3] - s3) & _M32,
        (w[12] - n0) & _M32,
        (w[13] - n1) & _M32,
        (w[14] - n2) & _M32,
        (w[15] - n3) & _M32,
    )


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
