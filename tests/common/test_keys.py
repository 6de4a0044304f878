"""WireGuard key pairs: generated once, 0600, stable, never in repr."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from common.config import ConfigError
from common.keys import KEY_FILE, load_or_create


def test_generated_once_private_and_stable(tmp_path: Path) -> None:
    pair = load_or_create(tmp_path / "state")
    path = tmp_path / "state" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create(tmp_path / "state") == pair
    assert pair.private_b64 not in repr(pair) and pair.public_b64 in repr(pair)
    # The public key really belongs to the private key (X25519 agreement both ways).
    peer = X25519PrivateKey.generate()
    ours = X25519PrivateKey.from_private_bytes(pair.private)
    theirs = peer.exchange(X25519PublicKey.from_public_bytes(pair.public))
    assert ours.exchange(peer.public_key()) == theirs


def test_loose_permissions_are_fixed(tmp_path: Path) -> None:
    load_or_create(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o644)
    load_or_create(tmp_path)
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600


@pytest.mark.parametrize("content", ["not base64!!", base64.b64encode(b"short").decode()])
def test_bad_key_file_is_a_config_error(tmp_path: Path, content: str) -> None:
    (tmp_path / KEY_FILE).write_text(content)
    with pytest.raises(ConfigError, match=r"wireguard\.key"):
        load_or_create(tmp_path)
