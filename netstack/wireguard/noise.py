"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s as WireGuard uses it (whitepaper 5.4.2-5.4.5).

Theory of operation: a :class:`SymmetricState` carries the chaining key ``ck`` and
the transcript hash ``h``.  The IK pattern with the PSK mixed in at the end of the
second message is::

    <- s                     (pre-message: the initiator knows the responder's key)
    -> e, es, s, ss          (initiation; payload = TAI64N timestamp)
    <- e, ee, se, psk        (response; empty payload)

In psk mode every ``e`` token is also mixed into ``ck`` (Noise spec 9.2), which is
exactly WireGuard's ``Ci = KDF1(Ci, Epub)``.  Each AEAD key is used once, so the
handshake nonce is always 0.  ``split()`` yields the transport keys (KDF2(ck, "")).
The functions are generic over prologue and payload so the same code passes the
Noise test vectors and speaks WireGuard; the WireGuard-specific sizes and lookups live
in :mod:`.handshake` and :mod:`.messages`.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .crypto import aead_decrypt, aead_encrypt, dh, hash_, kdf1, kdf2, kdf3, public_key_of

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"


class SymmetricState:
    """Chaining key and handshake hash of one Noise handshake in progress."""

    __slots__ = ("ck", "h")

    def __init__(self, ck: bytes, h: bytes) -> None:
        self.ck = ck
        self.h = h

    @classmethod
    def initial(
        cls, protocol_name: bytes = CONSTRUCTION, prologue: bytes = IDENTIFIER
    ) -> SymmetricState:
        # Noise 5.2 InitializeSymmetric: names longer than HASHLEN are hashed.
        h = protocol_name.ljust(32, b"\0") if len(protocol_name) <= 32 else hash_(protocol_name)
        return cls(h, hash_(h, prologue))

    def copy(self) -> SymmetricState:
        return SymmetricState(self.ck, self.h)

    def mix_hash(self, data: bytes) -> None:
        self.h = hash_(self.h, data)

    def mix_key(self, ikm: bytes) -> bytes:
        self.ck, key = kdf2(self.ck, ikm)
        return key

    def encrypt_and_hash(self, key: bytes, plaintext: bytes) -> bytes:
        ciphertext = aead_encrypt(key, 0, plaintext, self.h)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, key: bytes, ciphertext: bytes) -> bytes:
        plaintext = aead_decrypt(key, 0, ciphertext, self.h)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        """(initiator-to-responder key, responder-to-initiator key)."""
        return kdf2(self.ck, b"")


_INITIAL = SymmetricState.initial()
INITIAL_CHAIN_KEY = _INITIAL.ck
INITIAL_HASH = _INITIAL.h


def begin(remote_static: bytes, base: SymmetricState = _INITIAL) -> SymmetricState:
    """State after the pre-message ``<- s``: the responder's static key is hashed in."""
    state = base.copy()
    state.mix_hash(remote_static)
    return state


def write_initiation(
    state: SymmetricState,
    ephemeral: X25519PrivateKey,
    local_static_public: bytes,
    remote_static: bytes,
    static_static: bytes,
    payload: bytes,
) -> tuple[bytes, bytes, bytes]:
    """-> e, es, s, ss: returns (ephemeral public, encrypted static, encrypted payload)."""
    eph_pub = public_key_of(ephemeral)
    state.mix_hash(eph_pub)
    state.ck = kdf1(state.ck, eph_pub)
    key = state.mix_key(dh(ephemeral, remote_static))
    enc_static = state.encrypt_and_hash(key, local_static_public)
    key = state.mix_key(static_static)
    enc_payload = state.encrypt_and_hash(key, payload)
    return eph_pub, enc_static, enc_payload


def read_initiation_static(
    state: SymmetricState, local_static: X25519PrivateKey, eph_pub: bytes, enc_static: bytes
) -> bytes:
    """First half of reading an initiation: e, es, s.  Returns the initiator's static key."""
    state.mix_hash(eph_pub)
    state.ck = kdf1(state.ck, eph_pub)
    key = state.mix_key(dh(local_static, eph_pub))
    return state.decrypt_and_hash(key, enc_static)


def read_initiation_payload(
    state: SymmetricState, static_static: bytes, enc_payload: bytes
) -> bytes:
    """Second half of reading an initiation: ss and the payload."""
    key = state.mix_key(static_static)
    return state.decrypt_and_hash(key, enc_payload)


def write_response(
    state: SymmetricState,
    ephemeral: X25519PrivateKey,
    remote_ephemeral: bytes,
    remote_static: bytes,
    psk: bytes,
    payload: bytes,
) -> tuple[bytes, bytes]:
    """<- e, ee, se, psk: returns (ephemeral public, encrypted payload)."""
    eph_pub = public_key_of(ephemeral)
    state.mix_hash(eph_pub)
    state.ck = kdf1(state.ck, eph_pub)
    state.ck = kdf1(state.ck, dh(ephemeral, remote_ephemeral))
    state.ck = kdf1(state.ck, dh(ephemeral, remote_static))
    state.ck, tau, key = kdf3(state.ck, psk)
    state.mix_hash(tau)
    return eph_pub, state.encrypt_and_hash(key, payload)


def read_response(
    state: SymmetricState,
    local_ephemeral: X25519PrivateKey,
    local_static: X25519PrivateKey,
    eph_pub: bytes,
    psk: bytes,
    enc_payload: bytes,
) -> bytes:
    """Read a response on the initiator's side; returns the payload."""
    state.mix_hash(eph_pub)
    state.ck = kdf1(state.ck, eph_pub)
    state.ck = kdf1(state.ck, dh(local_ephemeral, eph_pub))
    state.ck = kdf1(state.ck, dh(local_static, eph_pub))
    state.ck, tau, key = kdf3(state.ck, psk)
    state.mix_hash(tau)
    return state.decrypt_and_hash(key, enc_payload)
