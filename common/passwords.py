"""Password hashes: argon2id (RFC 9106) in the PHC string format, through argon2-cffi.

Control hashes what an admin types (a tunnel's password or PIN, basic-auth users) and
stores and sends only the hash; gateways verify against it.  Verifying costs tens of
milliseconds on purpose, so callers on an event loop run ``verify`` in a thread
(argon2-cffi releases the GIL while hashing).
"""

from __future__ import annotations

import functools
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = ["hash_password", "verify_nobody", "verify_password"]

_hasher = PasswordHasher()  # argon2-cffi's defaults: argon2id, RFC 9106's second choice


def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` (a fresh random salt each time)."""
    return _hasher.hash(password)


def verify_password(hashed: str, password: str) -> bool:
    """Whether ``password`` matches ``hashed`` (False for a hash that does not parse)."""
    try:
        return _hasher.verify(hashed, password)
    except (VerificationError, InvalidHashError):
        return False


@functools.cache
def _nobody() -> str:
    return _hasher.hash(secrets.token_urlsafe(16))


def verify_nobody(password: str) -> bool:
    """Spend what a real verification costs, for a user that does not exist (no user
    enumeration by timing); always False."""
    verify_password(_nobody(), password)
    return False
