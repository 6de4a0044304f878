"""WireGuard key pairs owned by the agent or gateway itself (DESIGN.md, "Keys").

The private key is generated on first start and kept in the state directory with mode
0600; only the public key ever leaves the machine.  A key file that others can read is
tightened and a warning logged; an unreadable or malformed one is a configuration
error (exit 2), never silently replaced — replacing it would change the peer's
identity.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from common.config import ConfigError
from common.logs import kv

log = logging.getLogger("kakuremichi.keys")

KEY_FILE = "wireguard.key"


@dataclass(frozen=True)
class KeyPair:
    """A WireGuard (Curve25519) key pair; ``repr`` never shows the private key."""

    private: bytes
    public: bytes

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public).decode()

    @property
    def private_b64(self) -> str:
        return base64.b64encode(self.private).decode()

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public_b64})"

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        key = X25519PrivateKey.from_private_bytes(private)
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return cls(private, public)

    @classmethod
    def generate(cls) -> KeyPair:
        raw = X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return cls.from_private(raw)


def load_or_create(state_dir: Path) -> KeyPair:
    """The key pair in ``state_dir/wireguard.key``, created (0600) if absent."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"--data-dir: cannot create {state_dir}: {exc.strerror}") from exc
    path = state_dir / KEY_FILE
    if not path.exists():
        pair = KeyPair.generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(pair.private_b64 + "\n")
        log.info(
            "generated WireGuard key pair", extra=kv(public_key=pair.public_b64, file=str(path))
        )
        return pair
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("key file was readable by others; tightening to 0600", extra=kv(file=str(path)))
        path.chmod(0o600)
    try:
        text = path.read_text().strip()
        raw = base64.b64decode(text, validate=True)
    except (OSError, UnicodeDecodeError, binascii.Error, ValueError) as exc:
        raise ConfigError(f"--data-dir: {path} is not a readable base64 WireGuard key") from exc
    if len(raw) != 32:
        raise ConfigError(f"--data-dir: {path} must hold a 32-byte key")
    return KeyPair.from_private(raw)
